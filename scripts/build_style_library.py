"""Build the style library (issue 26): many distinct text styles, each a folder of short documents,
from public-domain or permissively licensed texts that install from Debian packages, plus a neutral
corpus (Python's reference manual topics). The style generator trains and is measured on it.

    python scripts/build_style_library.py                  # into $HNKIT_CACHE/styles (~/.cache/hnkit/styles)
    python scripts/build_style_library.py --install        # apt-get install the packages that are missing
    python scripts/build_style_library.py --out DIR --force

Written (atomically: built beside DIR, then renamed into place; deterministic, byte for byte):
DIR/manifest.json (every style's split, source, licence and documents), DIR/<style>/NNNN.txt and
DIR/neutral/NNNN.txt, one UTF-8 document of at most 2,000 bytes each: consecutive entries of a source
(fortunes, dictionary entries) joined by a blank line while the document stays under ~1,800 bytes.

Splits: whole styles are held out (HELD_OUT: 3 example documents, 8 test documents, the rest for the
oracle), and inside the training styles whole documents are held out (sha256 of "style/NNNN" % 5 == 0).
Reserved for evaluation and refused by construction: any Bible text and The Devil's Dictionary.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hnkit.errors import HnkitError, first_line  # noqa: E402
from hnkit.util import cache_root  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
DICTD = Path("/usr/share/dictd")
JOIN_BYTES = 1800  # entries are joined into one document while it stays under this
DOC_BYTES = 2000  # no document is longer; a longer entry is cut at a line break or sentence end
MIN_DOCS = 24  # a style with fewer documents is not used
MAX_DOCS = 200  # a style keeps its first 200 documents (~340 KB): the big sources do not swamp the rest
N_EXAMPLE, N_TEST = 3, 8  # held-out styles: example and test documents, the rest for the oracle
MIN_TRAIN_STYLES, MIN_HELDOUT_STYLES = 40, 10
GCIDE_PER_LETTER = 20  # GCIDE is huge: its first 20 entries of each initial letter, as one style

# The licence of each package's texts, as /usr/share/doc/<package>/copyright states it.
LICENCES = {
    "fortunes": "BSD-3-clause (fortune-mod)",
    "fortunes-min": "BSD-3-clause (fortune-mod)",
    "fortunes-bofh-excuses": "public-domain",
    "fortunes-debian-hints": "BSD-3-clause",
    "fortune-anarchism": "public-domain",
    "fortunes-mario": "GPL-2+",
    "fortunes-de": "GPL-2+",
    "fortunes-es": "public-domain (texts, as the package states)",
    "fortunes-it": "public-domain (as the package states)",
    "dict-jargon": "public-domain",
    "dict-foldoc": "GFDL-1.1+",
    "dict-gcide": "GPL-2+",
}
NEUTRAL = {"source": "python:pydoc_data/topics.py", "licence": "PSF-2.0"}

# Never read: these texts are kept for evaluation only (The Devil's Dictionary is the quality bench's
# corpus; any Bible translation is the generator's untouched test). Matched on the package's and the
# file's name, so a SWORD module or another packaging of either is refused too.
RESERVED_WORDS = {"bible", "kjv", "web", "asv", "sword", "devil"}


@dataclass(frozen=True)
class Source:
    style: str
    package: str
    kind: str  # "fortune": a fortune file under the fortunes folder; "dictd": NAME.index + NAME.dict.dz
    file: str
    per_letter: int = 0  # dictd: at most this many entries of each initial letter (0: all)

    def paths(self, roots: dict[str, Path]) -> list[Path]:
        if self.kind == "fortune":
            return [roots["fortune"] / self.file]
        return [roots["dictd"] / f"{self.file}.index", roots["dictd"] / f"{self.file}.dict.dz"]

    @property
    def name(self) -> str:
        return f"{self.package}:{self.file}"


def _fortunes(package: str, files: str, prefix: str = "fortune-") -> list[Source]:
    """One style per fortune file: "computers" -> fortune-computers, "de/witze" -> fortune-de-witze."""
    def style(file):
        return prefix + re.sub(r"[^a-z0-9]+", "-", file.removesuffix(".fortunes").lower()).strip("-")
    return [Source(style(f), package, "fortune", f) for f in files.split()]


# English first, so that fortunes-min's duplicates of fortunes' entries are the ones dropped.
# Not used: ascii-art files (fortunes ascii-art, mario.arteascii, de/asciiart, it/banner) and any
# offensive ("off") folder. English files too small for MIN_DOCS are listed anyway (dropped with a
# note); of the other languages only the files with enough text are listed.
SOURCES = [
    *_fortunes("fortunes", "art computers cookie debian definitions disclaimer drugs education ethnic food "
               "goedel humorists kids knghtbrd law linux linuxcookie love magic medicine men-women "
               "miscellaneous news paradoxum people perl pets platitudes politics pratchett science "
               "songs-poems sports startrek tao translate-me wisdom work zippy"),
    *_fortunes("fortunes-min", "fortunes literature riddles"),
    *_fortunes("fortunes-bofh-excuses", "bofh-excuses"),
    *_fortunes("fortunes-debian-hints", "debian-hints"),
    *_fortunes("fortune-anarchism", "anarchism"),
    Source("jargon", "dict-jargon", "dictd", "jargon"),
    Source("foldoc", "dict-foldoc", "dictd", "foldoc"),
    Source("gcide", "dict-gcide", "dictd", "gcide", per_letter=GCIDE_PER_LETTER),
    # other languages: training styles only
    *_fortunes("fortunes-mario", "mario.computadores mario.geral mario.piadas mario.anagramas", "fortune-pt-"),
    *_fortunes("fortunes-de", "de/computer de/fussball de/hauptgericht de/infodrom de/linuxtag de/mathematiker "
               "de/ms de/namen de/regeln de/sprueche de/unfug de/witze de/woerterbuch de/zitate"),
    *_fortunes("fortunes-es", "es/arte.fortunes es/ciencia.fortunes es/humanos.fortunes es/leydemurphy.fortunes "
               "es/poder.fortunes es/refranes.fortunes es/sabiduria.fortunes es/sentimientos.fortunes "
               "es/varios.fortunes es/vida.fortunes"),
    *_fortunes("fortunes-it", "it/computer it/italia it/itatrek it/leggi it/luke it/luttazzi it/norm "
               "it/paolotedeschi it/zuse"),
]

# Held-out styles: fixed once, for diversity, before anything was measured on them; all English.
# A dictionary (GCIDE: Webster 1913's definitions; Jargon and FOLDOC stay to train on), verse
# (songs-poems), jokes and quips (men-women), aphorisms (wisdom), technical humour (computers),
# politics (politics), the law (law), science (science), Taoist verse (tao: the Tao Te Ching, adapted)
# and quotations about people (people). Zippy's non sequiturs were the first choice, but have too few
# documents (22); the counts of documents are all that was looked at.
HELD_OUT = ("gcide", "fortune-songs-poems", "fortune-men-women", "fortune-wisdom", "fortune-computers",
            "fortune-politics", "fortune-law", "fortune-science", "fortune-tao", "fortune-people")


def reserved(source: Source) -> bool:
    words = set(re.split(r"[^a-z0-9]+", f"{source.package} {source.file}".lower()))
    return bool(words & RESERVED_WORDS) or "bible" in source.name.lower()


def check_sources(sources: list[Source]) -> None:
    """Refuse a reserved source before anything is read, and a style name that is not [a-z0-9-]."""
    for source in sources:
        if reserved(source):
            raise HnkitError(f"{source.name}: reserved for evaluation (Bible texts, The Devil's Dictionary); "
                             "never part of the style library")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", source.style) or source.style == "neutral":
            raise HnkitError(f"{source.name}: bad style name {source.style!r} (lower-case letters, digits, -)")
        if source.package not in LICENCES:
            raise HnkitError(f"{source.name}: no licence recorded for {source.package}")


def missing_packages(sources: list[Source], roots: dict[str, Path]) -> list[str]:
    return sorted({s.package for s in sources if not all(p.is_file() for p in s.paths(roots))})


# -- reading the sources ------------------------------------------------------------------------------
def clean(text: str) -> str:
    """Text only: overstrikes ("_\\bx", bold and underline of old terminals) and control characters
    out, trailing spaces off each line, blank lines off both ends."""
    while "\x08" in text:
        text, n = re.subn(r"[^\x08\n]\x08", "", text)
        if not n:
            text = text.replace("\x08", "")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def is_art(text: str) -> bool:
    """Mostly ASCII art: under half of the visible characters are letters or digits."""
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalnum() for c in visible) < len(visible) / 2


def fortune_entries(path: Path) -> list[str]:
    """The entries of a fortune file (separated by lines "%"), as the file has them, attributions kept."""
    text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
    return [clean(entry) for entry in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)]


def dictd_entries(index: Path, data: Path, per_letter: int = 0) -> list[str]:
    """A dictd database's entries in the dictionary's own order (the headwords that share one entry
    give it once; the database's own "00-database" entries left out). ``per_letter``: at most that many
    entries of each initial letter, so that a huge dictionary is read in part."""
    spans = index_spans(index, per_letter)
    try:
        with gzip.open(data) as f:  # dictzip is gzip; read forward in offset order, never the whole file
            return [clean(_read_at(f, start, length).decode("utf-8", errors="replace")) for start, length in spans]
    except (OSError, EOFError) as exc:
        raise HnkitError(f"{data}: not a dictd data file ({first_line(exc)})") from None


def index_spans(index: Path, per_letter: int = 0) -> list[tuple[int, int]]:
    """The (offset, length) of the entries a dictd index lists, in offset order."""
    from bench_quality import _dict_number  # dictd's base-64 numbers, as the quality bench reads them

    spans, counts = set(), {}
    for n, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            word, offset, length = line.split("\t")[:3]
            span = (_dict_number(offset), _dict_number(length))
        except ValueError:
            raise HnkitError(f"{index}: line {n} is not a dictd index line (WORD, OFFSET, LENGTH)") from None
        letter = word[:1].lower()
        if word.lower().startswith(("00database", "00-")) or span in spans:
            continue
        if not per_letter or counts.get(letter, 0) < per_letter:
            spans.add(span)
            counts[letter] = counts.get(letter, 0) + 1
    return sorted(spans)


def _read_at(f, start: int, length: int) -> bytes:
    f.seek(start)
    return f.read(length)


def read_entries(source: Source, roots: dict[str, Path]) -> list[str]:
    if source.kind == "fortune":
        return fortune_entries(*source.paths(roots))
    return dictd_entries(*source.paths(roots), per_letter=source.per_letter)


# -- documents ----------------------------------------------------------------------------------------
def cut(text: str, limit: int = DOC_BYTES) -> str:
    """``text`` if it fits in ``limit`` bytes of UTF-8; else cut at its last line break before the
    limit, else its last sentence end, else its last space."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    head = data[:limit].decode("utf-8", errors="ignore")
    for pattern in (r"\n", r"[.!?][\"')\]]*\s", r"\s"):
        ends = [m.end() for m in re.finditer(pattern, head)]
        if ends and ends[-1] > limit // 4:
            return head[:ends[-1]].rstrip()
    return head


def pack(entries: list[str]) -> list[str]:
    """Consecutive entries joined by a blank line while the document stays within JOIN_BYTES; each
    entry cut to DOC_BYTES first, so that no document is longer than DOC_BYTES."""
    docs, current = [], ""
    for entry in entries:
        entry = cut(entry)
        joined = f"{current}\n\n{entry}" if current else entry
        if current and len(joined.encode("utf-8")) > JOIN_BYTES:
            docs.append(current)
            joined = entry
        current = joined
    return docs + [current] if current else docs


def style_documents(sources: list[Source], roots: dict[str, Path]) -> dict[str, list[str]]:
    """style -> its documents; entries that are empty, ASCII art or seen before (in SOURCES order) dropped."""
    seen, styles = set(), {}
    for source in sources:
        entries = []
        for entry in read_entries(source, roots):
            if entry.strip() and not is_art(entry) and entry not in seen:
                seen.add(entry)
                entries.append(entry)
        styles[source.style] = pack(entries)[:MAX_DOCS]
    return styles


def neutral_documents() -> dict[str, list[str]]:
    """Python's reference manual topics, split by topic as the quality bench splits them (its "test"
    topics measure neutral perplexity, the others feed prior preservation). The topics are long, so
    each group is packed paragraph by paragraph (not cut as style entries are): no text is lost."""
    from bench_quality import _held_out
    from pydoc_data.topics import topics

    groups = {"preserve": [], "test": []}
    for name in sorted(topics):
        groups["test" if _held_out(name, 2) else "preserve"] += topics[name].strip().split("\n\n")
    return {group: pack(paragraphs) for group, paragraphs in groups.items()}


# -- splits -------------------------------------------------------------------------------------------
def doc_hash(style: str, name: str) -> int:
    return int(hashlib.sha256(f"{style}/{name}".encode()).hexdigest(), 16)


def split(style: str, names: list[str], held_out: bool) -> dict[str, list[str]]:
    """Held-out style: the first 3 documents in hash order are examples, the next 8 test, the rest
    train (the oracle's). Training style: hash % 5 == 0 is test (at least 2), the rest train."""
    order = sorted(names, key=lambda n: doc_hash(style, n))
    if held_out:
        example, test = order[:N_EXAMPLE], order[N_EXAMPLE:N_EXAMPLE + N_TEST]
    else:
        example, test = [], [n for n in order if doc_hash(style, n) % 5 == 0]
        test += [n for n in order if n not in test][:max(0, 2 - len(test))]
    train = [n for n in names if n not in example and n not in test]
    return {"train": sorted(train), "test": sorted(test), "example": sorted(example)}


# -- the library ----------------------------------------------------------------------------------
def write_docs(folder: Path, docs: list[str]) -> list[str]:
    folder.mkdir()
    names = [f"{i:04d}.txt" for i in range(len(docs))]
    for name, doc in zip(names, docs):
        (folder / name).write_bytes(doc.encode("utf-8"))
    return names


def build(out: Path, sources: list[Source] = SOURCES, roots: dict[str, Path] | None = None,
          held_out: tuple[str, ...] = HELD_OUT, minimums: tuple[int, int] = (MIN_TRAIN_STYLES, MIN_HELDOUT_STYLES),
          log=print) -> dict:
    """Write the library into the new folder ``out`` and return its manifest. Everything is checked
    (reserved and missing sources, enough styles) before ``out`` is made."""
    roots = roots or {"fortune": FORTUNES, "dictd": DICTD}
    check_sources(sources)
    missing = missing_packages(sources, roots)
    if missing:
        raise HnkitError(f"style library: missing Debian package(s) {', '.join(missing)}: "
                         f"apt-get install {' '.join(missing)}, or run with --install")
    docs = {}
    for style, found in style_documents(sources, roots).items():
        if len(found) >= MIN_DOCS:
            docs[style] = found
        else:
            log(f"skipped {style}: {len(found)} documents, fewer than {MIN_DOCS}")
    check_counts([style in held_out for style in docs], minimums)
    out.mkdir()
    by_style, styles = {s.style: s for s in sources}, {}
    for style in sorted(docs):
        source, names = by_style[style], write_docs(out / style, docs[style])
        styles[style] = {"split": "heldout" if style in held_out else "train", "source": source.name,
                         "licence": LICENCES[source.package], "docs": split(style, names, style in held_out)}
    neutral = neutral_documents()
    names = write_docs(out / "neutral", neutral["preserve"] + neutral["test"])
    n = len(neutral["preserve"])
    manifest = {"version": 1, "styles": styles,
                "neutral": {**NEUTRAL, "docs": {"preserve": names[:n], "test": names[n:]}}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def check_counts(held: list[bool], minimums: tuple[int, int]) -> None:
    n_train, n_held = held.count(False), held.count(True)
    if n_train < minimums[0] or n_held < minimums[1]:
        raise HnkitError(f"style library: {n_train} training and {n_held} held-out styles with at least "
                         f"{MIN_DOCS} documents; it needs at least {minimums[0]} and {minimums[1]}")


# -- the command ----------------------------------------------------------------------------------
def complete(out: Path) -> bool:
    try:
        return json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("version") == 1
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(out: Path) -> None:
    """Only a style library (a folder with a manifest.json) or an empty folder is ever replaced."""
    if out.exists() and not out.is_dir():
        raise HnkitError(f"--out {out}: is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise HnkitError(f"--out {out}: a folder that is not a style library (no manifest.json); "
                         "choose another --out")


def install(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        print("$", " ".join(command), flush=True)
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True)
        except OSError as exc:
            raise HnkitError(f"--install: cannot run apt-get ({exc.strerror}); install {' '.join(packages)}") from None
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]
            raise HnkitError(f"--install: {' '.join(command)} failed: {last}")


def build_atomically(out: Path, roots: dict[str, Path], **spec) -> dict:
    """Build in a temporary folder beside ``out``, then swap it in (the old library, if any, goes).
    ``spec``: build's sources, held_out and minimums (the tests' small libraries)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = build(tmp / "library", roots=roots, **spec)
        if out.exists():
            os.rename(out, tmp / "old")
        os.rename(tmp / "library", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def show(manifest: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"style library: {out}")
    for column in ("style", "split", "source", "documents", "KB"):
        table.add_column(column, justify="right" if column in ("documents", "KB") else "left", overflow="fold")
    rows = [(name, s["split"], s["source"], sum(s["docs"].values(), [])) for name, s in manifest["styles"].items()]
    rows.append(("neutral", "neutral", manifest["neutral"]["source"], sum(manifest["neutral"]["docs"].values(), [])))
    total = [0, 0]
    for name, kind, source, docs in rows:
        size = sum((out / name / doc).stat().st_size for doc in docs)
        table.add_row(name, kind, source, str(len(docs)), f"{size / 1000:.0f}")
        total = [total[0] + len(docs), total[1] + size]
    Console(width=max(Console().width, 110)).print(table)
    held = sum(s["split"] == "heldout" for s in manifest["styles"].values())
    print(f"{len(manifest['styles']) - held} training styles, {held} held-out styles; "
          f"{total[0]} documents, {total[1] / 1e6:.1f} MB (with the neutral ones)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the library's folder (default: $HNKIT_CACHE/styles, ~/.cache/hnkit/styles)")
    p.add_argument("--install", action="store_true", help="apt-get install the Debian packages that are missing")
    p.add_argument("--force", action="store_true", help="rebuild even when a complete library is there")
    p.add_argument("--fortunes", default=str(FORTUNES), help=f"the fortune files' folder (default {FORTUNES})")
    p.add_argument("--dictd", default=str(DICTD), help=f"the dictd databases' folder (default {DICTD})")
    return p.parse_args(argv)


def run(args, **spec) -> None:
    out = Path(args.out).expanduser() if args.out else cache_root() / "styles"
    if complete(out) and not args.force:
        print(f"{out}: the style library is already there (--force rebuilds it)")
        return
    check_replaceable(out)
    roots = {"fortune": Path(args.fortunes), "dictd": Path(args.dictd)}
    sources = spec.get("sources", SOURCES)
    check_sources(sources)
    if args.install and missing_packages(sources, roots):
        install(missing_packages(sources, roots))
    show(build_atomically(out, roots, **spec), out)


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except HnkitError as exc:
        print(f"build_style_library: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
