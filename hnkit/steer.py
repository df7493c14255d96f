"""Steering a story model with styles: ``steer()``, ``StyleLibrary`` and strength schedules.

``steer`` is ``attach`` with friendlier input: styles may be Hypernetwork objects, file paths or
names in a :class:`StyleLibrary`, given as one style or as a mapping ``{style: strength}``.
Strengths may be negative (steer away from a style) or above 1.

    library = hnkit.StyleLibrary("styles/")
    with hnkit.steer(model, {"noir": 0.8, "whimsy": -0.3}, library=library, schedule=hnkit.fade_in(50)):
        model.generate(...)
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from .attach import Attachment, attach
from .errors import HnkitError
from .hypernetwork import Hypernetwork

STYLE_SUFFIXES = (".safetensors", ".pt", ".pth")
# The bound on a strength that hnkit's commands accept (``hnkit serve`` requests, ``generate-text``):
# beyond it a style is noise. ``steer`` and ``attach`` take any strength.
MAX_STRENGTH = 4.0


def check_strength(value: float, what: str) -> None:
    """Refuse a strength that is not a number in [-MAX_STRENGTH, MAX_STRENGTH], naming ``what`` it is."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise HnkitError(f"{what}: strength {value!r} is not a number in [{-MAX_STRENGTH:g}, {MAX_STRENGTH:g}]")
    if not -MAX_STRENGTH <= value <= MAX_STRENGTH:
        raise HnkitError(f"{what}: strength {value:g} is outside [{-MAX_STRENGTH:g}, {MAX_STRENGTH:g}] "
                         "(beyond it a style is noise)")


# -- schedules -----------------------------------------------------------------------------------
# A schedule maps the token index (tokens generated before a forward pass; the prompt pass is 0) to
# a factor on every strength. Plain functions work too; these are the common shapes.
class _Schedule:
    def __init__(self, text: str, fn):
        self.text, self.fn = text, fn

    def __call__(self, index: int) -> float:
        return self.fn(index)

    def __repr__(self) -> str:
        return self.text


def fade_in(tokens: int, start: int = 0):
    """0 until token ``start``, then rising linearly to 1 over ``tokens`` tokens:
    ``factor(i) = clamp((i - start) / tokens, 0, 1)``. ``fade_in(50)``: the prompt and the first
    token get none of the style, token 50 and later all of it."""
    if tokens <= 0:
        raise HnkitError(f"fade_in needs a positive number of tokens, got {tokens}")
    return _Schedule(f"fade_in({tokens}, start={start})", lambda i: min(1.0, max(0.0, (i - start) / tokens)))


def fade_out(tokens: int, start: int = 0):
    """1 until token ``start``, then falling linearly to 0 over ``tokens`` tokens."""
    up = fade_in(tokens, start)
    return _Schedule(f"fade_out({tokens}, start={start})", lambda i: 1.0 - up(i))


def after(tokens: int):
    """0 for the prompt and the first ``tokens`` generated tokens, 1 from then on: the beginning
    follows the base model exactly, the style takes over afterwards."""
    return _Schedule(f"after({tokens})", lambda i: 1.0 if i >= tokens else 0.0)


# -- a folder of styles --------------------------------------------------------------------------
def _signature(entry: os.DirEntry) -> tuple[int, int, int]:
    """What tells one version of a file from another: size, modification time and inode (a file put
    in place by a rename is a new inode, even within the clock's resolution)."""
    st = entry.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _by_stem(files) -> dict[str, list[str]]:
    stems: dict[str, list[str]] = {}
    for name in sorted(files):
        stems.setdefault(Path(name).stem, []).append(name)
    return stems


def _info_of(hn: Hypernetwork) -> dict:
    return {"description": hn.description or "", "base_model": hn.base_model}


class StyleLibrary(Mapping):
    """The hypernetworks in a folder (``.safetensors`` and the web UI's ``.pt``), by file stem.

    Files are read when first asked for and kept: ``library["noir"]``, ``list(library)``,
    ``"noir" in library``; with ``max_loaded``, only that many (the least recently used are dropped
    and read again when asked for). A name with both a ``.pt`` and a ``.safetensors`` file is
    ambiguous and refused when used (pass the path instead). Hidden files (``.*``: hnkit writes
    there before its atomic rename) are no styles.

    The folder is listed once; :meth:`refresh` lists it again (``hnkit serve`` polls it). A file
    added or replaced since counts once it is complete: when two listings in a row saw the same
    size, time and inode (until then its name keeps the file it had); a file removed goes at once."""

    def __init__(self, folder: str | os.PathLike, max_loaded: int | None = None):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise HnkitError(f"{folder}: no such folder of styles")
        self.max_loaded = max_loaded
        self._lock = threading.Lock()
        self._listing = self._scan()  # file name -> signature, as last seen
        self._skipped: dict[str, tuple] = {}  # name -> the signature it was discarded at
        self._publish(dict(self._listing))  # complete: the folder as it is when the library is made
        self._loaded: OrderedDict[str, tuple] = OrderedDict()  # name -> (signature, network), oldest first
        self._info: dict[str, dict] = {}  # name -> description and base model, from its file
        self.version = 0  # counts the changes :meth:`refresh` and :meth:`discard` made

    def _scan(self) -> dict[str, tuple]:
        with os.scandir(self.folder) as entries:
            return {e.name: _signature(e) for e in entries if e.name.endswith(STYLE_SUFFIXES)
                    and not e.name.startswith(".") and e.is_file()}

    def _publish(self, accepted: dict[str, tuple]) -> None:
        """Make ``accepted`` (file name -> signature) the files in use; skipped names stay out."""
        stems = _by_stem(accepted)
        files = {stem: [self.folder / f for f in names] for stem, names in stems.items()
                 if self._skipped.get(stem) != tuple(accepted[f] for f in names)}
        self._accepted, self._stems, self._files = accepted, stems, files  # each read alone by other threads

    def signature(self, name: str) -> tuple:
        """The signatures of the files a name stands for now (empty: no such file)."""
        accepted = self._accepted
        return tuple(accepted.get(f) for f in self._stems.get(name, ()))

    def path(self, name: str) -> Path:
        files = self._files.get(name)
        if not files:
            known = ", ".join(self._files) or "none"
            raise HnkitError(f"no style named {name!r} in {self.folder} (styles: {known})")
        if len(files) > 1:
            raise HnkitError(f"style {name!r} is ambiguous in {self.folder}: "
                             f"{', '.join(f.name for f in files)}; pass one file's path")
        return files[0]

    def __getitem__(self, name: str) -> Hypernetwork:
        signature = self.signature(name)
        with self._lock:
            kept = self._loaded.get(name)
            if kept is not None and kept[0] == signature:
                self._loaded.move_to_end(name)
                return kept[1]
        hn = self._read(name, self.path(name))
        self._info[name] = _info_of(hn)
        self._keep(name, signature, hn)
        return hn

    def _read(self, name: str, path: Path) -> Hypernetwork:
        from .checkpoint import load

        hn = load(path)
        hn.name = name  # the library's name for it, whatever the file's metadata says
        return hn

    def _keep(self, name: str, signature: tuple, hn: Hypernetwork) -> None:
        with self._lock:
            self._loaded[name] = (signature, hn)
            self._loaded.move_to_end(name)
            while self.max_loaded is not None and len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)

    def info(self, name: str) -> dict:
        """``{"description", "base_model"}`` of a style, from its file's metadata (read once)."""
        info = self._info.get(name)
        return _info_of(self[name]) if info is None else info

    def refresh(self, check=None) -> dict[str, str | None]:
        """List the folder again. Returns the names whose files were added, replaced or removed and
        are complete (the same in this listing and the last), each with None (in use now, or gone)
        or why it is left out: its file does not load, or ``check(name, network)`` raised an
        HnkitError. Each is read here, before the library shows it."""
        listing = self._scan()
        previous, self._listing = self._listing, listing
        accepted = {f: sig for f, sig in listing.items() if previous.get(f) == sig}  # complete
        accepted.update({f: self._accepted[f] for f in listing if f not in accepted and f in self._accepted})
        changed = sorted({Path(f).stem for f in set(accepted) | set(self._accepted)
                          if accepted.get(f) != self._accepted.get(f)})
        stems, reasons, infos = _by_stem(accepted), {}, {}
        for name in changed:
            reasons[name] = None
            if name in stems:
                signature = tuple(accepted[f] for f in stems[name])
                try:
                    infos[name] = _info_of(self._check_new(name, stems[name], signature, check))
                except (HnkitError, OSError) as exc:
                    reasons[name] = str(exc)
                if reasons[name] is not None:
                    self._skipped[name] = signature
        if changed:
            with self._lock:
                for name in changed:
                    if reasons[name] is not None or name not in stems:
                        self._loaded.pop(name, None)
                        self._info.pop(name, None)
                self._publish(accepted)
                self._info.update(infos)  # with the new files' signatures: what the library shows is served
                self.version += 1
        return reasons

    def _check_new(self, name: str, files: list[str], signature: tuple, check) -> Hypernetwork:
        """Read a new or replaced style's file (and ``check`` it), keeping the network."""
        if len(files) > 1:
            raise HnkitError(f"style {name!r} is ambiguous in {self.folder}: {', '.join(files)}")
        hn = self._read(name, self.folder / files[0])
        if check is not None:
            check(name, hn)
        self._keep(name, signature, hn)
        return hn

    def discard(self, name: str) -> None:
        """Leave a style out of this library (``hnkit serve`` drops the files it cannot use) until
        its file changes."""
        with self._lock:
            self._skipped[name] = self.signature(name)
            self._files = {k: v for k, v in self._files.items() if k != name}
            self._loaded.pop(name, None)
            self._info.pop(name, None)
            self.version += 1

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, name) -> bool:
        return name in self._files

    def __repr__(self) -> str:
        return f"StyleLibrary({str(self.folder)!r}, {len(self)} styles)"


# -- resolving styles ----------------------------------------------------------------------------
def resolve_style(style, library: StyleLibrary | str | os.PathLike | None = None) -> Hypernetwork:
    """A Hypernetwork from a Hypernetwork, a file path, or a name in ``library``."""
    if isinstance(style, Hypernetwork):
        return style
    if not isinstance(style, (str, os.PathLike)):
        raise HnkitError(f"a style is a Hypernetwork, a file path or a library name, got {type(style).__name__}")
    if isinstance(library, (str, os.PathLike)):
        library = StyleLibrary(library)
    text = os.fspath(style)
    if library is not None and text in library:
        return library[text]
    path = Path(text).expanduser()
    if path.exists() or path.suffix in STYLE_SUFFIXES or library is None:
        from .checkpoint import load

        return load(path)
    return library[text]  # the library's error lists the names it has


def resolve_styles(styles, strength: float = 1.0, library=None) -> list[tuple[Hypernetwork, float]]:
    """``[(hypernetwork, strength)]`` from one style or a mapping ``{style: strength}`` (in order)."""
    if isinstance(library, (str, os.PathLike)):
        library = StyleLibrary(library)
    if isinstance(styles, Mapping):
        items = list(styles.items())
    elif isinstance(styles, (list, tuple)):
        items = list(styles)
    else:
        items = [(styles, strength)]
    if not items:
        raise HnkitError("steer() needs at least one style")
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise HnkitError(f"a list of styles holds (style, strength) pairs, got {item!r}; "
                             "or pass a mapping {style: strength}")
    return [(resolve_style(style, library), s) for style, s in items]


def steer(model, styles, strength: float = 1.0, *, blend: str = "chain", layers=None, schedule=None,
          library=None) -> Attachment:
    """Steer ``model`` with one style or a mapping ``{style: strength}``.

    A style is a Hypernetwork, a file path, or a name in ``library`` (a StyleLibrary or a folder).
    ``strength`` applies when ``styles`` is a single style. ``blend``, ``layers`` and ``schedule``
    are those of :func:`hnkit.attach`. Returns the Attachment: a context manager, or call
    ``remove()``; strengths change in place with ``set_strength``."""
    entries = resolve_styles(styles, strength, library)
    return attach(model, entries, blend=blend, layers=layers, schedule=schedule)
