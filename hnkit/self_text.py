"""Neutral text for prior preservation that nobody has to supply: text the bare model writes itself.

Without ``--preserve-data``, ``hnkit train-text`` preserves the model's next-token distributions
on blocks it samples from the bare model (before anything is attached), as DreamBooth preserves a
class with images the model generated itself. How the blocks are made, and why:

- each block starts from the end-of-sequence token alone, the separator ``train-text`` puts between
  documents, so a block is what a fresh document of the model's own looks like, in any language or
  register the model favours, with no prompt chosen by hand;
- the tokens are drawn by plain sampling (temperature 1, no top-p or top-k): then the KL on these
  blocks estimates the KL between the bare and the attached model over the whole text the bare
  model writes (a Monte Carlo estimate of the sequence-level KL), without the bias of a truncated
  distribution; an end-of-sequence token drawn mid-block starts a new document, as in packed data;
- ``block_size`` tokens each, as many as the teacher would use (one per training block) but at
  most :data:`MAX_BLOCKS`: sampling costs one forward per token, and the step pairs one neutral
  block with four style blocks, so a short run sees each of 64 blocks a few times at most;
- drawn on the CPU from a ``torch.Generator`` seeded with :data:`SEED` (the global RNG is neither
  reseeded nor drawn from), so the same model writes the same blocks on any device, up to the
  model's own numerics.

The blocks are cached in ``$HNKIT_CACHE/self_text`` (:mod:`hnkit.token_cache`: ``<key>.int32`` and
``<key>.json`` with the sha256 of the token ids, checked when read, as the file is small), keyed by
the model's files, the tokenizer, the block size, the count, the seed and :data:`METHOD`, so a
second run and a ``--resume`` reuse them.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch

from . import token_cache
from .errors import HnkitError

MAX_BLOCKS = 64  # neutral blocks written at most (see the module docstring; measured in docs/benchmarks.md)
BATCH = 64  # blocks sampled together: a decoding step reads all the weights whatever the rows (memory-bound),
# so 64 rows cost about what 16 do (SmolLM2-135M on the CPU: 0.8 s a step either way)
PROGRESS_LINES = 8  # progress lines per batch, at most
SEED = 0  # fixed, not the run's --seed: runs with other seeds share the cached blocks
METHOD = "self-text 1: EOS start, multinomial at temperature 1, CPU generator, batches of 64"


def count(n_train: int) -> int:
    """How many neutral blocks a run with ``n_train`` training blocks writes (one per training block,
    at most :data:`MAX_BLOCKS`; the teacher never uses more than one per training block)."""
    return max(1, min(n_train, MAX_BLOCKS))


def model_identity(model) -> str:
    """What identifies the model's weights: the files of the folder it was loaded from (name, size,
    modification time, and where a link points: a hub snapshot links to blobs named by content)."""
    from huggingface_hub import try_to_load_from_cache

    name = str(getattr(model.config, "name_or_path", "") or "")
    folder = Path(name).expanduser()
    if not folder.is_dir():  # a hub id: its snapshot in the local cache
        found = try_to_load_from_cache(name, "config.json") if name else None
        folder = Path(found).parent if isinstance(found, str) else None
    if folder is None:
        raise HnkitError(f"{name or 'the model'}: cannot tell which weights it has (no local folder); "
                         "give --preserve-data, or --no-preserve")
    h = hashlib.sha256(type(model).__name__.encode())
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}|{f.resolve().name}\n".encode())
    return h.hexdigest()


def self_blocks(model, tokenizer, n: int, block_size: int, say=None) -> tuple[torch.Tensor, str]:
    """``n`` blocks of ``block_size`` tokens sampled from ``model`` as it is (attach nothing
    before), shape ``[n, block_size]``, and the sha256 of their token ids; cached on disk.
    ``say(line)``: where progress goes (a few lines), or None."""
    say = say or (lambda line: None)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise HnkitError("the tokenizer has no end-of-sequence token to start the neutral text from")
    key = hashlib.sha256(f"{model_identity(model)}|{token_cache.tokenizer_digest(tokenizer)}|{eos}|{block_size}|"
                         f"{n}|{SEED}|{METHOD}".encode()).hexdigest()[:24]
    data, info = token_cache.entry("self_text", key)
    cached = token_cache.read(data, info, block_size, rehash=True, sound=lambda record, size: (
        (record["blocks"], record["block_size"], size) == (n, block_size, n * block_size * 4)))
    if cached is not None:
        say(f"neutral text for prior preservation: reusing the {n} blocks of {block_size} tokens cached in {data}")
        return cached[0], cached[1]["sha256"]
    blocks = sample_blocks(model, eos, n, block_size, say)
    raw = blocks.to(torch.int32).numpy().tobytes()

    def write(f) -> dict:
        f.write(raw)
        return {"blocks": n, "block_size": block_size, "sha256": hashlib.sha256(raw).hexdigest(), "method": METHOD}

    return blocks, token_cache.write(data, info, write)["sha256"]


@torch.no_grad()
def sample_blocks(model, start_token: int, n: int, block_size: int, say=None) -> torch.Tensor:
    """``n`` blocks of ``block_size`` tokens, each ``start_token`` then tokens drawn from ``model``
    (temperature 1) with a CPU generator seeded with :data:`SEED`, :data:`BATCH` blocks at a time."""
    generator = torch.Generator().manual_seed(SEED)
    out = []
    for i in range(0, n, BATCH):
        rows = min(BATCH, n - i)

        def progress(length: int) -> None:
            if say:
                say(f"neutral text for prior preservation: the model wrote {length}/{block_size} tokens of "
                    f"blocks {i + 1}-{i + rows} of {n}")

        out.append(_sample_batch(model, start_token, rows, block_size, generator, progress))
    if say:
        say(f"neutral text for prior preservation: the model wrote {n}/{n} blocks of {block_size} tokens")
    return torch.cat(out)


def _sample_batch(model, start_token: int, rows: int, block_size: int, generator, progress) -> torch.Tensor:
    """One batch of sampled blocks, with the KV cache (its keyword: ``cache`` since transformers 5,
    ``past_key_values`` before); ``progress(tokens)`` every ``block_size / PROGRESS_LINES`` tokens."""
    device = next(model.parameters()).device
    parameters = inspect.signature(model.forward).parameters
    cache_key = "cache" if "cache" in parameters else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    ids = torch.full((rows, 1), start_token, dtype=torch.long)
    out = model(input_ids=ids.to(device), use_cache=True, **last_only)
    every = max(1, block_size // PROGRESS_LINES)
    while ids.shape[1] < block_size:
        if ids.shape[1] % every == 0:
            progress(ids.shape[1])
        probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, token], dim=1)
        if ids.shape[1] < block_size:
            out = model(input_ids=token.to(device), use_cache=True, **last_only,
                        **{cache_key: getattr(out, cache_key)})
    return ids
