"""Training text of any size streams through tokenization in bounded memory, and a JSON line too
long to read is refused with one line (issue 24)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hnkit import text, text_data, token_cache
from hnkit.commands.cli import main
from hnkit.errors import HnkitError
from hnkit.text import tokenized_blocks
from hnkit.text_data import read_pieces
from hnkit.util import cache_root


@pytest.fixture(scope="module")
def tok(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm["model"])


def reference_blocks(docs, tok, block_size):
    """The plain computation (what hnkit did before streaming): each document tokenized whole, an
    EOS after it, all packed, the last partial block dropped."""
    ids = [t for d in docs for t in tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    n = len(ids) // block_size
    return torch.tensor(ids[:n * block_size]).view(n, block_size)


# -- memory ----------------------------------------------------------------------------------------
CHILD = r"""
import resource, sys
import datasets, torch, transformers  # what tokenizing may import, loaded before measuring
from transformers import AutoTokenizer
from hnkit.text import tokenized_blocks

def peak_mib():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)

tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok("warm the tokenizer up " * 100)
before = peak_mib()
blocks = tokenized_blocks(sys.argv[2], tok, 64)
print(len(blocks), round(peak_mib() - before))
"""


def test_peak_memory_does_not_follow_the_file_size(tiny_lm, tmp_path):
    """2 MiB of text is ~1.4M tokens with the tiny tokenizer: whole-document tokenization needed
    ~470 MiB more peak memory for it (~225 MiB per MiB of text); streamed, the growth is one batch
    of tokenizer output plus the blocks (12 bytes per token while loading): ~70 MiB."""
    corpus = tiny_lm["corpus"].read_text()
    big = tmp_path / "big.txt"
    size = 2 * 2**20
    big.write_text((corpus * (size // len(corpus) + 1))[:size])
    env = dict(os.environ, HNKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", CHILD, str(tiny_lm["model"]), str(big)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    n_blocks, growth_mib = map(int, run.stdout.split())
    assert n_blocks > 10_000
    assert growth_mib < 200, f"peak RSS grew by {growth_mib} MiB while tokenizing 2 MiB of text"


# -- results unchanged -----------------------------------------------------------------------------
def write_data(root, corpus):
    """Data in every form hnkit reads, and the documents each holds (as the old reader saw them)."""
    root.mkdir()
    para = corpus[:20000].replace("\n\n", "\0").replace("\n", " ").replace("\0", "\n\n")  # a paragraph a line
    crlf = root / "crlf.txt"
    crlf.write_bytes(corpus[:3000].replace("\n", "\r\n").encode())  # read with universal newlines
    (root / "para.txt").write_text(para)
    folder = root / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(corpus[:3000])
    (folder / "blank.txt").write_text(" \n\t\n")  # skipped
    (folder / "b.txt").write_text(corpus[3000:9000])
    records = [{"text": corpus[:7000]}, {"text": "  \n"}, {"text": 7}, {"other": "x"}, {"text": corpus[7000:8000]}]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n"
                                     + "\n".join(json.dumps(r) for r in records[3:]) + "\n")
    (root / "array.json").write_text(json.dumps(records, indent=1))
    from datasets import Dataset

    Dataset.from_dict({"text": [corpus[:5000], "", corpus[5000:6000]]}).save_to_disk(str(root / "saved"))
    kept = [corpus[:7000], corpus[7000:8000]]
    return {crlf: [corpus[:3000]], root / "para.txt": [para], folder: [corpus[:3000], corpus[3000:9000]],
            root / "data.jsonl": kept, root / "array.json": kept, root / "saved": [corpus[:5000], corpus[5000:6000]]}


@pytest.mark.parametrize("piece_chars", [300, text_data.PIECE_CHARS])
def test_blocks_are_those_of_whole_documents(tiny_lm, tok, tmp_path, monkeypatch, piece_chars):
    """With pieces of 300 characters every document is cut many times, and still every token is
    the one of tokenizing the document whole (a byte-level BPE tokenizer, like GPT-2's)."""
    monkeypatch.setattr(text_data, "PIECE_CHARS", piece_chars)
    monkeypatch.setattr(text, "BATCH_CHARS", 1000)  # many batches too
    for data, docs in write_data(tmp_path / "data", tiny_lm["corpus"].read_text()).items():
        got = tokenized_blocks(data, tok, 32)
        assert torch.equal(got, reference_blocks(docs, tok, 32)), data.name
        assert got.dtype == torch.long
        assert torch.equal(tokenized_blocks(data, tok, 32), got)  # from the cache


@pytest.mark.parametrize("sample", ["words " * 500, "x" * 2000, " " * 2000 + "x", "数据" * 900 + "\n" + "字" * 300,
                                    "a\n\n  b\t" * 300, "é" * 999 + " " + "ü" * 999])
def test_pieces_are_bounded_and_rejoin_to_the_text(sample, tmp_path):
    f = tmp_path / "sample.txt"
    f.write_text(sample)
    pieces = list(read_pieces(f, piece_chars=256))
    assert "".join(p for p, _ in pieces) == sample
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(len(p) <= 256 for p, _ in pieces) and all(len(p) >= 128 for p, _ in pieces[:-1])


# -- other tokenizers and scripts ------------------------------------------------------------------
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's pre-tokenizer pattern


def cjk_text(n_lines, seed=0):
    """Chinese-like text: no spaces, a line break after each "。"."""
    import random

    rng = random.Random(seed)
    chars = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
    return "\n".join("".join(rng.choice(chars) for _ in range(rng.randint(8, 40))) + "。" for _ in range(n_lines))


def build_tokenizer(kind, texts):
    """A small BPE tokenizer trained here: "llama3" (byte-level, Llama 3's split pattern),
    "sentencepiece" (Llama 2's legacy form: a "▁" put before the text and for each space, then
    merges) or "prefix_space" (byte-level with add_prefix_space, as some GPT-2 set-ups)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "sentencepiece" else None))
    if kind == "sentencepiece":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = []
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=kind == "prefix_space", use_regex=kind != "llama3")
        tok.pre_tokenizer = byte_level if kind != "llama3" else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"), byte_level])
        tok.decoder, alphabet = decoders.ByteLevel(), pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<eos>", "<unk>"],
                                                       initial_alphabet=alphabet))
    if kind == "sentencepiece":  # trained on words (as SentencePiece is), run on the whole text (as Llama 2's is)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def assert_blocks_of_whole_documents(tmp_path, monkeypatch, tok, docs, block_size=16):
    monkeypatch.setattr(text_data, "PIECE_CHARS", 300)
    monkeypatch.setattr(text, "BATCH_CHARS", 1000)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i}.txt").write_text(doc)
    assert torch.equal(tokenized_blocks(folder, tok, block_size), reference_blocks(docs, tok, block_size))


@pytest.mark.parametrize("kind", ["gpt2", "llama3"])
def test_chinese_text_is_cut_after_line_breaks_into_the_whole_documents_tokens(tiny_lm, tok, tmp_path, monkeypatch,
                                                                                kind):
    docs = [cjk_text(200, seed=1), cjk_text(50, seed=2)]
    if kind == "llama3":
        tok = build_tokenizer("llama3", [cjk_text(300)])  # merges across characters
    assert_blocks_of_whole_documents(tmp_path, monkeypatch, tok, docs)


@pytest.mark.parametrize("kind", ["sentencepiece", "prefix_space"])
def test_tokenizers_that_mark_a_texts_start_give_the_whole_documents_tokens(tiny_lm, tmp_path, monkeypatch, kind):
    corpus = tiny_lm["corpus"].read_text()
    tok = build_tokenizer(kind, [corpus])
    docs = [corpus[:20000].replace("\n", " "), corpus[20000:26000].replace("\n", " ")]  # prose: spaces to cut at
    assert_blocks_of_whole_documents(tmp_path, monkeypatch, tok, docs)


def test_the_cache_tells_tokenizers_apart_by_their_content(tiny_lm, tok, tmp_path):
    """Two tokenizers with the same name, size and end token but other merges: each its own blocks."""
    corpus = tiny_lm["corpus"].read_text()
    other = build_tokenizer("prefix_space", [corpus[::-1]])
    mine = build_tokenizer("prefix_space", [corpus])
    assert (len(mine), mine.eos_token_id, mine.name_or_path) == (len(other), other.eos_token_id, other.name_or_path)
    data = tmp_path / "a.txt"
    data.write_text(corpus[:5000])
    assert torch.equal(tokenized_blocks(data, mine, 16), reference_blocks([corpus[:5000]], mine, 16))
    assert torch.equal(tokenized_blocks(data, other, 16), reference_blocks([corpus[:5000]], other, 16))


# -- the cache files -------------------------------------------------------------------------------
def cached(tmp_path, monkeypatch, tiny_lm, tok):
    """A private cache holding one tokenized file; (data, its .int32 file, the blocks)."""
    monkeypatch.setenv("HNKIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "a.txt"
    data.write_text(tiny_lm["corpus"].read_text()[:5000])
    blocks, digest = text.tokenized_data(data, tok, 16)
    [file] = (tmp_path / "cache" / "text").glob("*.int32")
    ids = torch.from_file(str(file), size=file.stat().st_size // 4, dtype=torch.int32)
    assert json.loads(file.with_suffix(".json").read_text()) == {"bytes": file.stat().st_size, "sha256": digest}
    assert torch.equal(ids.view(-1, 16).long(), blocks)
    return data, file, blocks


@pytest.mark.parametrize("damage", ["empty", "cut", "not whole blocks"])
def test_a_damaged_cache_file_is_tokenized_again(tiny_lm, tok, tmp_path, monkeypatch, damage):
    data, file, blocks = cached(tmp_path, monkeypatch, tiny_lm, tok)
    with open(file, "r+b") as f:
        f.truncate({"empty": 0, "cut": 16 * 4, "not whole blocks": file.stat().st_size - 4}[damage])
    assert torch.equal(tokenized_blocks(data, tok, 16), blocks)


def test_the_digest_is_of_the_token_ids_and_follows_the_text_not_the_file(tiny_lm, tok, tmp_path, monkeypatch):
    import hashlib

    data, file, blocks = cached(tmp_path, monkeypatch, tiny_lm, tok)
    ids = tok(data.read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    from array import array

    assert text.tokenized_data(data, tok, 16)[1] == hashlib.sha256(array("i", ids).tobytes()).hexdigest()
    copy = tmp_path / "elsewhere.txt"
    copy.write_text(data.read_text())
    assert text.tokenized_data(copy, tok, 16)[1] == text.tokenized_data(data, tok, 16)[1]
    copy.write_text(data.read_text() + " more")
    assert text.tokenized_data(copy, tok, 16)[1] != text.tokenized_data(data, tok, 16)[1]


def test_old_temporary_files_are_removed_and_new_ones_kept(tiny_lm, tok, tmp_path, monkeypatch):
    import time

    folder = tmp_path / "cache" / "text"
    folder.mkdir(parents=True)
    old, fresh = folder / ".x.int32.abc.tmp", folder / ".y.int32.def.tmp"  # a killed run's, a running one's
    old.write_bytes(b"1234")
    fresh.write_bytes(b"5678")
    os.utime(old, (time.time() - 2 * token_cache.TEMP_MAX_AGE,) * 2)
    cached(tmp_path, monkeypatch, tiny_lm, tok)
    assert not old.exists() and fresh.exists()
    assert sorted(p.suffix for p in folder.iterdir()) == [".int32", ".json", ".tmp"]


# -- a line too long -------------------------------------------------------------------------------
def test_a_json_line_over_the_limit_is_refused_before_it_is_parsed(tmp_path):
    data = tmp_path / "data.jsonl"
    fits = json.dumps({"text": "y" * 80}).ljust(99) + "\n"  # 100 bytes with its newline
    data.write_text(fits + "{not json at all, and long" + "z" * 200 + "\n")
    with pytest.raises(HnkitError) as err:
        list(read_pieces(data, max_line_bytes=100))
    message = str(err.value)
    assert message == (f"{data}: line 2 is longer than 100 bytes, the limit for one JSON line; "
                       "split it into smaller records (or use a .txt file)")
    at_limit = tmp_path / "ok.jsonl"
    at_limit.write_text(fits + fits)
    assert list(read_pieces(at_limit, max_line_bytes=100)) == [("y" * 80, True)] * 2


def test_a_json_array_over_the_limit_is_refused(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"text": "word " * 40}] * 3))
    with pytest.raises(HnkitError, match="rows.json: a JSON array file longer than 100 bytes is not read whole; "
                                         r"write it as JSON lines \(.jsonl\)"):
        list(read_pieces(data, max_line_bytes=100))


def test_the_cli_refuses_a_long_line_with_one_line_and_writes_nothing(tiny_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(text_data, "MAX_LINE_BYTES", 1000)
    data = tmp_path / "one-line.jsonl"
    data.write_text(json.dumps({"text": tiny_lm["corpus"].read_text()[:20000]}) + "\n")
    out = tmp_path / "out"
    cached = set((cache_root() / "text").glob("*")) if (cache_root() / "text").is_dir() else set()
    assert main(["train-text", "--model", str(tiny_lm["model"]), "--data", str(data), "--output", str(out),
                 "--block-size", "32", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}: line 1 is longer than 1000 bytes" in err, err
    assert "Traceback" not in err and not out.exists()
    assert set((cache_root() / "text").glob("*")) == cached  # no cache file, no temporary file left
