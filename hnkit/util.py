"""Small helpers shared across hnkit: atomic file writes, the cache folder, ``FILE[:STRENGTH]``
arguments, the device a command runs on and where a model loads from."""

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
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise HnkitError(f"{path}: {folder} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
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


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it before Python 3.13's os.getumask...
    os.umask(mask)  # ...is to set it and put it back at once
    return mask


def cache_root() -> Path:
    """Where tokenized text and encoded images are kept: ``$HNKIT_CACHE``, else ``~/.cache/hnkit``."""
    return Path(os.environ.get("HNKIT_CACHE", "~/.cache/hnkit")).expanduser()


# -- FILE[:STRENGTH] on the command line ---------------------------------------------------------
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", re.IGNORECASE)


def parse_strength(text: str, what: str, expected: str = "a number such as 0.7") -> float:
    """``text`` as a finite number (a strength, or a factor on strengths); else one line naming ``what``."""
    try:
        value = float(text)
    except ValueError:
        raise HnkitError(f"{what}: bad strength {text!r}, expected {expected}") from None
    if not math.isfinite(value):
        raise HnkitError(f"{what}: bad strength {text!r}, expected a finite number")
    return value


def parse_style_arg(text: str, default: float = 1.0) -> tuple[str, float]:
    """``"noir.pt:0.6"`` -> ``("noir.pt", 0.6)``, for every ``FILE[:STRENGTH]`` option of the CLI.
    Only a trailing ``:number`` is a strength, so ``C:/styles/noir.pt`` and ``a:b.safetensors`` are
    plain paths, and a name that exists as a file as a whole is never split."""
    if Path(text).is_file():
        return text, default
    head, sep, tail = text.rpartition(":")
    if sep and head and _NUMBER.fullmatch(tail.strip()):
        return head, parse_strength(tail, text)
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


# -- models: a local folder or a hub id -------------------------------------------------------------
def model_source(name: str, marker: str, what: str) -> str:
    """Where ``--model NAME`` loads from: a local folder holding ``marker`` (e.g. config.json), as its
    expanded path, or a hub id that is cached or reachable, as given; otherwise one line.
    ``what`` names the kind of folder, e.g. "transformers model". A name that starts like a path
    (``/``, ``./``, ``../``, ``~``) or exists is a folder; anything else is a hub id."""
    if not (name.startswith(("/", "./", "../", "~")) or os.path.exists(name)):
        check_hub_model(name, marker)
        return name
    path = Path(name).expanduser()
    if not path.is_dir():
        raise HnkitError(f"{name}: no such model folder")
    if not (path / marker).is_file():
        raise HnkitError(f"{name}: not a {what} folder (no {marker})")
    return str(path)


def check_hub_model(name: str, file: str = "config.json") -> None:
    """For a hub id: fine when the model is in the local Hugging Face cache or the hub answers;
    otherwise one line at once, instead of the libraries' minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, file), str):
            return
    except ValueError:  # not even a valid repository id
        raise HnkitError(f"{name}: no such model folder, and not a Hugging Face hub id") from None
    if constants.HF_HUB_OFFLINE:
        raise HnkitError(f"{name}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy decides what is reachable
    host = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=5).close()
    except OSError:
        raise HnkitError(f"{name}: not in the local Hugging Face cache, and {host.hostname} cannot be reached "
                         "(no network?); give a local model folder") from None
