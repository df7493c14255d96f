"""Bounded loading: read a ``torch.save`` file or a JSON entry without letting a small hostile file
expand into gigabytes or hang.

Before ``torch.load`` (always ``weights_only=True``, which never runs a pickle's code), the file is
checked without being unpickled: zip entries must be stored uncompressed and not overlap (no zip
bomb), and every pickle in it is scanned with ``pickletools`` (opcodes read, never run) and refused
past MAX_PICKLE_OPS operations. After loading, the data (and a ``.safetensors``'s "hnkit" JSON
metadata, at most MAX_METADATA_CHARS) is walked iteratively and refused past MAX_DEPTH levels of
nesting or MAX_VALUES values, a shared value counted each time it is reached.
"""

from __future__ import annotations

import json
import pickletools
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import HnkitError, first_line

# Bounds on what reading a file may build, so that a small hostile file cannot expand into gigabytes
# or hang: a zip bomb, a pickle or JSON of shared or deeply nested lists. Real files stay far inside
# them: a web UI network's pickle has a few thousand operations (a 6-width, 16-layer network with
# layer norm: 26,000; its Adam sidecar: 65,000) and its data, a dict of a few widths, each a pair of
# state dicts, is 3 containers deep with some hundreds of values.
MAX_PICKLE_OPS = 500_000  # unpickling this many operations takes at most ~40 MB and ~1.5 s
MAX_VALUES = 100_000  # values in loaded data, a shared one counted each time it is reached
MAX_DEPTH = 32  # containers nested in loaded data
MAX_METADATA_CHARS = 1_000_000  # a .safetensors's "hnkit" JSON entry (a real one: ~1 KB and the description)


def load_plain(path: Path):
    """``torch.load`` of tensors and plain data only (``weights_only=True``): never runs a pickle's
    code, and refuses (HnkitError) a file that could take far more memory or time than its size
    (:func:`check_torch_file` before loading, :func:`check_plain` after)."""
    path = Path(path)
    check_torch_file(path)
    with warnings.catch_warnings():  # torch notes a web UI file's older pickle protocol: nothing to act on
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        data = torch.load(path, map_location="cpu", weights_only=True)
    check_plain(data, path)
    return data


def check_torch_file(path: Path) -> None:
    """Refuse, before torch reads it, a ``torch.save`` file that would expand far beyond its size:
    compressed or overlapping zip entries (a zip bomb: torch.save stores its entries uncompressed,
    side by side) or pickles of more than MAX_PICKLE_OPS operations. A malformed pickle is left to
    torch, which refuses it. Never runs the pickles (``pickletools.genops`` only reads opcodes)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch's own test for its zip format
            # the older format: five pickles (magic number, protocol, system info, data, storage keys),
            # then the raw storages, which torch reads only up to their sizes, checked against the file
            f.seek(0)
            budget = MAX_PICKLE_OPS
            for _ in range(5):
                budget = _scan_pickle(f, path, budget)
                if budget is None:  # torch stops at the same place
                    return
            return
    _check_zip(path)


def _check_zip(path: Path) -> None:
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        entries = z.infolist()
        packed = [entry for entry in entries if entry.compress_type != zipfile.ZIP_STORED]
        if packed:
            stored, expanded = sum(e.compress_size for e in packed), sum(e.file_size for e in packed)
            raise HnkitError(f"{path}: refused: it holds compressed zip entries ({stored:,} bytes that would "
                             f"expand to {expanded:,}); torch.save stores its entries uncompressed")
        total = sum(entry.file_size for entry in entries)
        if total > size:
            raise HnkitError(f"{path}: refused: its zip entries hold {total:,} bytes, more than the file's "
                             f"{size:,} (they overlap: a zip bomb)")
        budget = MAX_PICKLE_OPS
        for entry in (e for e in entries if e.filename.endswith(".pkl")):  # torch reads <archive>/data.pkl
            with z.open(entry) as f:
                left = _scan_pickle(f, path, budget)
            budget = budget if left is None else left


def _scan_pickle(f, path: Path, budget: int) -> int | None:
    """Read one pickle's opcodes from ``f`` (never running them): what is left of ``budget``, or None
    if the pickle is malformed or missing (torch refuses what it cannot read, with its own message)."""
    try:
        for _ in pickletools.genops(f):
            budget -= 1
            if budget < 0:
                raise HnkitError(f"{path}: refused: its pickle has more than {MAX_PICKLE_OPS:,} operations "
                                 "(a hypernetwork's has some thousands); loading it could take unbounded memory")
    except (ValueError, MemoryError):
        return None
    return budget


def check_plain(data, path: Path, what: str = "data") -> None:
    """Refuse loaded data (from a pickle or JSON) with containers nested more than MAX_DEPTH deep or
    more than MAX_VALUES values, a shared value counted each time it is reached, as anything that
    walks it (a repr, a JSON dump) would: a few KB that share references can stand for 2**60 values."""
    count, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            count += 2 * len(value)
            children = (x for item in value.items() for x in item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            count += len(value)
            children = iter(value)
        else:
            continue
        if depth > MAX_DEPTH:
            raise HnkitError(f"{path}: refused: its {what} is nested more than {MAX_DEPTH} levels deep")
        if count > MAX_VALUES:
            raise HnkitError(f"{path}: refused: its {what} holds more than {MAX_VALUES:,} values (a shared "
                             "value counted each time it is reached)")
        stack.extend((child, depth + 1) for child in children)


def parse_metadata(text: str, path: Path):
    """The "hnkit" JSON entry of a .safetensors, refused if it could take far more than its size."""
    if len(text) > MAX_METADATA_CHARS:
        raise HnkitError(f"{path}: refused: hnkit metadata of {len(text):,} characters (at most "
                         f"{MAX_METADATA_CHARS:,})")
    try:
        m = json.loads(text)
    except RecursionError:
        raise HnkitError(f"{path}: refused: its hnkit metadata is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:
        raise HnkitError(f"{path}: bad hnkit metadata ({first_line(exc)})") from None
    check_plain(m, path, "hnkit metadata")
    return m
