"""The text task: a causal LM learns a style. Data read as a stream, tokenized and packed once.

    documents -> pieces of text -> token ids (EOS after each document) -> fixed-size blocks -> train / validation

Memory is bounded whatever the size of the data. Files are read incrementally, and each document is
cut into pieces of at most ``PIECE_CHARS`` (64 Ki) characters (:mod:`hnkit.text_data` reads and
cuts), which are tokenized ``BATCH_CHARS`` (512 Ki characters) at a time, and the token ids are
appended to the cache file as they come. While tokenizing, the peak is one batch and its tokenizer
output (about 100-150 bytes per token: tens of MB), plus, for JSON lines, one line of at most
``MAX_LINE_BYTES`` (16 MiB) and its parsed record (see :mod:`hnkit.text_data`). What grows with the
data is the result only: the blocks tensor, 8 bytes per token (int64), read from the cache file of
4 bytes per token (12 bytes per token while it is read). ``hnkit train-text`` splits it into
training and validation blocks, a reordered copy (16 bytes per token while it splits), and keeps
the split only: 8 bytes per token for the run.

Tokenizers that mark the start of every text (Llama 2's and Mistral's SentencePiece "▁" in their
legacy form) would add that mark at every piece: a probe of the tokenizer, once per call, finds
them, and a piece that starts with a space after a non-space is then tokenized without that space
(see :mod:`hnkit.text_data` for where pieces end and what this gives).

Blocks are cached on disk in ``$HNKIT_CACHE/text``: ``<key>.int32``, the token ids as int32 with the
last partial block dropped, and ``<key>.json``, its size and the sha256 of all the token ids
(computed while they are written; a resume compares it, so the same text at another path or with
new file times is the same data). The key hashes the data files (path, size, mtime), the
tokenizer's serialized form, the block size, the text field and ``CACHE_FORMAT`` (how text is cut),
so a second run does not tokenize again. :mod:`hnkit.token_cache` writes both files atomically
and reads them back; a cache file that is not the size recorded (or not whole blocks) is tokenized
again. Its sha256 is not checked when read: the record's covers the dropped partial block too, so
the file alone cannot be checked against it (and a check would hash the whole file at every run).
"""
from __future__ import annotations

import hashlib
import math
import os
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from . import text_data, token_cache
from .errors import HnkitError, first_line
from .preserve import WEIGHT as PRESERVE_WEIGHT
from .util import model_source


# -- model -------------------------------------------------------------------------------------
def load_causal_lm(name: str, dtype=None):
    """A causal LM and its tokenizer from a local folder or a hub id; one-line errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(name, "config.json", "transformers model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise HnkitError(f"{name}: could not load the model ({first_line(exc)})") from None
    return model, tokenizer


def context_length(model) -> int | None:
    c = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(c, attr, None), int):
            return getattr(c, attr)
    return None


# -- tokenizing ----------------------------------------------------------------------------------
BATCH_CHARS = 512 * 1024  # characters per tokenizer call (8 pieces: enough to keep 8 cores busy)
CACHE_FORMAT = "int32 token ids, pieces of 65536 cut by 3 rules, leading space dropped where a probe says"


def _cache_key(data: Path, tokenizer, block_size: int, text_field: str) -> str:
    h = hashlib.sha256()
    for f in text_data._data_files(data):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    tokenizer_digest = token_cache.tokenizer_digest(tokenizer)
    h.update(f"{tokenizer_digest}|{tokenizer.eos_token_id}|{block_size}|{text_field}|".encode())
    h.update(f"{CACHE_FORMAT}|{text_data.PIECE_CHARS}".encode())  # the cache's format and how text is cut
    return h.hexdigest()[:24]


def tokenized_blocks(data: str | os.PathLike, tokenizer, block_size: int, text_field: str = "text") -> torch.Tensor:
    """All blocks of ``block_size`` tokens, shape (n_blocks, block_size); cached on disk."""
    return tokenized_data(data, tokenizer, block_size, text_field)[0]


def tokenized_data(data: str | os.PathLike, tokenizer, block_size: int,
                   text_field: str = "text") -> tuple[torch.Tensor, str]:
    """All blocks of ``block_size`` tokens, shape (n_blocks, block_size), and the sha256 of the
    data's token ids (what identifies the text a run trains on); cached on disk."""
    if tokenizer.eos_token_id is None:
        raise HnkitError("the tokenizer has no end-of-sequence token to separate documents")
    key = _cache_key(Path(data), tokenizer, block_size, text_field)
    cache, info = token_cache.entry("text", key)
    found = token_cache.read(cache, info, block_size, lambda record, size: record["bytes"] == size)
    if found is not None:
        return found[0], found[1]["sha256"]
    record = _write_cache(data, tokenizer, block_size, text_field, cache, info)
    return token_cache.load(cache, block_size), record["sha256"]


def _write_cache(data, tokenizer, block_size: int, text_field: str, cache: Path, info: Path) -> dict:
    """Tokenize ``data`` into ``cache`` (int32 ids, whole blocks) and ``info`` (its size and the
    sha256 of all the ids, the last partial block's too); returns the record."""
    strip = _marks_text_start(tokenizer)

    def write(f) -> dict:
        h = hashlib.sha256()
        for ids in _token_ids(text_data.read_pieces(data, text_field, text_data.PIECE_CHARS,
                                                   text_data.MAX_LINE_BYTES), tokenizer, strip):
            h.update(ids.tobytes())
            ids.tofile(f)
        n_tokens = f.tell() // 4
        if n_tokens < block_size:
            raise HnkitError(f"{data}: only {n_tokens} tokens, fewer than one block of {block_size}")
        size = n_tokens // block_size * block_size * 4
        f.truncate(size)  # drop the last partial block
        return {"bytes": size, "sha256": h.hexdigest()}

    return token_cache.write(cache, info, write)


def _marks_text_start(tokenizer) -> bool:
    """Whether the tokenizer marks the start of every text (SentencePiece's "▁", byte-level BPE with
    ``add_prefix_space``) so that a piece starting at a space is tokenized right without that space:
    probed on "a b"."""
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    whole = ids("a b")
    return whole != ids("a") + ids(" b") and whole == ids("a") + ids("b")


def _token_ids(pieces: Iterable[tuple[str, bool]], tokenizer, strip: bool = False) -> Iterator[array]:
    """Token ids of the pieces, an end-of-sequence token after each document, as int32 arrays
    (4-byte ``array("i")``), one per batch of about ``BATCH_CHARS`` characters. With ``strip``, a
    piece that continues a document at a space after a non-space loses that space (the tokenizer's
    start mark stands for it)."""
    batch, size, before = [], 0, "\n"
    for piece, ends in pieces:
        if strip and piece[:1] == " " and not before.isspace():
            piece = piece[1:]
        before = "\n" if ends else piece[-1]
        batch.append((piece, ends))
        size += len(piece)
        if size >= BATCH_CHARS:
            yield _encode(batch, tokenizer)
            batch, size = [], 0
    if batch:
        yield _encode(batch, tokenizer)


def _encode(batch: list[tuple[str, bool]], tokenizer) -> array:
    encoded = tokenizer([piece for piece, _ in batch], add_special_tokens=False, return_attention_mask=False)
    ids = array("i")
    for tokens, (_, ends) in zip(encoded["input_ids"], batch):
        ids.extend(tokens)
        if ends:
            ids.append(tokenizer.eos_token_id)
    return ids


def split_blocks(blocks: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split; at least one validation block when there are two or more blocks."""
    n = len(blocks)
    n_val = min(n - 1, max(1, math.ceil(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks[order[n_val:]], blocks[order[:n_val]]


# -- the task ----------------------------------------------------------------------------------
NEUTRAL_SHARE = 4  # style blocks per neutral block in a preservation step: the step costs <= 1.25x the rows


class _Paired:
    """Training blocks, each paired with a neutral block (prior preservation): block ``i`` with
    neutral block ``i mod n``. A pair depends on nothing but ``i``, so a resumed run sees the same
    pairs; with more neutral blocks than training blocks the extra ones are never used."""

    def __init__(self, blocks: torch.Tensor, n_neutral: int):
        self.blocks, self.n_neutral = blocks, n_neutral

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int):
        return self.blocks[i], i % self.n_neutral


class TextTask:
    """Causal-LM loss on packed blocks; previews are greedy continuations of fixed prompts.

    With ``preserve`` (a :class:`hnkit.preserve.Teacher` of neutral blocks), a training step also
    runs one neutral block per ``NEUTRAL_SHARE`` style blocks (at least one) in the same forward pass and adds
    ``preserve_weight * KL(bare || attached)`` on them to the style's cross-entropy."""

    def __init__(self, model, tokenizer, hypernetwork, train_blocks, eval_blocks=None,
                 sample_prompts=(), sample_tokens: int = 48, preserve=None, preserve_weight: float | None = None):
        self.model, self.tokenizer, self.hypernetwork = model, tokenizer, hypernetwork
        self.train_dataset, self.eval_dataset = train_blocks, eval_blocks
        self.sample_prompts, self.sample_tokens = list(sample_prompts), sample_tokens
        self.preserve, self.preserve_weight = None, preserve_weight
        if preserve is not None:
            self.use_preservation(preserve, preserve_weight)

    def use_preservation(self, teacher, weight: float | None = None) -> None:
        """Train with prior preservation from now on (``teacher``: a :class:`hnkit.preserve.Teacher`
        made from the model as training runs it, on its device and in its dtype); ``weight``: the KL
        term's (default :data:`hnkit.preserve.WEIGHT`)."""
        self.preserve, self.preserve_weight = teacher, PRESERVE_WEIGHT if weight is None else weight
        self.train_dataset = _Paired(getattr(self.train_dataset, "blocks", self.train_dataset), len(teacher))

    def collate(self, examples) -> dict:
        if not isinstance(examples[0], tuple):  # validation blocks, or no preservation
            return {"input_ids": torch.stack(list(examples))}
        neutral = [j for _, j in examples][:max(1, len(examples) // NEUTRAL_SHARE)]
        t = self.preserve
        return {"input_ids": torch.stack([block for block, _ in examples]), "preserve_ids": t.blocks[neutral],
                "teacher_logp": t.values[neutral], "teacher_index": t.indices[neutral], "teacher_rest": t.rest[neutral]}

    def loss(self, batch) -> torch.Tensor:
        ids = batch["input_ids"]
        if "preserve_ids" not in batch:
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss
        from .preserve import coarse_kl

        logits = self.model(input_ids=torch.cat([ids, batch["preserve_ids"]]), use_cache=False).logits
        n = len(ids)
        style = torch.nn.functional.cross_entropy(logits[:n, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        kl = coarse_kl(batch["teacher_logp"], batch["teacher_index"], batch["teacher_rest"], logits[n:])
        return style + self.preserve_weight * kl

    @torch.no_grad()
    def continuations(self, prompts, max_new_tokens: int | None = None) -> list[str]:
        out = []
        device = next(self.model.parameters()).device
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            gen = self.model.generate(ids, max_new_tokens=max_new_tokens or self.sample_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out

    def sample(self, step: int, folder: Path) -> None:
        if not self.sample_prompts:
            return
        folder.mkdir(parents=True, exist_ok=True)
        texts = self.continuations(self.sample_prompts)
        body = "".join(f"### prompt\n{p}\n### continuation (strength 1)\n{t}\n\n" for p, t in zip(self.sample_prompts, texts))
        (folder / f"step-{step:07d}.txt").write_text(body, encoding="utf-8")


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean token loss) over ``blocks`` (whatever is attached to the model applies)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        n = ids.numel() - ids.shape[0]  # predicted tokens
        total, count = total + loss.item() * n, count + n
    return math.exp(total / count)


def default_prompts(tokenizer, blocks: torch.Tensor, n: int = 2, tokens: int = 24) -> list[str]:
    return [tokenizer.decode(b[:tokens], skip_special_tokens=True) for b in blocks[:n]]

