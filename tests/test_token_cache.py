"""hnkit.token_cache: the on-disk cache of token ids that the tokenized text (hnkit.text) and the
text the model writes itself (hnkit.self_text) share."""
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from hnkit import self_text, text, token_cache
from hnkit.errors import HnkitError

BLOCK = 4
BLOCKS = torch.arange(3 * BLOCK).view(3, BLOCK) + 100


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HNKIT_CACHE", str(tmp_path / "cache"))


def write(blocks=BLOCKS, kind="kind", key="key"):
    """An entry as the text cache writes one: the ids, and a record of their size and sha256."""
    ids, info = token_cache.entry(kind, key)
    raw = blocks.to(torch.int32).numpy().tobytes()

    def write_ids(f) -> dict:
        f.write(raw)
        return {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}

    return ids, info, token_cache.write(ids, info, write_ids)


def same_size(record, size):  # the text cache's own check
    return record["bytes"] == size


def test_an_entry_reads_back_as_written(tmp_path):
    ids, info, record = write()
    folder = tmp_path / "cache" / "kind"
    assert (ids, info) == (folder / "key.int32", folder / "key.json")
    assert sorted(os.listdir(folder)) == ["key.int32", "key.json"]  # no temporary file left
    assert json.loads(info.read_text()) == record
    assert record["sha256"] == hashlib.sha256(BLOCKS.to(torch.int32).numpy().tobytes()).hexdigest()
    for rehash in (False, True):
        blocks, read_record = token_cache.read(ids, info, BLOCK, same_size, rehash=rehash)
        assert torch.equal(blocks, BLOCKS) and blocks.dtype == torch.long and read_record == record
    assert torch.equal(token_cache.load(ids, BLOCK), BLOCKS)


def test_a_cut_file_is_refused_by_both_checks_and_a_tampered_one_by_the_hash():
    ids, info, _ = write()
    good = ids.read_bytes()
    ids.write_bytes(good[:-BLOCK * 4])  # one block short: whole blocks, but not the size recorded
    assert token_cache.read(ids, info, BLOCK, same_size) is None
    assert token_cache.read(ids, info, BLOCK, lambda r, size: True, rehash=True) is None
    ids.write_bytes(good[:4] + b"\xff" * 4 + good[8:])  # the size recorded, other ids
    assert token_cache.read(ids, info, BLOCK, same_size) is not None  # the text cache trusts its size...
    assert token_cache.read(ids, info, BLOCK, same_size, rehash=True) is None  # ...the self-text cache hashes


def test_a_refused_entry_is_written_again():
    ids, info, _ = write()
    ids.write_bytes(b"\0" * ids.stat().st_size)
    assert token_cache.read(ids, info, BLOCK, same_size, rehash=True) is None
    other = BLOCKS.flip(0)
    write(other)
    blocks, record = token_cache.read(ids, info, BLOCK, same_size, rehash=True)
    assert torch.equal(blocks, other) and json.loads(info.read_text()) == record


@pytest.mark.parametrize("damage", ["no record", "not JSON", "a list", "no sha256", "sha256 not a string",
                                    "no ids", "empty", "not whole blocks", "not sound", "sound raises"])
def test_the_records_checks(damage):
    ids, info, record = write()
    sound = same_size
    if damage == "no record":
        info.unlink()
    elif damage == "not JSON":
        info.write_text("{not json")
    elif damage == "a list":
        info.write_text(json.dumps([record]))
    elif damage in ("no sha256", "sha256 not a string"):
        info.write_text(json.dumps({"bytes": record["bytes"]} | ({"sha256": 7} if "string" in damage else {})))
    elif damage == "no ids":
        ids.unlink()
    elif damage in ("empty", "not whole blocks"):
        ids.write_bytes(ids.read_bytes()[:{"empty": 0, "not whole blocks": 4 * BLOCK + 4}[damage]])
        sound = lambda r, size: True  # the sizes the caller accepts do not matter: these are never read
    elif damage == "not sound":
        sound = lambda r, size: False
    else:
        sound = lambda r, size: r["blocks"] == 3  # a record without what the caller expects
    assert token_cache.read(ids, info, BLOCK, sound) is None


def test_a_failed_write_leaves_nothing():
    ids, info = token_cache.entry("kind", "key")

    def write_ids(f):
        f.write(b"\0" * 16)
        raise HnkitError("data.txt: only 4 tokens, fewer than one block of 16")

    with pytest.raises(HnkitError, match="only 4 tokens"):
        token_cache.write(ids, info, write_ids)
    assert not ids.exists() and not info.exists() and list(ids.parent.iterdir()) == []


def test_a_file_in_the_caches_place_is_a_one_line_error(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "text").write_text("not a folder")
    (tmp_path / "a.txt").write_text(tiny_lm["corpus"].read_text()[:2000])
    with pytest.raises(HnkitError, match=r"cache/text is a file, not a folder$"):  # was a FileExistsError
        text.tokenized_data(tmp_path / "a.txt", AutoTokenizer.from_pretrained(tiny_lm["model"]), 16)
    assert (tmp_path / "cache" / "text").read_text() == "not a folder"


def test_the_self_text_cache_removes_old_temporary_files_too(tiny_lm, tmp_path):
    """As the text cache does (tests/test_data_bounds.py): both write through token_cache.write."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    old = tmp_path / "cache" / "self_text" / ".x.int32.abc.tmp"  # left by a run killed two days ago
    old.parent.mkdir(parents=True)
    old.write_bytes(b"1234")
    os.utime(old, (time.time() - 2 * token_cache.TEMP_MAX_AGE,) * 2)
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_lm["model"]), AutoTokenizer.from_pretrained(tiny_lm["model"])
    self_text.self_blocks(model, tok, 2, 8)
    assert sorted(p.suffix for p in old.parent.iterdir()) == [".int32", ".json"]


def test_the_tokenizer_digest_follows_its_content(tiny_lm):
    from transformers import AutoTokenizer

    tok, same, other = (AutoTokenizer.from_pretrained(tiny_lm["model"]) for _ in range(3))
    other.add_tokens(["hnkit"])
    assert token_cache.tokenizer_digest(tok) == token_cache.tokenizer_digest(same)
    assert token_cache.tokenizer_digest(tok) != token_cache.tokenizer_digest(other)

    class Saved:  # a tokenizer with no fast backend: its saved files are hashed
        def __init__(self, vocab):
            self.vocab = vocab

        def save_pretrained(self, folder):
            (Path(folder) / "vocab.txt").write_text(self.vocab)

    assert token_cache.tokenizer_digest(Saved("a b")) == token_cache.tokenizer_digest(Saved("a b"))
    assert token_cache.tokenizer_digest(Saved("a b")) != token_cache.tokenizer_digest(Saved("a c"))
