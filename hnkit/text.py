"""The text task: a causal LM learns a style. Data through `datasets`, tokenized and packed once.

    documents -> token ids (EOS after each document) -> fixed-size blocks -> train / validation

Blocks are cached on disk (``$HNKIT_CACHE/text/<key>``), keyed by the data files (path, size,
mtime), the tokenizer and the block size, so a second run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from .errors import HnkitError, first_line
from .preserve import WEIGHT as PRESERVE_WEIGHT
from .util import cache_root, check_hub_model


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


def read_documents(data: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents from a .txt file, a folder of .txt files, a .jsonl/.json file with a text field,
    or a folder written by ``datasets.Dataset.save_to_disk``."""
    path = Path(data)
    if not path.exists():
        raise HnkitError(f"{data}: no such file or folder")
    if _is_saved_dataset(path):
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys") and "train" in ds:  # a DatasetDict: take its train split
            ds = ds["train"]
        if text_field not in ds.column_names:
            raise HnkitError(f"{data}: no {text_field!r} column (columns: {', '.join(ds.column_names)})")
        docs = ds[text_field]
    elif path.is_dir():
        files = _data_files(path)
        if not files:
            raise HnkitError(f"{data}: no .txt files in this folder")
        docs = [_read_text(f) for f in files]
    elif path.suffix in (".jsonl", ".json"):
        docs = _read_json_lines(path, text_field)
    else:
        docs = [_read_text(path)]
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise HnkitError(f"{data}: no text found (empty data)")
    return docs


def _read_json_lines(path: Path, text_field: str) -> list:
    """The ``text_field`` of each JSON object in a JSON-lines file (or a JSON array of objects)."""
    text = _read_text(path)
    try:
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    rows.append(json.loads(line))
    except ValueError as exc:
        where = f"line {n}: " if path.suffix == ".jsonl" or not text.lstrip().startswith("[") else ""
        raise HnkitError(f"{path}: {where}not valid JSON ({first_line(exc)})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise HnkitError(f"{path}: expected one JSON object per line")
    if rows and not any(text_field in r for r in rows):
        fields = sorted({k for r in rows for k in r})
        raise HnkitError(f"{path}: no {text_field!r} field (fields: {', '.join(fields) or 'none'})")
    return [r.get(text_field) for r in rows]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HnkitError(f"{path}: not UTF-8 text") from None


def _cache_key(data: Path, tokenizer, block_size: int, text_field: str) -> str:
    h = hashlib.sha256()
    for f in _data_files(data):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{tokenizer.name_or_path}|{len(tokenizer)}|{tokenizer.eos_token_id}|{block_size}|{text_field}".encode())
    return h.hexdigest()[:24]


def tokenized_blocks(data: str | os.PathLike, tokenizer, block_size: int, text_field: str = "text") -> torch.Tensor:
    """All blocks of ``block_size`` tokens, shape (n_blocks, block_size); cached on disk."""
    from datasets import Dataset, load_from_disk

    if tokenizer.eos_token_id is None:
        raise HnkitError("the tokenizer has no end-of-sequence token to separate documents")
    cache = cache_root() / "text" / _cache_key(Path(data), tokenizer, block_size, text_field)
    if not cache.is_dir():
        docs = read_documents(data, text_field)
        ds = Dataset.from_dict({"text": docs})
        eos = tokenizer.eos_token_id

        def tokenize(batch):
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [x + [eos] for x in ids]}

        def pack(batch):
            flat = [t for ids in batch["input_ids"] for t in ids]
            n = len(flat) // block_size
            return {"input_ids": [flat[i * block_size:(i + 1) * block_size] for i in range(n)]}

        ds = ds.map(tokenize, batched=True, remove_columns=["text"])
        n_tokens = sum(len(x) for x in ds["input_ids"])
        ds = ds.map(pack, batched=True, batch_size=len(ds))  # one batch: nothing dropped between documents
        if len(ds) == 0:
            raise HnkitError(f"{data}: only {n_tokens} tokens, fewer than one block of {block_size}")
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ds.save_to_disk(str(tmp))
        os.replace(tmp, cache)
    return torch.tensor(load_from_disk(str(cache))["input_ids"], dtype=torch.long)


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

