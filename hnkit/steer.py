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
    """Refuse a strength outside [-MAX_STRENGTH, MAX_STRENGTH], naming ``what`` it is."""
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
class StyleLibrary(Mapping):
    """The hypernetworks in a folder (``.safetensors`` and the web UI's ``.pt``), by file stem.

    Files are read when first asked for and kept: ``library["noir"]``, ``list(library)``,
    ``"noir" in library``. A name with both a ``.pt`` and a ``.safetensors`` file is ambiguous and
    refused when used (pass the path instead)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise HnkitError(f"{folder}: no such folder of styles")
        self._files: dict[str, list[Path]] = {}
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and path.suffix in STYLE_SUFFIXES and not path.name.startswith("."):
                self._files.setdefault(path.stem, []).append(path)
        self._loaded: dict[str, Hypernetwork] = {}

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
        if name not in self._loaded:
            from .checkpoint import load

            hn = load(self.path(name))
            hn.name = name  # the library's name for it, whatever the file's metadata says
            self._loaded[name] = hn
        return self._loaded[name]

    def discard(self, name: str) -> None:
        """Leave a style out of this library (``hnkit serve`` drops the files it cannot use)."""
        self._files.pop(name, None)
        self._loaded.pop(name, None)

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
