"""Train a style generator (hnkit.generator) episodically on the style library.

    python scripts/build_style_library.py             # once: the styles, under ~/.cache/hnkit/styles
    python scripts/train_generator.py --minutes 40    # SmolLM2-135M-Instruct -> hnkit/generators/...

Each step draws one training style per style row: the example is one of its documents (read by the frozen
base model, as make_style reads it), the target a block of ANOTHER document of the same style; every row
gets the style generated from its own example. Neutral rows (by default text the bare model writes
itself, as train-text's prior preservation uses; or the library's neutral "preserve" documents) carry
the styles of the first rows and add the KL divergence from the bare model, so a generated style keeps
the model's ordinary language. The same neutral text centres and scales the generator's features. The generator
starts as the identity (it writes x -> x) and only its own weights train; the base stays frozen.
Only training styles' "train" documents are read: held-out styles and held-out documents stay unseen.

--contrast-weight W adds the example-specific term. The style rows then come in pairs of similar styles
(the second drawn from the first's --partners nearest, by their mean features), and every row's target is
scored once more under the style generated from its pair's example: whatever that wrong style gains over
the bare model there (per token, clipped at zero) is a loss. What similar styles share then earns
nothing; only what the example says of its own style does. --init-generator G starts from a trained generator
(its neutral statistics and weights) instead of the identity.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hnkit.generator import SHIPPED, GeneratorConfig, StyleGenerator  # noqa: E402
from hnkit.preserve import Teacher, coarse_kl  # noqa: E402
from hnkit.self_text import self_blocks  # noqa: E402
from hnkit.targets import find_target  # noqa: E402
from hnkit.util import cache_root  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(cache_root() / "SmolLM2-135M-Instruct"))
    p.add_argument("--library", default=str(cache_root() / "styles"))
    p.add_argument("--output", default=str(SHIPPED))
    p.add_argument("--minutes", type=float, default=40.0, help="stop after this much training time")
    p.add_argument("--steps", type=int, default=100_000, help="or after this many steps")
    p.add_argument("--styles-per-step", type=int, default=4)
    p.add_argument("--neutral-rows", type=int, default=1)
    p.add_argument("--block", type=int, default=128, help="tokens of a target block")
    p.add_argument("--neutral", choices=["self", "library"], default="self",
                   help="neutral text: what the bare model writes itself (train-text's default preservation) "
                        "or the library's neutral preserve documents")
    p.add_argument("--neutral-blocks", type=int, default=128, help="neutral blocks for the KL term")
    p.add_argument("--save-every", type=int, default=100, help="write the generator every N steps too")
    p.add_argument("--examples-per-style", type=int, default=12, help="documents per style read as examples")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--contrast-weight", type=float, default=0.0,
                   help="weight of the wrong-style gain penalty (0: off; see the module docstring)")
    p.add_argument("--partners", type=int, default=3, help="with --contrast-weight: a row's wrong style is one "
                                                            "of its style's this many nearest styles")
    p.add_argument("--init-generator", default=None, help="start from this generator file, not the identity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.contrast_weight > 0 and (args.styles_per_step < 2 or args.styles_per_step % 2):
        p.error("--contrast-weight needs an even --styles-per-step: the rows come in pairs")
    return args


def load_library(root: Path, tokenizer) -> tuple[dict, list]:
    """Training styles' train documents as token lists, and the neutral preserve documents'."""
    manifest = json.loads((root / "manifest.json").read_text())
    styles = {}
    for name, s in sorted(manifest["styles"].items()):
        if s["split"] == "train":
            styles[name] = [tokenizer((root / name / d).read_text(), add_special_tokens=False)["input_ids"]
                            for d in s["docs"]["train"]]
    neutral = [tokenizer((root / "neutral" / d).read_text(), add_special_tokens=False)["input_ids"]
               for d in manifest["neutral"]["docs"]["preserve"]]
    return styles, neutral


def packed_blocks(docs: list, block: int, eos: int, limit: int) -> torch.Tensor:
    flat = [t for d in docs for t in d + [eos]]
    n = min(limit, len(flat) // block)
    return torch.tensor(flat[: n * block]).view(n, block)


def padded(rows: list, pad: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a mask (1 = a token) for token lists."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def read_all(gen, model, docs: list, pad: int, batch: int = 8) -> torch.Tensor:
    """Site means ``[N, L, D]`` of documents read as examples (their first max_tokens tokens)."""
    out = []
    for i in range(0, len(docs), batch):
        ids, mask = padded([d[: gen.config.max_tokens] for d in docs[i:i + batch]], pad)
        out.append(gen.read(model, ids, mask))
    return torch.cat(out)


def neutral_statistics(gen, model, blocks: torch.Tensor) -> None:
    """Centre and scale of the generator's features: the mean over neutral blocks of their site means,
    and per site one scale, the RMS over dimensions of those means' spread."""
    means = torch.cat([gen.read(model, blocks[i:i + 8]) for i in range(0, len(blocks), 8)])
    with torch.no_grad():
        gen.mu.copy_(means.mean(0))
        spread = means.std(0).pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
        gen.sigma.copy_(spread.expand_as(gen.sigma))


def episode(rng: random.Random, styles: dict, names: list, feats: dict, block: int, k: int,
            partners: dict | None = None):
    """``k`` (style, example document index, target tokens) with the target from another document.
    With ``partners`` (style -> its nearest styles) the styles come in pairs, each second one drawn from
    the first's partners: rows 2i and 2i+1 are similar styles (each one's hard wrong style)."""
    if partners:
        chosen = []
        for _ in range(k // 2):
            name = rng.choice([n for n in names if n not in chosen])
            free = [n for n in partners[name] if n not in chosen] or [n for n in names if n not in chosen + [name]]
            chosen += [name, rng.choice(free)]
    else:
        chosen = rng.sample(names, k)
    out = []
    for name in chosen:
        docs = styles[name]
        a = rng.randrange(len(feats[name]))
        b = rng.choice([i for i in range(len(docs)) if i != a])
        doc = docs[b]
        start = rng.randrange(max(1, len(doc) - block + 1))
        out.append((name, a, doc[start:start + block]))
    return out


def nearest_styles(gen, feats: dict, k: int) -> dict:
    """Each style's ``k`` nearest other styles: cosine of their mean generator features (as make_style
    centres and scales them)."""
    names = sorted(feats)
    centred = torch.stack([gen.features(feats[n].mean(0)).flatten() for n in names])
    sims = torch.nn.functional.normalize(centred, dim=1) @ torch.nn.functional.normalize(centred, dim=1).T
    sims.fill_diagonal_(-2.0)
    return {n: [names[j] for j in sims[i].topk(min(k, len(names) - 1)).indices.tolist()] for i, n in enumerate(names)}


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL per token of each row ``[B]`` (labels -100: not scored)."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none")
    scored = (labels[:, 1:] != -100).sum(1).clamp_min(1)
    return ce.view(len(labels), -1).sum(1) / scored


def styled_logits(gen, model, target, ids: torch.Tensor, g: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` with row r under the style of codes ``g[r], b2[r]`` (the per-row residual)."""
    def kernel(layer):
        return lambda x, which: x + gen.residual(x, layer, which, g[:, layer, which], b2[:, layer, which])

    undo = [site.install(kernel(i)) for i, site in enumerate(target.sites)]
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        for u in reversed(undo):
            u()


def step_loss(gen, model, target, rows, feats, neutral, teacher, args, pad, n_idx) -> tuple[torch.Tensor, dict]:
    """The loss of one step and its parts: the style rows' NLL under their own generated styles, the
    neutral rows' KL from the bare model, and (--contrast-weight) the gain of the next row's style on
    each row's target over the bare model, clipped at zero."""
    s = len(rows)
    means = torch.stack([feats[name][a] for name, a, _ in rows])
    ids, mask = padded([t for _, _, t in rows], pad, args.block)
    labels = ids.masked_fill(mask == 0, -100)
    own = torch.arange(s)
    contrast = args.contrast_weight > 0
    # the styles' codes per row: their own, then (contrast) their pair's: rows come in pairs of similar styles
    scored = [own, own ^ 1] if contrast else [own]
    pick = torch.cat(scored + [torch.arange(len(n_idx)) % s])  # neutral rows carry the first styles
    g, b2 = gen.codes(means)
    batch = torch.cat([ids] * len(scored) + [neutral[n_idx]])
    logits = styled_logits(gen, model, target, batch, g[pick], b2[pick])
    nll = F.cross_entropy(logits[:s, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    kl = coarse_kl(teacher.values[n_idx], teacher.indices[n_idx], teacher.rest[n_idx], logits[len(batch) - len(n_idx):])
    loss, parts = nll + args.kl_weight * kl, {"nll": nll.item(), "kl": kl.item()}
    if contrast:
        with torch.no_grad():
            bare = row_nll(model(input_ids=ids, use_cache=False).logits, labels)
        gains = bare - row_nll(logits[s:2 * s], labels)  # per row: what the wrong style gains on the target
        wrong_gain = gains.clamp_min(0).mean()
        loss = loss + args.contrast_weight * wrong_gain
        parts["wrong_gain"], parts["wrong_gain_rows"] = wrong_gain.item(), gains.tolist()
    return loss, parts


def train_step(gen, model, target, opt, rows, feats, neutral, teacher, args, pad) -> dict:
    n_idx = torch.randint(len(neutral), (args.neutral_rows,))
    loss, parts = step_loss(gen, model, target, rows, feats, neutral, teacher, args, pad, n_idx)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in gen.parameters() if p.requires_grad], 1.0)
    opt.step()
    return parts


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    model.requires_grad_(False)
    pad = tokenizer.eos_token_id
    styles, neutral_docs = load_library(Path(args.library), tokenizer)
    names = sorted(styles)
    if args.neutral == "self":  # cached under $HNKIT_CACHE/self_text, as train-text's
        neutral, _ = self_blocks(model, tokenizer, args.neutral_blocks, args.block, print)
    else:
        neutral = packed_blocks(neutral_docs, args.block, pad, args.neutral_blocks)
    if args.init_generator:  # its weights and its neutral statistics
        gen = StyleGenerator.load(args.init_generator)
        gen.check_model(model)
        gen.name = Path(args.output).stem
    else:
        gen = StyleGenerator.for_model(model, GeneratorConfig(), name=Path(args.output).stem)
        neutral_statistics(gen, model, neutral[:64])
    init = {"file": Path(args.init_generator).name, "sha256": gen.sha256, "info": gen.info} if args.init_generator else None
    feats = {name: read_all(gen, model, styles[name][: args.examples_per_style], pad) for name in names}
    teacher = Teacher(model, neutral)
    partners = nearest_styles(gen, feats, args.partners) if args.contrast_weight > 0 else None
    prep = time.time() - t0
    print(f"{len(names)} training styles, {sum(map(len, styles.values()))} documents, "
          f"{len(neutral)} neutral blocks; prepared in {prep:.0f} s", flush=True)
    target = find_target(model)
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    t1, step, ema = time.time(), 0, {}
    while step < args.steps and time.time() - t1 < args.minutes * 60:
        rows = episode(rng, styles, names, feats, args.block, args.styles_per_step, partners)
        parts = train_step(gen, model, target, opt, rows, feats, neutral, teacher, args, pad)
        ema = {k: v if k not in ema else 0.95 * ema[k] + 0.05 * v
               for k, v in parts.items() if isinstance(v, float)}  # not the per-row list
        step += 1
        if step == 1 or step % 20 == 0:
            wrong = f" wrong-style gain {ema['wrong_gain']:.4f}" if "wrong_gain" in ema else ""
            print(f"step {step}: style nll {ema['nll']:.3f} neutral kl {ema['kl']:.4f}{wrong} "
                  f"({time.time() - t1:.0f} s)", flush=True)
        if step % args.save_every == 0:
            save(gen, args, argv, step, time.time() - t1, prep, names, ema, init)
    seconds = time.time() - t1
    save(gen, args, argv, step, seconds, prep, names, ema, init)
    print(f"wrote {args.output} after {step} steps in {seconds:.0f} s (+{prep:.0f} s preparing)", flush=True)


def save(gen, args, argv, step, seconds, prep, names, ema, init) -> None:
    """Writes the generator with how it was made: the command, its time, and the generator it started from."""
    gen.info = {"command": "python scripts/train_generator.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "steps": step, "train_seconds": round(seconds), "prepare_seconds": round(prep),
                "threads": args.threads, "styles": names, "neutral": args.neutral,
                "machine": "2-core CPU" if args.threads == 2 else "",
                **{f"last_{k}": round(v, 5) for k, v in ema.items()}}
    if init:
        gen.info["init"] = init
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    gen.save(args.output)


if __name__ == "__main__":
    main()
