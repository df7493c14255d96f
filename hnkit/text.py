"""The text task: a causal LM learns a style. Data read as a stream, tokenized and packed once.

    documents -> pieces of text -> token ids (EOS after each document) -> fixed-size blocks -> train / validation

Memory is bounded whatever the size of the data. Files are read incrementally; a document is cut
into pieces of at most ``PIECE_CHARS`` (64 Ki) characters, which are tokenized ``BATCH_CHARS``
(512 Ki characters) at a time, and the token ids are appended to the cache file as they come. While
tokenizing, the peak is one batch and its tokenizer output (about 100-150 bytes per token: tens of
MB), plus, for JSON lines, one line of at most ``MAX_LINE_BYTES`` (16 MiB) and its parsed record. A
longer JSON line is refused, before it is parsed, with one line naming the file, the line and the
limit: a record that big is almost always a mistake (a whole corpus in one record) and would need
several times its size to parse; a .txt file has no such limit. What grows with the data is the
result only: the blocks tensor, 8 bytes per token (int64), read from the cache file of 4 bytes per
token (12 bytes per token while it is read). ``hnkit train-text`` splits it into training and
validation blocks, a reordered copy (16 bytes per token while it splits), and keeps the split
only: 8 bytes per token for the run.

Where a piece ends, searching the second half of its window from the end: before a space between
two letters; else before whitespace after a letter or digit; else after a single newline that
follows a non-space and precedes a letter (text without spaces, such as Chinese or Japanese with a
line break after "。"); else, in text with none of these, at ``PIECE_CHARS`` (a word may be cut in
two). The pre-tokenizers of byte-level BPE tokenizers (GPT-2, GPT-NeoX, Llama 3, Qwen2 and the
like) split text at these places too, so, but for a cut at ``PIECE_CHARS``, the tokens are exactly
those of the whole document (``tests/test_data_bounds.py`` checks GPT-2's and Llama 3's rules).
Tokenizers that mark the start of every text (Llama 2's and Mistral's SentencePiece "▁" in their
legacy form) would add that mark at every piece: a probe of the tokenizer, once per call (``tok("a
b") == tok("a") + tok("b")`` but not ``tok("a") + tok(" b")``), finds them, and a piece that starts
with a space after a non-space is then tokenized without that space, which gives the whole
document's tokens (byte-level BPE with ``add_prefix_space`` needs no such help: it adds no mark
before a space). With these tokenizers, a piece that starts other than at a space (a cut before a
line break or tab, after a line break, or inside a word) starts with the mark, and the tokens next
to that cut may differ; cuts are at least 32 Ki characters apart, and only documents longer than
64 Ki characters have any.

Blocks are cached on disk in ``$HNKIT_CACHE/text``: ``<key>.int32``, the token ids as int32 with the
last partial block dropped, and ``<key>.json``, its size and the sha256 of all the token ids
(computed while they are written; a resume compares it, so the same text at another path or with
new file times is the same data). The key hashes the data files (path, size, mtime), the
tokenizer's serialized form, the block size, the text field and ``CACHE_FORMAT`` (how text is cut),
so a second run does not tokenize again. Both files are written under temporary names (``mkstemp``,
unique across the machines sharing a cache), synced and renamed into place; temporary files older
than a day (runs killed while writing) are removed, and a cache file of the wrong size is
tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .errors import HnkitError, first_line
from .preserve import WEIGHT as PRESERVE_WEIGHT
from .util import atomic_write, cache_root, check_hub_model


# -- model -------------------------------------------------------------------------------------
def load_causal_lm(name: str, dtype=None):
    """A causal LM and its tokenizer from a local folder or a hub id; one-line errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    looks_local = name.startswith(("/", "./", "../", "~")) or os.path.exists(name)
    path = Path(name).expanduser()
    if looks_local and not path.is_dir():
        raise HnkitError(f"{name}: no such model folder")
    if looks_local and not (path / "config.json").is_file():
        raise HnkitError(f"{name}: not a transformers model folder (no config.json)")
    if not looks_local:
        check_hub_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if looks_local else name)
        model = AutoModelForCausalLM.from_pretrained(str(path) if looks_local else name, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise HnkitError(f"{name}: could not load the model ({first_line(exc)})") from None
    return model, tokenizer


def context_length(model) -> int | None:
    c = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(c, attr, None), int):
            return getattr(c, attr)
    return None


# -- data --------------------------------------------------------------------------------------
PIECE_CHARS = 64 * 1024  # text is tokenized in pieces of at most this many characters
BATCH_CHARS = 512 * 1024  # characters per tokenizer call (8 pieces: enough to keep 8 cores busy)
MAX_LINE_BYTES = 16 * 1024 * 1024  # the longest JSON line (one record) read: see the module docstring


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def _data_files(path: Path) -> list[Path]:
    """The files whose content makes up the data (what the cache key is computed from)."""
    if path.is_file():
        return [path]
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(path.rglob("*.txt"))


def read_pieces(data: str | os.PathLike, text_field: str = "text", piece_chars: int = PIECE_CHARS,
                max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, bool]]:
    """The text of the data in order, in pieces of at most ``piece_chars`` characters, each with
    whether it ends a document; read as it is consumed. Documents: a .txt file, each .txt file of
    a folder, the ``text_field`` of each record of a .jsonl/.json file, or of each row of a folder
    written by ``datasets.Dataset.save_to_disk``; blank ones are skipped. A JSON line longer than
    ``max_line_bytes`` is refused before it is parsed."""
    path = Path(data)
    if not path.exists():
        raise HnkitError(f"{data}: no such file or folder")
    found = False
    for chunks in _documents(path, text_field, piece_chars, max_line_bytes):
        last = None
        for piece in _pieces(chunks, piece_chars):
            if last is not None:
                yield last, False
            last = piece
        yield last, True
        found = True
    if not found:
        raise HnkitError(f"{data}: no text found (empty data)")


def _documents(path: Path, text_field: str, size: int, max_line_bytes: int) -> Iterator[Iterator[str]]:
    """Each non-blank document, as its text in chunks of ``size`` characters."""
    if _is_saved_dataset(path) or path.is_file() and path.suffix in (".jsonl", ".json"):
        texts = _read_json_lines(path, text_field, max_line_bytes) if path.is_file() else \
            _saved_dataset_texts(path, text_field)
        for text in texts:
            if isinstance(text, str) and text and not text.isspace():
                yield (text[i:i + size] for i in range(0, len(text), size))
        return
    files = _data_files(path)
    if not files:
        raise HnkitError(f"{path}: no .txt files in this folder")
    for f in files:
        if any(not chunk.isspace() for chunk in _text_chunks(f, size)):  # reads up to the first text
            yield _text_chunks(f, size)


def _pieces(chunks: Iterable[str], size: int) -> Iterator[str]:
    """The text of ``chunks`` (each at most ``size`` characters) cut into pieces of at most
    ``size`` characters, at the places :func:`_cut` chooses."""
    text = ""
    for chunk in chunks:
        text += chunk
        while len(text) > size:
            cut = _cut(text, size)
            yield text[:cut]
            text = text[cut:]
    if text:
        yield text


_AFTER_WORD = re.compile(r"(?<=[^\W_])\s")  # whitespace after a letter or a digit
_AFTER_LINE = re.compile(r"(?<=\S\n)[^\W\d_]")  # a letter after a single newline that follows a non-space


def _cut(text: str, size: int) -> int:
    """Where to end a piece of ``text`` (longer than ``size``), searching the second half of its
    first ``size`` characters from the end: before a space between two letters, else before
    whitespace after a letter or digit, else after a single newline before a letter (word ends,
    where byte-level BPE tokenizers such as GPT-2's, Llama 3's and Qwen2's split too, so the tokens
    are those of the uncut text), else at ``size`` (text without such places: a word may be cut in
    two)."""
    low = size // 2
    i = text.rfind(" ", low, size)
    while i > low:
        if text[i - 1].isalpha() and text[i + 1].isalpha():
            return i
        i = text.rfind(" ", low, i)
    for rule in (_AFTER_WORD, _AFTER_LINE):
        ends = [m.start() for m in rule.finditer(text, low, size)]
        if ends:
            return ends[-1]
    return size


def _text_chunks(path: Path, size: int) -> Iterator[str]:
    """A text file in chunks of ``size`` characters (newlines read as ``\\n``)."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(size):
                yield chunk
    except UnicodeDecodeError:
        raise HnkitError(f"{path}: not UTF-8 text") from None


def _saved_dataset_texts(path: Path, text_field: str) -> Iterator:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys") and "train" in ds:  # a DatasetDict: take its train split
        ds = ds["train"]
    if text_field not in ds.column_names:
        raise HnkitError(f"{path}: no {text_field!r} column (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns([text_field]).iter(batch_size=64):
        yield from batch[text_field]


def _read_json_lines(path: Path, text_field: str, max_line_bytes: int) -> Iterator:
    """The ``text_field`` of each JSON object in a JSON-lines file (or a JSON array of objects),
    read line by line; a line longer than ``max_line_bytes`` is refused before it is parsed."""
    if path.suffix == ".json" and _starts_with(path, "["):
        rows = ((f"item {n}", row) for n, row in enumerate(_json_array(path, max_line_bytes), 1))
    else:
        rows = _json_lines(path, max_line_bytes)
    fields, n_rows, found = set(), 0, False
    for where, row in rows:
        if not isinstance(row, dict):
            raise HnkitError(f"{path}: expected one JSON object per line ({where} is not an object)")
        fields.update(row)
        n_rows += 1
        if text_field in row:
            found = True
            yield row[text_field]
    if n_rows and not found:
        raise HnkitError(f"{path}: no {text_field!r} field (fields: {', '.join(sorted(fields)) or 'none'})")


def _json_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[str, object]]:
    """("line N", parsed object) for each non-blank line of a JSON-lines file."""
    with open(path, "rb") as f:
        for n, line in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
            if len(line) > max_line_bytes:
                raise HnkitError(f"{path}: line {n} is longer than {max_line_bytes} bytes, the limit for one "
                                 f"JSON line; split it into smaller records (or use a .txt file)")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise HnkitError(f"{path}: line {n}: not UTF-8 text") from None
            if text.strip():
                yield f"line {n}", _parse_json(path, text, f"line {n}: ")


def _json_array(path: Path, max_line_bytes: int) -> list:
    """A .json file holding one array, parsed whole (so only up to ``max_line_bytes``)."""
    if path.stat().st_size > max_line_bytes:
        raise HnkitError(f"{path}: a JSON array file longer than {max_line_bytes} bytes is not read whole; "
                         "write it as JSON lines (.jsonl), one object per line")
    return _parse_json(path, "".join(_text_chunks(path, PIECE_CHARS)), "")


def _parse_json(path: Path, text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise HnkitError(f"{path}: {where}not valid JSON ({first_line(exc)})") from None


def _starts_with(path: Path, char: str) -> bool:
    """Whether the first non-blank character of a text file is ``char``."""
    for chunk in _text_chunks(path, 4096):
        if chunk.strip():
            return chunk.lstrip().startswith(char)
    return False


CACHE_FORMAT = "int32 token ids, pieces of 65536 cut by 3 rules, leading space dropped where a probe says"
TEMP_MAX_AGE = 24 * 3600  # seconds: older temporary files in the cache are a killed run's leftovers


def _cache_key(data: Path, tokenizer, block_size: int, text_field: str) -> str:
    h = hashlib.sha256()
    for f in _data_files(data):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{_tokenizer_digest(tokenizer)}|{tokenizer.eos_token_id}|{block_size}|{text_field}|".encode())
    h.update(f"{CACHE_FORMAT}|{PIECE_CHARS}".encode())  # the cache's format and how text is cut
    return h.hexdigest()[:24]


def _tokenizer_digest(tokenizer) -> str:
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
    cache, info = cache_root() / "text" / f"{key}.int32", cache_root() / "text" / f"{key}.json"
    digest = _cached_digest(cache, info, block_size)
    if digest is None:
        digest = _write_cache(data, tokenizer, block_size, text_field, cache, info)
    n = cache.stat().st_size // 4
    return torch.from_file(str(cache), size=n, dtype=torch.int32).view(-1, block_size).long(), digest


def _cached_digest(cache: Path, info: Path, block_size: int) -> str | None:
    """The token ids' sha256 of a sound cache entry; None when there is none, or when its file is
    not the size recorded or not whole blocks (then it is written again)."""
    try:
        record, size = json.loads(info.read_text()), cache.stat().st_size
        digest = record["sha256"]
        sound = record["bytes"] == size and size > 0 and size % (block_size * 4) == 0 and isinstance(digest, str)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if sound else None


def _write_cache(data, tokenizer, block_size: int, text_field: str, cache: Path, info: Path) -> str:
    """Tokenize ``data`` into ``cache`` (int32 ids, whole blocks) and ``info`` (its size and the
    ids' sha256), each written under a unique temporary name and renamed into place."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache.parent)
    h, size = hashlib.sha256(), 0
    strip = _marks_text_start(tokenizer)

    def write(f) -> None:
        nonlocal size
        for ids in _token_ids(read_pieces(data, text_field, PIECE_CHARS, MAX_LINE_BYTES), tokenizer, strip):
            h.update(ids.tobytes())
            ids.tofile(f)
        n_tokens = f.tell() // 4
        if n_tokens < block_size:
            raise HnkitError(f"{data}: only {n_tokens} tokens, fewer than one block of {block_size}")
        size = n_tokens // block_size * block_size * 4
        f.truncate(size)  # drop the last partial block

    atomic_write(cache, write)
    record = json.dumps({"bytes": size, "sha256": h.hexdigest()}).encode()
    atomic_write(info, lambda f: f.write(record))
    return h.hexdigest()


def _remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files of runs killed while writing the cache (older than a day)."""
    import time

    for tmp in folder.glob(".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > TEMP_MAX_AGE:
                tmp.unlink()
        except OSError:
            pass  # another run removed it first


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

