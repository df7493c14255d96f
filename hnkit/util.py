"""Small helpers shared across hnkit: atomic file writes, the cache folder, ``FILE[:STRENGTH]``
arguments and the device a command runs on."""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import torch

from .errors import HnkitError


# -- files ---------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    if path.is_dir():
        raise HnkitError(f"{path}: is a directory, expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def cache_root() -> Path:
    """Where tokenized text and encoded images are kept: ``$HNKIT_CACHE``, else ``~/.cache/hnkit``."""
    return Path(os.environ.get("HNKIT_CACHE", "~/.cache/hnkit")).expanduser()


# -- FILE[:STRENGTH] on the command line ---------------------------------------------------------
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", re.IGNORECASE)


def parse_style_arg(text: str, default: float = 1.0) -> tuple[str, float]:
    """``"noir.pt:0.6"`` -> ``("noir.pt", 0.6)``, for every ``FILE[:STRENGTH]`` option of the CLI.
    Only a trailing ``:number`` is a strength, so ``C:/styles/noir.pt`` and ``a:b.safetensors`` are
    plain paths, and a name that exists as a file as a whole is never split."""
    if Path(text).is_file():
        return text, default
    head, sep, tail = text.rpartition(":")
    if sep and head and _NUMBER.fullmatch(tail.strip()):
        value = float(tail)
        if not math.isfinite(value):
            raise HnkitError(f"{text}: bad strength {tail!r}, expected a finite number")
        return head, value
    if sep and head and Path(head).is_file():
        raise HnkitError(f"{text}: bad strength {tail!r}, expected a number such as {head}:0.7")
    return text, default


# -- devices -------------------------------------------------------------------------------------
def choose_device(name: str | None = None) -> torch.device:
    """The device of a ``--device`` option: ``name`` (cpu, cuda, cuda:1, ...), checked; with no
    name or ``"auto"``, CUDA when it is available, else the CPU."""
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HnkitError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HnkitError(f"--device {name}: CUDA is not available on this machine")
    return device
