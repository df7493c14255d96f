"""Token ids cached on disk, shared by the tokenized text (:mod:`hnkit.text`) and the neutral text the
model writes itself (:mod:`hnkit.self_text`).

An entry is two files in ``$HNKIT_CACHE/<kind>``: ``<key>.int32``, the token ids as int32, whole
blocks only, and ``<key>.json``, a record that holds at least ``sha256``, the digest of the token ids.
Each caller makes its own key and says what else its record holds and what a sound record is.

Both files are written under temporary names (``mkstemp``, unique across the machines sharing a
cache), synced and renamed into place (:func:`hnkit.util.atomic_write`), the ids first, so a record
is never there before its ids; temporary files older than :data:`TEMP_MAX_AGE` (runs killed while
writing) are removed. An entry that fails its checks when read is written again, never used.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .util import atomic_write, cache_root

TEMP_MAX_AGE = 24 * 3600  # seconds: older temporary files in the cache are a killed run's leftovers


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's serialized form: a fast tokenizer's JSON, else its saved files."""
    import tempfile

    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(folder)}|{f.stat().st_size}|".encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def entry(kind: str, key: str) -> tuple[Path, Path]:
    """The two files of an entry: its token ids and its record."""
    folder = cache_root() / kind
    return folder / f"{key}.int32", folder / f"{key}.json"


def read(ids: Path, info: Path, block_size: int, sound, rehash: bool = False) -> tuple[torch.Tensor, dict] | None:
    """The entry's blocks (int64, shape ``[n, block_size]``) and its record; None (write it again) unless
    the record is a JSON object with a string ``sha256``, the ids are whole blocks (at least one) and
    ``sound(record, n_bytes)`` holds; with ``rehash``, the ids read must also hash to ``sha256``."""
    try:
        record, size = json.loads(info.read_text()), ids.stat().st_size
        ok = isinstance(record["sha256"], str) and size > 0 and size % (block_size * 4) == 0
        ok = ok and sound(record, size)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    flat = torch.from_file(str(ids), size=size // 4, dtype=torch.int32)
    if rehash and hashlib.sha256(flat.numpy()).hexdigest() != record["sha256"]:
        return None
    return flat.view(-1, block_size).long(), record


def load(ids: Path, block_size: int) -> torch.Tensor:
    """The blocks of an entry just written, unchecked (int64, shape ``[n, block_size]``)."""
    flat = torch.from_file(str(ids), size=ids.stat().st_size // 4, dtype=torch.int32)
    return flat.view(-1, block_size).long()


def write(ids: Path, info: Path, write_ids) -> dict:
    """Write an entry: ``write_ids(f)`` writes the int32 ids to ``f`` and returns the record, which is
    written as JSON once the ids are in place; returns the record."""
    _remove_stale_temps(ids.parent)
    record = {}
    atomic_write(ids, lambda f: record.update(write_ids(f)))
    text = json.dumps(record).encode()
    atomic_write(info, lambda f: f.write(text))
    return record


def _remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files of runs killed while writing the cache (older than a day)."""
    for tmp in folder.glob(".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > TEMP_MAX_AGE:
                tmp.unlink()
        except OSError:
            pass  # another run removed it first
