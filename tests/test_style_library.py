"""scripts/build_style_library.py (issue 26): the style library, built here from small synthetic
fortune files and dictd databases in tmp_path (one test reads the real Debian packages, where installed)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hnkit.errors import HnkitError

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import build_style_library as lib  # noqa: E402
from build_style_library import Source  # noqa: E402

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# -- synthetic sources --------------------------------------------------------------------------------
def b64(n: int) -> str:
    out = B64[n % 64]
    while n >= 64:
        n //= 64
        out = B64[n % 64] + out
    return out


def write_fortunes(path: Path, entries: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{e}\n%\n" for e in entries), encoding="utf-8")


def write_dictd(folder: Path, name: str, entries: list[tuple[list[str], str]]) -> None:
    """A dictd database: each entry's text under one or more headwords."""
    folder.mkdir(parents=True, exist_ok=True)
    data, index = b"", []
    for words, text in entries:
        raw = text.encode("utf-8")
        index += [f"{w}\t{b64(len(data))}\t{b64(len(raw))}" for w in words]
        data += raw
    (folder / f"{name}.index").write_text("\n".join(sorted(index)) + "\n", encoding="utf-8")
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data, mtime=0))


def sentence(style: str, i: int) -> str:
    return f"Entry {i} of {style}: a line of text in its own manner, number {i}.\n\t\t-- Someone {i % 7}"


@pytest.fixture
def small(tmp_path):
    """Roots and sources: four fortune styles of ~30 documents, one too small, one dictionary."""
    roots = {"fortune": tmp_path / "fortunes", "dictd": tmp_path / "dictd"}
    sources = []
    for style, n in [("alpha", 600), ("beta", 600), ("gamma", 600), ("delta", 600), ("tiny", 40)]:
        write_fortunes(roots["fortune"] / style, [sentence(style, i) for i in range(n)])
        sources.append(Source(f"fortune-{style}", "fortunes", "fortune", style))
    write_dictd(roots["dictd"], "lex", [(["00-database-info"], "about this database"),
                                       *[([f"word{i}", f"Word{i}"], f"word{i}\n   n. meaning {i} " + "x" * 300)
                                         for i in range(200)]])
    sources.append(Source("lex", "dict-jargon", "dictd", "lex"))
    spec = {"sources": sources, "held_out": ("fortune-delta",), "minimums": (3, 1)}
    return roots, spec


def build(out, roots, spec):
    return lib.build(out, roots=roots, log=lambda *a: None, **spec)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- documents ----------------------------------------------------------------------------------------
def test_documents_joined_up_to_the_bound_and_long_entries_cut():
    short = ["é" * 50 + f" {i}" for i in range(100)]  # 100 bytes of UTF-8 each
    long_lines = "\n".join(f"line {i} " + "ü" * 40 for i in range(60))  # ~5 KB, many line breaks
    docs = lib.pack(short[:30] + [long_lines] + short[30:])
    assert all(len(d.encode("utf-8")) <= lib.DOC_BYTES for d in docs)
    assert docs[0] == "\n\n".join(short[:len(docs[0].split("\n\n"))])  # joined with a blank line
    assert all(len(d.encode("utf-8")) > lib.JOIN_BYTES - 110 for d in docs[:1])  # filled up to ~1,800
    cut = next(d for d in docs if d.startswith("line 0"))
    assert long_lines.startswith(cut) and long_lines[len(cut)] == "\n"  # cut at a line break
    assert len(cut.encode("utf-8")) > 1900
    assert sum(len(d.split("\n\n")) for d in docs) >= 101  # every short entry kept, none merged away


def test_an_entry_without_line_breaks_is_cut_at_a_sentence_end():
    text = " ".join(f"Sentence number {i} says something." for i in range(200))
    cut = lib.cut(text)
    assert cut.endswith(".") and text.startswith(cut) and len(cut.encode()) <= lib.DOC_BYTES


def test_fortune_text_is_kept_with_attribution_but_overstrikes_and_art_go(tmp_path):
    write_fortunes(tmp_path / "f", ["whiter teeth *___\b\b\band* fresher breath\n\t\t-- Dave Barry",
                                    "Ring\x07 the bell  ", "", "  /\\_/\\\n ( o.o )\n  > ^ <  ||| ---"])
    entries = lib.fortune_entries(tmp_path / "f")
    assert entries[0] == "whiter teeth *and* fresher breath\n\t\t-- Dave Barry"
    assert entries[1] == "Ring the bell"
    assert lib.is_art(entries[3]) and not lib.is_art(entries[0]) and not lib.is_art("42")


def test_dictd_reader_skips_metadata_and_shared_headwords_and_bounds_each_letter(tmp_path):
    write_dictd(tmp_path, "d", [(["00-database-short"], "meta"), (["apple", "Apple"], "apple text"),
                                (["avocado"], "avocado text"), (["axe"], "axe text"), (["bee"], "bee text")])
    assert lib.dictd_entries(tmp_path / "d.index", tmp_path / "d.dict.dz") == [
        "apple text", "avocado text", "axe text", "bee text"]
    assert lib.dictd_entries(tmp_path / "d.index", tmp_path / "d.dict.dz", per_letter=2) == [
        "apple text", "avocado text", "bee text"]


# -- the library ----------------------------------------------------------------------------------
def test_two_builds_are_byte_identical(small, tmp_path):
    roots, spec = small
    build(tmp_path / "one", roots, spec)
    build(tmp_path / "two", roots, spec)
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert one == two and len(one) > 100


def test_splits_are_disjoint_and_complete_and_held_out_styles_never_train(small, tmp_path):
    roots, spec = small
    manifest = build(tmp_path / "lib", roots, spec)
    assert manifest["version"] == 1
    assert {n: s["split"] for n, s in manifest["styles"].items()} == {
        "fortune-alpha": "train", "fortune-beta": "train", "fortune-gamma": "train", "lex": "train",
        "fortune-delta": "heldout"}
    for name, style in manifest["styles"].items():
        docs = style["docs"]
        on_disk = sorted(p.name for p in (tmp_path / "lib" / name).iterdir())
        assert sorted(docs["train"] + docs["test"] + docs["example"]) == on_disk  # complete...
        assert len(set(docs["train"] + docs["test"] + docs["example"])) == len(on_disk)  # ...and disjoint
        if style["split"] == "train":
            assert docs["example"] == [] and len(docs["test"]) >= 2
            assert all(lib.doc_hash(name, d) % 5 == 0 for d in docs["test"])
        else:
            assert (len(docs["example"]), len(docs["test"])) == (3, 8)
        assert all(len((tmp_path / "lib" / name / d).read_bytes()) <= lib.DOC_BYTES for d in on_disk)
    held = {p.read_bytes() for p in (tmp_path / "lib" / "fortune-delta").iterdir()}
    trained = {p.read_bytes() for n, s in manifest["styles"].items() if s["split"] == "train"
               for p in (tmp_path / "lib" / n).iterdir()}
    assert held and not held & trained
    neutral = manifest["neutral"]["docs"]
    assert neutral["preserve"] and neutral["test"] and not set(neutral["preserve"]) & set(neutral["test"])
    assert sorted(neutral["preserve"] + neutral["test"]) == sorted(p.name for p in (tmp_path / "lib/neutral").iterdir())
    assert json.loads((tmp_path / "lib/manifest.json").read_text()) == manifest


def test_a_style_with_too_few_documents_is_dropped(small, tmp_path):
    roots, spec = small
    said = []
    manifest = lib.build(tmp_path / "lib", roots=roots, log=said.append, **spec)
    assert "fortune-tiny" not in manifest["styles"] and not (tmp_path / "lib/fortune-tiny").exists()
    assert any("fortune-tiny" in line and "fewer than 24" in line for line in said)


@pytest.mark.parametrize("source", [
    Source("devil", "dict-devil", "dictd", "devil"),  # The Devil's Dictionary
    Source("kjv", "sword-text-kjv", "fortune", "kjv"),  # a SWORD Bible module
    Source("fortune-psalms", "fortunes", "fortune", "bible/psalms"),  # a Bible text under another package
])
def test_reserved_sources_are_refused_before_anything_is_read(small, tmp_path, source):
    roots, spec = small
    with pytest.raises(HnkitError, match="reserved for evaluation"):
        build(tmp_path / "lib", roots, {**spec, "sources": [*spec["sources"], source]})
    assert not (tmp_path / "lib").exists()
    lib.check_sources(lib.SOURCES)  # the real list has none of them


def test_too_few_styles_is_one_line_and_writes_nothing(small, tmp_path):
    roots, spec = small
    with pytest.raises(HnkitError, match="4 training and 1 held-out styles"):
        build(tmp_path / "lib", roots, {**spec, "minimums": (40, 10)})
    assert not (tmp_path / "lib").exists()


def test_an_existing_library_is_kept_unless_force(small, tmp_path, capsys):
    roots, spec = small
    out = tmp_path / "cache" / "styles"
    args = ["--out", str(out), "--fortunes", str(roots["fortune"]), "--dictd", str(roots["dictd"])]
    lib.run(lib.parse_args(args), **spec)
    assert "fortune-alpha" in capsys.readouterr().out  # the table
    (out / "mine.txt").write_text("kept")
    lib.run(lib.parse_args(args), **spec)
    assert "already there" in capsys.readouterr().out and (out / "mine.txt").exists()
    lib.run(lib.parse_args([*args, "--force"]), **spec)
    assert not (out / "mine.txt").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["styles"]  # no temporary folder left beside it


def test_a_folder_that_is_not_a_library_is_never_replaced(small, tmp_path):
    roots, spec = small
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    args = ["--out", str(out), "--force", "--fortunes", str(roots["fortune"]), "--dictd", str(roots["dictd"])]
    with pytest.raises(HnkitError, match="not a style library"):
        lib.run(lib.parse_args(args), **spec)
    assert files(out) == {"todo.txt": b"mine"}


def test_a_missing_package_is_one_line_naming_it_and_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run([sys.executable, str(SCRIPTS / "build_style_library.py"), "--out", str(tmp_path / "lib"),
                          "--fortunes", str(empty), "--dictd", str(empty)],
                         capture_output=True, text=True, env={**os.environ, "HNKIT_CACHE": str(tmp_path)})
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert "fortunes-bofh-excuses" in run.stderr and "dict-jargon" in run.stderr and "--install" in run.stderr
    assert not (tmp_path / "lib").exists()


# -- the real packages ----------------------------------------------------------------------------
def test_the_fixed_held_out_styles_are_english_and_usable_from_the_real_packages():
    by_style = {s.style: s for s in lib.SOURCES}
    held = [by_style[name] for name in lib.HELD_OUT]
    assert len(held) >= lib.MIN_HELDOUT_STYLES
    assert all(s.package in ("fortunes", "fortunes-min", "dict-gcide", "dict-jargon") for s in held)  # English
    roots = {"fortune": lib.FORTUNES, "dictd": lib.DICTD}
    missing = lib.missing_packages(held, roots)
    if missing:
        pytest.skip(f"Debian packages not installed: {' '.join(missing)} (or run the script with --install)")
    docs = lib.style_documents(held, roots)
    assert all(len(d) >= lib.MIN_DOCS for d in docs.values()), {k: len(v) for k, v in docs.items()}
    assert all(len(doc.encode("utf-8")) <= lib.DOC_BYTES for d in docs.values() for doc in d)


def test_entries_seen_in_an_earlier_source_empty_or_ascii_art_are_dropped(small, tmp_path):
    roots, _ = small
    art = "   _____\n  / o o \\\n (   ^   )  ~~~\n  \\_===_/"
    write_fortunes(roots["fortune"] / "min", [sentence("alpha", i) for i in range(300)] + [" \n", art, "only here"])
    sources = [Source("fortune-alpha", "fortunes", "fortune", "alpha"),
               Source("fortune-min", "fortunes-min", "fortune", "min")]
    docs = lib.style_documents(sources, roots)
    assert docs["fortune-min"] == ["only here"] and len(docs["fortune-alpha"]) > 24


def test_install_runs_apt_get_for_the_missing_packages_only(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'  # records its calls; install fails
                                     '[ "$1" = update ] || { echo "E: no such package" >&2; exit 100; }\n')
    (bin_dir / "apt-get").chmod(0o755)
    roots = {"fortune": tmp_path / "f", "dictd": tmp_path / "d"}
    write_dictd(roots["dictd"], "jargon", [(["a"], "a")])  # dict-jargon is there
    run = subprocess.run([sys.executable, str(SCRIPTS / "build_style_library.py"), "--install", "--out",
                          str(tmp_path / "lib"), "--fortunes", str(roots["fortune"]), "--dictd", str(roots["dictd"])],
                         capture_output=True, text=True,
                         env={**os.environ, "HNKIT_CACHE": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "apt-get install -y" in run.stderr and "E: no such package" in run.stderr
    update, install = calls.read_text().splitlines()
    assert update == "update" and install.startswith("install -y ")
    assert "fortunes-bofh-excuses" in install.split() and "dict-jargon" not in install.split()
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize("damage", ["index", "data"])
def test_a_damaged_dictd_database_is_one_line(small, tmp_path, damage):
    roots, spec = small
    if damage == "index":
        (roots["dictd"] / "lex.index").write_text("word-without-offsets\n")
    else:
        (roots["dictd"] / "lex.dict.dz").write_bytes(b"not gzip at all" * 10)
    with pytest.raises(HnkitError, match="lex.index: line 1 is not a dictd index" if damage == "index"
                       else "lex.dict.dz: not a dictd data file") as err:
        build(tmp_path / "lib", roots, spec)
    assert "\n" not in str(err.value) and not (tmp_path / "lib").exists()
