"""``hnkit eval-text``: how strongly does a style act, and what does it cost the rest of the language?

For each hypernetwork, held-out perplexity on the style corpus (should fall as the strength rises)
and on a neutral corpus (should not rise much) across a sweep of factors on its strength.

    hnkit eval-text --model runs/base --hypernetwork noir.safetensors --style-data noir/ \\
        --neutral-data wiki.txt --strengths 0,0.5,1,1.5 --plot noir-eval.png

The style corpus is split as ``train-text`` splits it (``--val-fraction``, ``--seed``, same
``--block-size``), so the blocks measured are the ones that run held out. The neutral corpus is
never trained on; a seeded sample of its blocks is measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import HnkitError
from .common import check_styles_fit, load_styles, parse_factors, same_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    parser.add_argument("--hypernetwork", action="append", required=True, metavar="FILE[:STRENGTH]",
                        help="a style file and its strength (default 1); repeat to compare several")
    parser.add_argument("--style-data", required=True, help="the style's corpus (as for train-text --data)")
    parser.add_argument("--neutral-data", help="a corpus the style should leave alone (optional)")
    parser.add_argument("--strengths", default="0,0.25,0.5,0.75,1,1.25",
                        help="factors on each style's strength (default: 0,0.25,0.5,0.75,1,1.25)")
    parser.add_argument("--plot", default=None, metavar="NAME.png",
                        help="also draw a PNG of perplexity against factor; with --neutral-data also NAME-front.png, "
                             "style gain against neutral cost")
    parser.add_argument("--max-neutral-cost", default=None, metavar="LIMIT",
                        help="with --neutral-data: the recommended strength is the one with the largest style gain "
                             "whose neutral perplexity rises by at most this much: a percent (3%%) or a fraction "
                             "(0.03); a bare number above 1 is refused (default: 3%%)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--force", action="store_true", help="replace existing --plot / --json files")
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per block (default: the first network's training setting, else 256)")
    parser.add_argument("--max-blocks", type=int, default=32, help="blocks measured per corpus (default: 32)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="held-out share of the style corpus (default: the first network's training "
                             "setting, else 0.05)")
    parser.add_argument("--seed", type=int, default=None,
                        help="split seed (default: the first network's training setting, else 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward (default: 8)")
    parser.add_argument("--text-field", default=None,
                        help="text field of .jsonl / datasets input (default: as trained, else 'text')")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


DATA_DEFAULTS = {"block_size": 256, "val_fraction": 0.05, "seed": 0, "text_field": "text"}
MAX_NEUTRAL_COST = "3%"


def neutral_cost_limit(text: str) -> float:
    """``--max-neutral-cost`` as a fraction: "3%" and "0.03" are both 0.03. A bare number above 1
    is refused: "3" could mean 3 % or 300 %."""
    text = str(text).strip()
    percent = text.endswith("%")
    try:
        value = float(text[:-1] if percent else text) / (100 if percent else 1)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise HnkitError(f"--max-neutral-cost {text}: expected a percent (3%) or a fraction (0.03), at least 0")
    if not percent and value > 1:
        raise HnkitError(f"--max-neutral-cost {text}: a bare number is a fraction (0.03 is 3 %); "
                         f"write {text}% for {text} %")
    return value


def front_plot(plot: str) -> Path:
    stem = Path(plot)
    return stem.with_name(f"{stem.stem}-front{stem.suffix or '.png'}")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model is loaded, each mistake in one line."""
    for option in ("block_size", "max_blocks", "batch_size"):
        if getattr(args, option) <= 0:
            raise HnkitError(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    for data in (args.style_data, args.neutral_data):
        if data is not None and not Path(data).exists():
            raise HnkitError(f"{data}: no such file or folder")
    if not 0 < args.val_fraction < 1:
        raise HnkitError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.neutral_data is None and args.max_neutral_cost is not None:
        raise HnkitError("--max-neutral-cost needs --neutral-data (the cost is measured on the neutral text)")
    if args.neutral_data is not None and same_corpus(Path(args.style_data), Path(args.neutral_data)):
        raise HnkitError(f"--neutral-data {args.neutral_data} is the same text as --style-data {args.style_data}; "
                         "the neutral text is one the style should leave alone (e.g. general prose)")
    args.max_neutral_cost = neutral_cost_limit(args.max_neutral_cost or MAX_NEUTRAL_COST)
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise HnkitError(f"--plot {args.plot}: a plot is a PNG; name it {Path(args.plot).stem}.png")
    outputs = [args.json] if args.json else []
    if args.plot:
        outputs += [args.plot, front_plot(args.plot)] if args.neutral_data else [args.plot]
    check_outputs(outputs, args.force)


def check_outputs(paths, force: bool) -> None:
    """Before any work: each output file is new (or ``force``), and its folder can be written."""
    import os

    for path in map(Path, paths):
        if path.is_dir():
            raise HnkitError(f"{path}: is a folder; name a file")
        if path.exists() and not force:
            raise HnkitError(f"{path}: already exists; choose another name or add --force to replace it")
        folder = next(p for p in path.absolute().parents if p.exists())
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise HnkitError(f"{path}: cannot write there ({folder} is not a writable folder)")


def held_out_blocks(data, tokenizer, block_size, val_fraction, seed, max_blocks, text_field="text"):
    """The style corpus's validation blocks, as train-text splits them (all blocks if there are none)."""
    from ..text import split_blocks, tokenized_blocks

    blocks = tokenized_blocks(data, tokenizer, block_size, text_field)
    _, val = split_blocks(blocks, val_fraction, seed)
    return (val if len(val) else blocks)[:max_blocks]


def sample_blocks(data, tokenizer, block_size, seed, max_blocks, text_field="text"):
    from ..text import tokenized_blocks

    blocks = tokenized_blocks(data, tokenizer, block_size, text_field)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[order[:max_blocks]]


def sweep(model, styles, corpora: dict, factors: list[float], batch_size: int = 8) -> tuple[dict, dict]:
    """``({style name: {corpus name: [perplexity per factor]}}, {corpus name: the bare model's
    perplexity})``; factor 0 is the bare model, measured once."""
    import hnkit

    from ..text import perplexity

    bare = {name: perplexity(model, blocks, batch_size) for name, blocks in corpora.items()}
    results = {}
    for hn, strength in styles:
        per_corpus = {name: [] for name in corpora}
        with hnkit.attach(model, hn, 0.0) as handle:
            for f in factors:
                handle.strength = strength * f
                for name, blocks in corpora.items():
                    value = bare[name] if strength * f == 0 else perplexity(model, blocks, batch_size)
                    per_corpus[name].append(value)
        results[_unique(hn.name, results)] = per_corpus
    return results, bare


def report_front(results: dict, bare: dict, styles, factors, args, report: dict) -> None:
    """Print each style's Pareto front and recommended strength, draw the fronts, add both to ``report``."""
    from rich.console import Console
    from rich.table import Table

    from ..front import pareto_front, points, recommend
    from ..plot import line_plot

    console, curves = Console(), {}
    for (name, per), (_, strength) in zip(results.items(), styles):
        pts = points(factors, per["style"], per["neutral"], bare["style"], bare["neutral"])
        front = pareto_front(pts)
        best = recommend(pts, args.max_neutral_cost)
        table = Table("factor", "strength", "style gain", "neutral cost", title=f"{name}: Pareto front")
        for f, gain, cost in front:
            table.add_row(f"{f:g}", f"{f * strength:g}", f"{gain:+.1%}", f"{cost:+.1%}")
        console.print(table)
        print(f"{name}: recommended strength {best[0] * strength:g} (factor {best[0]:g}): style perplexity "
              f"{-best[1]:+.1%}, neutral {best[2]:+.1%} (limit {args.max_neutral_cost:+.1%})")
        curves[name] = [(100 * cost, 100 * gain) for _, gain, cost in front]
        report["styles"][name].update(
            front=[{"factor": f, "style_gain": g, "neutral_cost": c} for f, g, c in front],
            recommended={"factor": best[0], "strength": best[0] * strength, "style_gain": best[1],
                         "neutral_cost": best[2], "max_neutral_cost": args.max_neutral_cost})
    if args.plot:
        path = line_plot(curves, front_plot(args.plot),
                         title="Pareto front: style gain % (up) against neutral cost % (right)")
        print(f"wrote {path}")


def _unique(name: str, taken) -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name} ({n})", n + 1
    return out


def run(args: argparse.Namespace) -> dict:
    from rich.console import Console
    from rich.table import Table

    from ..plot import line_plot
    from ..text import context_length, load_causal_lm
    from ..util import choose_device

    factors = parse_factors(args.strengths)
    styles = load_styles(args.hypernetwork)
    # the style corpus is split as its training run split it: the settings train-text stored in the file
    trained = styles[0][0].extra.get("data") if isinstance(styles[0][0].extra.get("data"), dict) else {}
    for option, fallback in DATA_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, trained.get(option, fallback))
    check_arguments(args)
    device = choose_device(args.device)
    model, tokenizer = load_causal_lm(args.model)
    model.eval()
    model.to(device)
    check_styles_fit(model, styles)
    ctx = context_length(model)
    if ctx is not None and args.block_size > ctx:
        raise HnkitError(f"--block-size {args.block_size} is larger than the model's context of {ctx} tokens")
    corpora = {"style": held_out_blocks(args.style_data, tokenizer, args.block_size, args.val_fraction, args.seed,
                                        args.max_blocks, args.text_field)}
    if args.neutral_data:
        corpora["neutral"] = sample_blocks(args.neutral_data, tokenizer, args.block_size, args.seed,
                                           args.max_blocks, args.text_field)
    results, bare = sweep(model, styles, corpora, factors, args.batch_size)

    sizes = ", ".join(f"{name} {len(b)} x {args.block_size} tokens" for name, b in corpora.items())
    table = Table("factor", *[f"{style}\n{corpus}" for style, per in results.items() for corpus in per],
                  title=f"held-out perplexity ({sizes}); strength = factor x the file's strength")
    for i, f in enumerate(factors):
        table.add_row(f"{f:g}", *[f"{values[i]:.3f}" for per in results.values() for values in per.values()])
    Console().print(table)
    series = {f"{style}: {corpus}": list(zip(factors, values))
              for style, per in results.items() for corpus, values in per.items()}
    if args.plot:
        print(f"wrote {line_plot(series, args.plot, title='held-out perplexity vs factor on the strength')}")
    report = {"model": args.model, "factors": factors, "block_size": args.block_size,
              "blocks": {name: len(b) for name, b in corpora.items()},
              "styles": {style: {"file": spec, "perplexity": per}
                         for (style, per), spec in zip(results.items(), args.hypernetwork)}}
    if "neutral" in corpora:
        report_front(results, bare, styles, factors, args, report)
    if args.json:
        from ..util import atomic_write

        atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=2).encode()))
        print(f"wrote {args.json}")
    return report
