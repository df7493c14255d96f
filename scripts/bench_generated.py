"""Benchmark the style generator (issue 26): for every held-out style of the style library, how much of
the oracle's gain each method gets from one example text. Nothing here asserts a figure; it prints them.

    python scripts/build_style_library.py             # once: the styles, under ~/.cache/hnkit/styles
    python scripts/bench_generated.py                 # SmolLM2-135M-Instruct, the shipped generator (hours)
    python scripts/bench_generated.py --styles 3 --examples 1 --only generated vector   # a quick look
    python scripts/bench_generated.py --tiny          # a tiny model, library and generator: a smoke run

Methods, each measured the same way: NLL per token on the held-out style's test documents (each
document on its own, its first --block-size tokens) and on neutral test documents (--neutral-tokens):

- bare: the model alone; oracle: ``hnkit train-text`` defaults with ``--preserve-data`` (the library's
  neutral "preserve" documents) on the style's own training documents, --oracle-steps steps;
- prefix: the example before each document (only the document's tokens scored; the same ones);
- vector: the mean K/V input over the example's tokens minus the same mean over neutral text, as the
  constant bias of a per-site "lowrank" network (up.weight zero);
- union: as the oracle, on all training styles' training documents pooled, once;
- nearest: the training style whose generator features are nearest (cosine) to the example's, trained
  as the oracle on its training documents (only styles that are somebody's nearest);
- generated: ``gen.make_style(model, example)``; timed from the text to the attached style;
- wrong-style / wrong-neutral (controls): the generator given an example of another held-out style, or
  a neutral test document, measured on the true style's test documents.

share = (NLL_bare - NLL_method) / (NLL_bare - NLL_oracle), each method (the oracle too) at its own best
strength of the grid whose neutral perplexity is at most --max-neutral-cost above bare (none: share 0,
and the table says so); the median over the examples, then over styles with its spread (--baseline-examples N:
prefix, vector and nearest on each style's first N examples only, as they cost trainings). --train-styles
K training styles are measured too (generated and oracle on their held-out documents, examples from
their training documents).

Every unit of work is kept as a JSON (or .safetensors) file in --out, named with a hash of what it
depends on (model fingerprint, documents, generator sha256, block size, steps, strengths), so an
interrupted run resumes and a changed option never reuses a stale result. Trained styles are in
--out/train/. Written at the end: --out/summary.json, and --out/shares.png (generated, oracle and the
baselines) and --out/shares-controls.png (generated, nearest and the controls): the median share against
the median neutral cost, one point per strength.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hnkit  # noqa: E402
from hnkit.errors import HnkitError  # noqa: E402
from hnkit.generator import MIN_EXAMPLE_CHARS, SHIPPED, StyleGenerator, fingerprint  # noqa: E402
from hnkit.plot import line_plot  # noqa: E402
from train_generator import padded, read_all  # noqa: E402  (batched as the generator is trained)
from hnkit.targets import find_target  # noqa: E402
from hnkit.text import context_length, load_causal_lm  # noqa: E402
from hnkit.util import cache_root  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 150)  # a log file gets whole tables
METHODS = ["bare", "prefix", "vector", "union", "nearest", "oracle", "generated", "wrong-style", "wrong-neutral"]
CHOOSABLE = ["prefix", "vector", "union", "nearest", "oracle", "generated", "wrong"]  # --only (bare, oracle: always)
FEATURE_DOCS = 8  # training documents per library style whose features are averaged (nearest)
NEUTRAL_MEAN_DOCS = 64  # neutral preserve documents whose mean K/V input the style vector subtracts
BATCH_TOKENS = 2048  # tokens per scoring forward (the logits of 2048 tokens of SmolLM2: 400 MB)
DEFAULTS = dict(styles=0, examples=3, train_styles=2, strengths="0.25,0.5,0.75,1,1.5,2", oracle_steps=100,
                block_size=256, neutral_tokens=4096, max_neutral_cost=0.03)
TINY = dict(styles=2, examples=2, train_styles=1, strengths="0.5,1,2", oracle_steps=3, block_size=48,
            neutral_tokens=384, max_neutral_cost=0.03)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="transformers folder (default: SmolLM2-135M-Instruct in the cache)")
    p.add_argument("--library", default=None, help="style library (default: ~/.cache/hnkit/styles)")
    p.add_argument("--generator", default=None, help="style generator file (default: the shipped one)")
    p.add_argument("--out", default="runs/bench-generated", help="kept units of work, summary.json, shares.png")
    p.add_argument("--styles", type=int, help="held-out styles measured (0: all; default 0)")
    p.add_argument("--examples", type=int, help="example documents per held-out style (default 3)")
    p.add_argument("--baseline-examples", type=int, default=None,
                   help="prefix, vector and nearest on only the first this many examples of a style (default: "
                        "every example; the generator and its controls always take every example)")
    p.add_argument("--train-styles", type=int, help="training styles also measured (default 2)")
    p.add_argument("--strengths", help="the strength grid (default 0.25,0.5,0.75,1,1.5,2)")
    p.add_argument("--oracle-steps", type=int, help="train-text steps of oracle, union, nearest (default 100)")
    p.add_argument("--block-size", type=int, help="train-text's block size; documents are scored on their "
                                                  "first this many tokens (default 256)")
    p.add_argument("--neutral-tokens", type=int, help="neutral test tokens scored (default 4096)")
    p.add_argument("--max-neutral-cost", type=float, help="neutral perplexity allowed above bare (default 0.03)")
    p.add_argument("--only", nargs="+", choices=CHOOSABLE, help="methods to run (bare and oracle always run)")
    p.add_argument("--tiny", action="store_true", help="a tiny model, library and generator in --out/tiny: "
                                                      "a smoke run in about a minute")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--init-steps", type=int, default=0,
                   help="also train the first held-out style with train-text --init from its generated style, "
                        "and from the identity, this many steps (30 in the issue), checkpoints every 5: the "
                        "steps each takes to reach the oracle's NLL at strength 1 (0: skip)")
    args = p.parse_args(argv)
    for name, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.strengths = [float(s) for s in str(args.strengths).split(",")]
    except ValueError:
        p.error(f"--strengths {args.strengths}: expected numbers separated by commas")
    if min(args.examples, args.block_size, args.oracle_steps, args.neutral_tokens) < 1 or args.styles < 0:
        p.error("--examples, --block-size, --oracle-steps and --neutral-tokens must be at least 1")
    args.only = {"bare", "oracle", *(args.only or CHOOSABLE)}
    if "wrong" in args.only:
        args.only |= {"wrong-style", "wrong-neutral"}
    return args


# -- the library and kept results ------------------------------------------------------------------
class Library:
    """The style library's manifest and documents (scripts/build_style_library.py)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()
        path = self.root / "manifest.json"
        if not path.is_file():
            sys.exit(f"{path}: no style library; run: python scripts/build_style_library.py")
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        styles = self.manifest["styles"]
        self.heldout = sorted(n for n, s in styles.items() if s["split"] == "heldout")
        self.training = sorted(n for n, s in styles.items() if s["split"] == "train")
        self.texts: dict = {}

    def docs(self, style: str, part: str) -> list[str]:
        """The texts of one part ("train", "test", "example", "preserve") of a style or of "neutral"."""
        if (style, part) not in self.texts:
            entry = self.manifest["neutral"] if style == "neutral" else self.manifest["styles"][style]
            self.texts[style, part] = [(self.root / style / name).read_text(encoding="utf-8")
                                       for name in entry["docs"].get(part, [])]
        return self.texts[style, part]


def digest(obj) -> str:
    """A short sha256 of anything JSON can write (texts, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def kept(out: Path, name: str, setting: dict, compute) -> dict:
    """The record in ``out/<name>-<hash of setting>.json``, or ``compute()``'s, written there first."""
    path = out / f"{name}-{digest(setting)}.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("setting") == setting:
            return record["result"]
    result = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"setting": setting, "result": result}, indent=1))
    tmp.replace(path)
    return result


# -- scoring ---------------------------------------------------------------------------------------
def token_rows(tokenizer, texts: list[str], limit: int) -> list[list[int]]:
    """Each text's first ``limit`` token ids (texts of fewer than 2 tokens left out)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:limit] for t in texts]
    return [r for r in rows if len(r) >= 2]


@torch.no_grad()
def mean_nll(model, rows: list[list[int]], pad: int, prefix: list[int] = ()) -> float:
    """NLL per token over documents, each run on its own; with ``prefix`` its tokens come first as
    context and the same tokens are scored as without it (each document's from its second on)."""
    prefix, total, count = list(prefix), 0.0, 0
    rows = sorted(rows, key=len)
    per_batch = max(1, BATCH_TOKENS // (len(prefix) + max(map(len, rows))))
    for i in range(0, len(rows), per_batch):
        ids, mask = padded([prefix + r for r in rows[i:i + per_batch]], pad)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :len(prefix) + 1] = -100
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=-100, reduction="sum")
        total, count = total + loss.item(), count + int((labels[:, 1:] != -100).sum())
    return total / count


def strength_curve(model, hn, rows, pad: int, strengths: list[float]) -> tuple[list[float], float]:
    """NLL at each strength with ``hn`` attached, and the seconds attaching took."""
    started = time.perf_counter()
    with hnkit.attach(model, hn, strength=strengths[0]) as attached:
        seconds = time.perf_counter() - started
        nll = []
        for s in strengths:
            attached.strength = s
            nll.append(mean_nll(model, rows, pad))
    return nll, seconds


# -- the generator's reading, the style vector ---------------------------------------------------------
def vector_style(model, gen, example_ids: torch.Tensor, neutral_mean: torch.Tensor, name: str):
    """The style vector: a per-site "lowrank" network of rank 1 whose residual is the constant
    ``c = mean K/V input over the example - the same over neutral text`` (up.weight zero), for K and V."""
    c = gen.read(model, example_ids)[0] - neutral_mean
    config = hnkit.HypernetworkConfig(form="lowrank", rank=1, per_site=True)
    hn = hnkit.Hypernetwork.for_model(model, config, name=name)
    with torch.no_grad():
        for i, site in enumerate(find_target(model).sites):
            for module in hn.pair_for(site):
                module.up.bias.copy_(c[i])
    return hn.eval()


# -- trained styles ------------------------------------------------------------------------------
def write_docs(folder: Path, texts: list[str]) -> Path:
    """One .txt per document; a file is rewritten only when its text changed (keeps the token cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        path = folder / f"{i:05d}.txt"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    for extra in sorted(folder.glob("*.txt"))[len(texts):]:
        extra.unlink()
    return folder


def train_text(argv: list[str]) -> Path:
    """``hnkit train-text`` in this process (its own model copy), as the command runs it."""
    from hnkit.commands import train_text as command

    parser = argparse.ArgumentParser(prog="hnkit train-text")
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


class Bench:
    """One run: the model, the generator, the library and the kept results in ``out``."""

    def __init__(self, args, model_dir: Path, generator: Path | None, library: Path):
        self.args, self.out, self.model_dir = args, Path(args.out), model_dir
        self.model, self.tokenizer = load_causal_lm(str(model_dir))
        self.model.eval().requires_grad_(False)
        self.gen = StyleGenerator.load(generator)
        self.gen.check_model(self.model)
        self.gen_path = Path(generator) if generator else SHIPPED
        self.lib = Library(library)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        self.fp = fingerprint(self.model)
        self.ctx = context_length(self.model) or 1 << 30
        self.cache: dict = {}

    # what results depend on
    def rows(self, style: str, part: str = "test") -> list[list[int]]:
        """The token rows of a style's (or "neutral"'s) documents: the neutral test documents until
        --neutral-tokens are reached."""
        if (style, part) not in self.cache:
            rows = token_rows(self.tokenizer, self.lib.docs(style, part), self.args.block_size)
            if (style, part) == ("neutral", "test"):
                ends = torch.tensor([len(r) for r in rows]).cumsum(0)
                rows = rows[:int((ends < self.args.neutral_tokens).sum()) + 1]
            self.cache[style, part] = rows
        return self.cache[style, part]

    def eval_setting(self, target: str) -> dict:
        return {"model": self.fp, "block_size": self.args.block_size, "docs": digest(self.rows(target))}

    # bare, prefix, curves
    def bare(self, target: str) -> float:
        rows = self.rows(target)
        return kept(self.out, f"bare-{target}", self.eval_setting(target),
                    lambda: {"nll": mean_nll(self.model, rows, self.pad)})["nll"]

    def prefix(self, target: str, example: str) -> float:
        ids = self.tokenizer(example, add_special_tokens=False)["input_ids"][:self.ctx - self.args.block_size]
        rows = self.rows(target)
        setting = {**self.eval_setting(target), "example": digest(example), "prefix_tokens": len(ids)}
        return kept(self.out, f"prefix-{target}-{digest(example)[:8]}", setting,
                    lambda: {"nll": mean_nll(self.model, rows, self.pad, ids)})["nll"]

    def curve(self, target: str, label: str, identity: dict, make_hn) -> dict:
        """NLL at each strength on ``target``'s documents of the style ``make_hn()`` builds (with the
        seconds building and attaching it took); ``identity`` says what the style depends on."""
        rows = self.rows(target)
        setting = {**self.eval_setting(target), "strengths": self.args.strengths, "style": identity}

        def compute():
            started = time.perf_counter()
            hn = make_hn()
            made = time.perf_counter() - started
            nll, attach_seconds = strength_curve(self.model, hn, rows, self.pad, self.args.strengths)
            return {"nll": nll, "seconds": made + attach_seconds}
        return kept(self.out, f"curve-{target}-{label}", setting, compute)

    # styles
    def generated(self, example: str):
        """(label, identity, make) of the generator's style for ``example``."""
        identity = {"generator": self.gen.sha256, "example": digest(example)}
        return f"generated-{digest(example)[:8]}", identity, \
            lambda: self.gen.make_style(self.model, example, self.tokenizer)

    def vector(self, example: str):
        identity = {"vector": digest(example), "max_tokens": self.gen.config.max_tokens,
                    "neutral": digest(self.rows("neutral", "preserve")[:NEUTRAL_MEAN_DOCS])}

        def make():
            return vector_style(self.model, self.gen, self.gen.token_ids(self.tokenizer, example),
                                self.neutral_mean(), f"vector-{digest(example)[:8]}")
        return f"vector-{digest(example)[:8]}", identity, make

    def neutral_mean(self) -> torch.Tensor:
        if "neutral-mean" not in self.cache:
            rows = [r[:self.gen.config.max_tokens] for r in self.rows("neutral", "preserve")[:NEUTRAL_MEAN_DOCS]]
            means = read_all(self.gen, self.model, rows, self.pad)
            counts = torch.tensor([len(r) for r in rows], dtype=torch.float32)
            self.cache["neutral-mean"] = (means * counts[:, None, None]).sum(0) / counts.sum()
        return self.cache["neutral-mean"]

    def trained(self, label: str, docs: list[str]):
        """(label, identity, make) of a style trained by train-text (trained on first use, kept)."""
        setting = self.train_setting(docs)
        return label, {"trained": digest(setting)}, \
            lambda: hnkit.load(self.out / self.train_record(label, docs)["file"])

    def train_setting(self, docs: list[str]) -> dict:
        return {"model": self.fp, "docs": digest(docs), "preserve": digest(self.lib.docs("neutral", "preserve")),
                "block_size": self.args.block_size, "steps": self.args.oracle_steps, "hnkit": hnkit.__version__}

    def train_record(self, label: str, docs: list[str]) -> dict:
        """The kept train-text run of ``label`` on ``docs`` ({"file", "seconds"}), trained when not kept."""
        setting = self.train_setting(docs)
        record = kept(self.out, f"train-{label}", setting, lambda: self.train(label, docs, setting))
        if not (self.out / record["file"]).exists():  # the kept style was deleted: train it again
            (self.out / f"train-{label}-{digest(setting)}.json").unlink()
            record = kept(self.out, f"train-{label}", setting, lambda: self.train(label, docs, setting))
        return record

    def union_docs(self) -> list[str]:
        return [t for name in self.lib.training for t in self.lib.docs(name, "train")]

    def union(self):
        return self.trained("union", self.union_docs())

    def train(self, label: str, docs: list[str], setting: dict) -> dict:
        data = write_docs(self.out / "data" / label, docs)
        preserve = write_docs(self.out / "data" / "neutral-preserve", self.lib.docs("neutral", "preserve"))
        run = self.out / "train" / f"{label}-{digest(setting)}"
        console.log(f"training {label}: {len(docs)} documents, {self.args.oracle_steps} steps")
        started = time.perf_counter()
        final = train_text(["--model", str(self.model_dir), "--data", str(data), "--preserve-data", str(preserve),
                            "--output", str(run), "--name", label, "--max-steps", str(self.args.oracle_steps),
                            "--block-size", str(self.args.block_size), "--force"])
        seconds = time.perf_counter() - started
        torch.set_num_threads(self.args.threads)  # whatever the run set, this process's count again
        console.log(f"trained {label} in {seconds:.0f} s")
        return {"file": str(Path(final).relative_to(self.out)), "seconds": seconds}


# -- nearest ---------------------------------------------------------------------------------------
def style_features(bench: Bench) -> dict[str, torch.Tensor]:
    """Each training style's mean site means over its first FEATURE_DOCS training documents, kept as
    .safetensors in --out (they depend on the model, the documents and the tokens read)."""
    from safetensors.torch import load_file, save_file

    out = {}
    for name in bench.lib.training:
        rows = token_rows(bench.tokenizer, bench.lib.docs(name, "train")[:FEATURE_DOCS], bench.gen.config.max_tokens)
        path = bench.out / f"features-{name}-{digest([bench.fp, bench.gen.config.max_tokens, rows])}.safetensors"
        if not path.exists():
            means = read_all(bench.gen, bench.model, rows, bench.pad)
            save_file({"mean": means.mean(0).contiguous()}, str(path))
        out[name] = load_file(str(path))["mean"]
    return out


def nearest_style(bench: Bench, example: str, styles: dict[str, torch.Tensor]) -> str:
    """The training style whose generator features (mean - mu) / sigma are nearest (cosine) to the example's."""
    gen = bench.gen
    mine = gen.features(gen.read(bench.model, gen.token_ids(bench.tokenizer, example))[0]).flatten()
    sims = {name: F.cosine_similarity(mine, gen.features(m).flatten(), dim=0).item()
            for name, m in styles.items()}
    return max(sims, key=sims.get)


# -- one style -------------------------------------------------------------------------------------
def best_point(nll: list[float], neutral: list[float], bare: float, bare_neutral: float, args) -> dict:
    """The strength of the lowest NLL whose neutral perplexity is at most --max-neutral-cost above bare
    (its strength, neutral cost and NLL; all None when no strength of the grid is)."""
    costs = [math.exp(n - bare_neutral) - 1 for n in neutral]
    ok = [(v, s, c) for s, v, c in zip(args.strengths, nll, costs) if c <= args.max_neutral_cost]
    v, s, c = min(ok) if ok else (None, None, None)
    return {"strength": s, "neutral_cost": c, "nll": v, "curve": {"nll": nll, "neutral_cost": costs}}


class StyleRun:
    """The points of every method on one style's test documents: method -> one point per example
    (one in all for bare, oracle and union)."""

    def __init__(self, bench: Bench, style: str):
        self.bench, self.style, self.args = bench, style, bench.args
        self.bare, self.bare_neutral = bench.bare(style), bench.bare("neutral")
        self.points: dict[str, list[dict]] = {"bare": [{"strength": 0.0, "neutral_cost": 0.0, "nll": self.bare}]}

    def add(self, method: str, spec, **extra) -> None:
        """The point of the style ``spec`` (label, identity, make) at its best strength; its neutral
        curve is kept by label, so one style measured on several targets is scored on neutral text once."""
        label, identity, make = spec
        mine = self.bench.curve(self.style, label, identity, make)
        neutral = self.bench.curve("neutral", label, identity, make)
        point = best_point(mine["nll"], neutral["nll"], self.bare, self.bare_neutral, self.args)
        self.points.setdefault(method, []).append({**point, "seconds": mine["seconds"], **extra})

    def add_prefix(self, example: str) -> None:
        nll, cost = self.bench.prefix(self.style, example), math.exp(self.bench.prefix("neutral", example)
                                                                     - self.bare_neutral) - 1
        ok = cost <= self.args.max_neutral_cost
        point = {"strength": 1.0, "neutral_cost": cost, "nll": nll} if ok else \
            {"strength": None, "neutral_cost": None, "nll": None}
        self.points.setdefault("prefix", []).append({**point, "prefix_cost": cost, "prefix_nll": nll})

    def shares(self) -> None:
        """Each point's share of the oracle's gain (None where the oracle gains nothing within the cost;
        0 where the method has no strength within it), and its share at each strength of the grid."""
        oracle = self.points["oracle"][0]["nll"]
        gain = None if oracle is None or oracle >= self.bare else self.bare - oracle
        self.oracle_gain = gain
        for points in self.points.values():
            for p in points:
                p["share"] = None if gain is None else 0.0 if p["nll"] is None else (self.bare - p["nll"]) / gain
                if gain is not None and "curve" in p:
                    p["curve"]["share"] = [(self.bare - v) / gain for v in p["curve"]["nll"]]
                elif gain is not None and "prefix_nll" in p:
                    p["curve"] = {"share": [(self.bare - p["prefix_nll"]) / gain], "neutral_cost": [p["prefix_cost"]]}

    def result(self) -> dict:
        self.shares()
        return {"bare_nll": self.bare, "bare_neutral_nll": self.bare_neutral, "oracle_gain": self.oracle_gain,
                "methods": self.points}


def usable(texts: list[str]) -> list[str]:
    """Documents long enough to be an example."""
    return [t for t in texts if len(t.strip()) >= MIN_EXAMPLE_CHARS]


def measure_heldout(bench: Bench, style: str, features, neutral_examples: list[str]) -> dict:
    """Every method on a held-out style, with its "example" documents as the examples."""
    lib, only = bench.lib, bench.args.only
    run = StyleRun(bench, style)
    run.add("oracle", bench.trained(f"oracle-{style}", lib.docs(style, "train")))
    if "union" in only:
        run.add("union", bench.union())
    others = [s for s in lib.heldout if s != style]
    other = others[lib.heldout.index(style) % len(others)] if others else None  # the next held-out style
    wrong = usable(lib.docs(other, "example")) if other else []
    examples = usable(lib.docs(style, "example"))[:bench.args.examples]
    if len(examples) < bench.args.examples:
        console.log(f"{style}: {len(examples)} example documents of at least {MIN_EXAMPLE_CHARS} characters")
    baseline = bench.args.baseline_examples
    for j, example in enumerate(examples):
        console.log(f"{style}: example {j + 1} of {len(examples)}")
        baselines_too = baseline is None or j < baseline
        if "prefix" in only and baselines_too:
            run.add_prefix(example)
        if "vector" in only and baselines_too:
            run.add("vector", bench.vector(example), example=j)
        if "generated" in only:
            run.add("generated", bench.generated(example), example=j)
        if "nearest" in only and baselines_too:
            name = nearest_style(bench, example, features)
            run.add("nearest", bench.trained(f"style-{name}", lib.docs(name, "train")), example=j, style=name)
        if "wrong-style" in only and wrong:
            run.add("wrong-style", bench.generated(wrong[j % len(wrong)]), example=j, style=other)
        if "wrong-neutral" in only and neutral_examples:
            run.add("wrong-neutral", bench.generated(neutral_examples[j % len(neutral_examples)]), example=j)
    return run.result()


def measure_training(bench: Bench, style: str) -> dict:
    """The generator and the oracle on a training style's held-out documents; examples from its training ones."""
    run = StyleRun(bench, style)
    run.add("oracle", bench.trained(f"style-{style}", bench.lib.docs(style, "train")))
    for j, example in enumerate(usable(bench.lib.docs(style, "train"))[:bench.args.examples]):
        run.add("generated", bench.generated(example), example=j)
    return run.result()


def spaced(names: list[str], k: int) -> list[str]:
    """``k`` names spread evenly over the sorted list."""
    return [names[i * len(names) // k] for i in range(k)] if 0 < k <= len(names) else names[:max(k, 0)]


# -- report ----------------------------------------------------------------------------------------
def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values: list[float]) -> dict | None:
    """min, quartiles, median and max (None without values)."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
    return {"min": v[0], "q1": q1, "median": statistics.median(v), "q3": q3, "max": v[-1], "n": len(v)}


def shown(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def show_style(style: str, r: dict, args) -> None:
    gain = r["oracle_gain"]
    title = (f"{style}: bare NLL {r['bare_nll']:.3f}, oracle gain {gain:.3f}" if gain is not None else
             f"{style}: bare NLL {r['bare_nll']:.3f}; the oracle gains nothing within the neutral cost: no shares")
    t = Table("method", "best strength", "neutral cost", "NLL", "share", title=title + " (medians over examples)")
    for m in (m for m in METHODS if m in r["methods"]):
        pts = r["methods"][m]
        strengths = ", ".join("none" if p["strength"] is None else f"{p['strength']:g}" for p in pts)
        if m == "prefix":
            strengths = ", ".join("-" if p["strength"] is not None else f"none ({p['prefix_cost']:+.1%})" for p in pts)
        t.add_row(m + (f" ({', '.join(sorted({p['style'] for p in pts}))})" if "style" in pts[0] else ""), strengths,
                  shown(median(p["neutral_cost"] for p in pts), "+.1%"), shown(median(p["nll"] for p in pts), ".3f"),
                  shown(median(p["share"] for p in pts), ".0%"))
    console.print(t)


def summarize(results: dict) -> dict:
    """Per method: the median over styles of each style's median share over examples, the spread over
    styles and over examples, and how many points had no strength within the neutral cost."""
    out = {}
    for m in METHODS:
        per_style, per_example, none, n = [], [], 0, 0
        for r in results.values():
            pts = r["methods"].get(m, [])
            shares = [p["share"] for p in pts if p["share"] is not None]
            none, n = none + sum(p["strength"] is None for p in pts), n + len(pts)
            if shares:
                per_style.append(statistics.median(shares))
                per_example += shares
        if n:
            out[m] = {"median_share": median(per_style), "over_styles": spread(per_style),
                      "over_examples": spread(per_example), "no_strength_within_cost": none, "points": n}
    return out


def show_summary(summary: dict, title: str) -> None:
    t = Table("method", "median share", "styles: min / q1 / q3 / max", "examples: min / median / max",
              "no strength within cost", title=title)
    for m, s in summary.items():
        st, ex = s["over_styles"], s["over_examples"]
        t.add_row(m, shown(s["median_share"], ".0%"),
                  " / ".join(format(st[k], ".0%") for k in ("min", "q1", "q3", "max")) if st else "-",
                  " / ".join(format(ex[k], ".0%") for k in ("min", "median", "max")) if ex else "-",
                  f"{s['no_strength_within_cost']} of {s['points']}")
    console.print(t)


PLOTS = {"shares.png": ["generated", "oracle", "prefix", "vector", "union"],
         "shares-controls.png": ["generated", "nearest", "wrong-style", "wrong-neutral"]}


def front_series(results: dict) -> dict:
    """method -> (median neutral cost %, median share %) at each strength of the grid, over all points."""
    series = {}
    for m in METHODS:
        points = [p for r in results.values() for p in r["methods"].get(m, [])]
        curves = [p["curve"] for p in points if "share" in p.get("curve", {})]
        if curves:
            found = [(100 * median(c["neutral_cost"][k] for c in curves),
                      100 * median(c["share"][k] for c in curves)) for k in range(len(curves[0]["share"]))]
            found = [(x, y) for x, y in found if x <= PLOT_MAX_COST and y >= PLOT_MIN_SHARE]
            if found:
                series[m] = found
    return series


# The plots show the region that matters; a strength that wrecks the model (a style vector at
# strength 1 can cost +80,000 % neutral perplexity) would squash every other point into a corner.
PLOT_MAX_COST, PLOT_MIN_SHARE = 30.0, -100.0


def targets(summary: dict, train: dict, timing: dict, gen: dict) -> list[str]:
    """The issue's targets, each with its figure (printed; nothing is asserted)."""
    def share(m, s=summary):
        return (s.get(m) or {}).get("median_share")

    g, union = share("generated"), share("union")
    base = max((v for v in map(share, ("prefix", "vector", "union", "nearest")) if v is not None), default=None)
    need = None if base is None else max(0.5, base + 0.10, union + 0.15 if union is not None and union >= 0.4 else 0)
    seconds = timing["make_style_median_s"]
    lines = [(f"generated median share >= {shown(need, '.0%')} (50 %, best baseline {shown(base, '.0%')} + 10, "
              "or union + 15 where union >= 40 %)", shown(g, ".0%"), need is not None and g is not None and g >= need),
             ("example to attached style, median < 1.0 s", shown(seconds, ".3f"), seconds is not None and seconds < 1),
             ("generator <= 10 M parameters", f"{gen['parameters']:,}", gen["parameters"] <= 10_000_000),
             ("training styles' held-out documents: share >= 85 %", shown(share("generated", train), ".0%"),
              (share("generated", train) or 0) >= 0.85)]
    lines += [(f"{m} control <= 20 %", shown(share(m), ".0%"), share(m) is not None and share(m) <= 0.2)
              for m in ("wrong-style", "wrong-neutral") if m in summary]
    return [f"{'met' if ok else 'NOT met'}: {text}: {value}" for text, value, ok in lines]


# -- the tiny smoke run ----------------------------------------------------------------------------
TINY_WORDS = {  # a few synthetic styles with distinct vocabularies; the last three are held out
    "sea": "tide wave salt ship harbour anchor gull storm sail deck",
    "forest": "oak moss fern root branch owl leaf bark trail deer",
    "machine": "gear bolt piston valve engine lever steam wire motor spark",
    "kitchen": "bread butter oven spoon onion pepper soup knife flour honey",
    "desert": "sand dune cactus heat camel mirage dust sun canyon thirst",
    "music": "chord melody drum violin rhythm tempo choir note piano song",
    "garden": "rose tulip hoe seed soil bloom weed hedge bee petal",
}
TINY_HELDOUT = ("desert", "music", "garden")


def tiny_doc(rng: random.Random, words: list[str]) -> str:
    sentences = []
    while sum(map(len, sentences)) < 240:
        sentences.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 9))).capitalize() + ".")
    return " ".join(sentences)


def write_tiny_library(root: Path) -> None:
    """A style library in the layout of scripts/build_style_library.py, of synthetic styles, with
    neutral documents cut from Python's reference manual."""
    from pydoc_data.topics import topics

    styles = {}
    for name, words in TINY_WORDS.items():
        rng, held = random.Random(name), name in TINY_HELDOUT
        texts = [tiny_doc(rng, words.split()) for _ in range(19 if held else 13)]
        files = write_docs(root / name, texts)
        names = sorted(p.name for p in files.glob("*.txt"))
        docs = {"example": names[:3], "test": names[3:11], "train": names[11:]} if held else \
            {"train": names[:10], "test": names[10:]}
        styles[name] = {"split": "heldout" if held else "train", "source": "synthetic", "licence": "-", "docs": docs}
    texts = [topics[k][:400] for k in sorted(topics) if len(topics[k]) >= 400][:14]
    names = sorted(p.name for p in write_docs(root / "neutral", texts).glob("*.txt"))
    neutral = {"source": "pydoc_data", "licence": "PSF", "docs": {"preserve": names[:8], "test": names[8:]}}
    (root / "manifest.json").write_text(json.dumps({"version": 1, "styles": styles, "neutral": neutral}, indent=1))


def tiny_setup(out: Path) -> tuple[Path, Path, Path]:
    """A tiny GPT-2, a random generator for it and a synthetic library in ``out/tiny`` (made once)."""
    from hnkit.testing import build_tiny_generator, build_tiny_lm

    root = out / "tiny"
    if not (root / "model" / "config.json").exists():
        build_tiny_lm(root)
    generator = root / "generator.safetensors"
    if not generator.exists():
        build_tiny_generator(root / "model", generator)
        gen = StyleGenerator.load(generator)
        gen.config.max_tokens = 64  # the tiny GPT-2 has 128 positions
        gen.save(generator, dtype=torch.float32)
    if not (root / "library" / "manifest.json").exists():
        write_tiny_library(root / "library")
    return root / "model", generator, root / "library"


# -- main ------------------------------------------------------------------------------------------
def run(bench: Bench) -> dict:
    args, lib = bench.args, bench.lib
    held = lib.heldout[:args.styles or None]
    if not held:
        sys.exit(f"{lib.root}: the library has no held-out style")
    features = style_features(bench) if "nearest" in args.only else None
    neutral_examples = usable(lib.docs("neutral", "test"))[:args.examples]
    results = {}
    for style in held:
        results[style] = measure_heldout(bench, style, features, neutral_examples)
        show_style(style, results[style], args)
    train = {}
    for style in spaced(lib.training, args.train_styles):
        train[style] = measure_training(bench, style)
        show_style(f"training style {style} (its held-out documents)", train[style], args)
    init = measure_init(bench, held[0]) if args.init_steps else None
    return {"heldout": results, "training": train, "init": init}


INIT_EVERY = 5  # checkpoints of the --init runs measured


def measure_init(bench: Bench, style: str) -> dict:
    """``train-text --init`` from the generated style of the style's first example, and a run from
    the identity, both ``--init-steps`` steps on the oracle's data: the NLL on the style's test
    documents at strength 1 every INIT_EVERY steps, and the first step at or below the oracle's."""
    from hnkit.commands.options import checkpoint_file

    args, lib = bench.args, bench.lib
    example = usable(lib.docs(style, "example"))[0]
    oracle_label, oracle_id, oracle_make = bench.trained(f"oracle-{style}", lib.docs(style, "train"))
    oracle_nll = bench.curve(style, oracle_label, oracle_id, oracle_make)["nll"][args.strengths.index(1.0)]
    label, _, make = bench.generated(example)
    start = bench.out / "init" / f"{label}.safetensors"
    start.parent.mkdir(parents=True, exist_ok=True)
    hnkit.save(make(), start)
    data = write_docs(bench.out / "data" / f"oracle-{style}", lib.docs(style, "train"))
    preserve = write_docs(bench.out / "data" / "neutral-preserve", lib.docs("neutral", "preserve"))
    found = {"oracle_nll": oracle_nll, "steps": args.init_steps}
    for name, extra in (("init", ["--init", str(start)]), ("identity", [])):
        run = bench.out / "init" / f"{style}-{name}-{args.init_steps}"
        setting = {**bench.train_setting(lib.docs(style, "train")), "steps": args.init_steps,
                   "init": bench.gen.sha256 if extra else None}

        def compute():
            train_text(["--model", str(bench.model_dir), "--data", str(data), "--preserve-data", str(preserve),
                        "--output", str(run), "--name", name, "--max-steps", str(args.init_steps),
                        "--block-size", str(args.block_size), "--save-every", str(INIT_EVERY),
                        "--keep-last", str(args.init_steps // INIT_EVERY + 1), "--force", *extra])
            torch.set_num_threads(args.threads)
            rows, curve = bench.rows(style), []
            for step in range(INIT_EVERY, args.init_steps + 1, INIT_EVERY):
                hn = hnkit.load(checkpoint_file(run / "checkpoints" / f"step-{step:07d}"))
                curve.append((step, strength_curve(bench.model, hn, rows, bench.pad, [1.0])[0][0]))
            return {"curve": curve}
        curve = kept(bench.out, f"init-{style}-{name}", setting, compute)["curve"]
        reached = [step for step, nll in curve if nll <= oracle_nll]
        found[name] = {"curve": curve, "steps_to_oracle": reached[0] if reached else None}
        console.log(f"{style}: from the {'generated style' if extra else 'identity'}: NLL "
                    + ", ".join(f"{nll:.3f}@{step}" for step, nll in curve)
                    + f" (oracle {oracle_nll:.3f} at strength 1 after {args.oracle_steps} steps)")
    return found


def timings(bench: Bench, found: dict) -> dict:
    made = [p["seconds"] for group in (found["heldout"], found["training"]) for r in group.values()
            for p in r["methods"].get("generated", [])]
    oracle = [bench.train_record(f"oracle-{s}", bench.lib.docs(s, "train"))["seconds"] for s in found["heldout"]]
    union = bench.train_record("union", bench.union_docs())["seconds"] if "union" in bench.args.only else None
    return {"make_style_median_s": median(made), "make_style_n": len(made), "oracle_train_median_s": median(oracle),
            "union_train_s": union, "threads": bench.args.threads}


def report(bench: Bench, found: dict) -> dict:
    args, gen = bench.args, bench.gen
    summary, train = summarize(found["heldout"]), summarize(found["training"])
    show_summary(summary, f"held-out styles ({len(found['heldout'])}): share of the oracle's gain, neutral cost "
                          f"<= {args.max_neutral_cost:.0%}")
    if train:
        show_summary(train, f"training styles ({len(found['training'])}), on their held-out documents")
    for group, results in ((g, found[g]) for g in ("heldout", "training")):
        dropped = [s for s, r in results.items() if r["oracle_gain"] is None]
        if dropped:
            print(f"{group} styles where the oracle gains nothing within the neutral cost (no shares, left out): "
                  + ", ".join(dropped))
    timing = timings(bench, found)
    info = {"file": str(bench.gen_path), "sha256": gen.sha256, "parameters": sum(p.numel() for p in gen.parameters()),
            "file_bytes": bench.gen_path.stat().st_size, "info": gen.info}
    print(f"example to attached style (make_style + attach): median {shown(timing['make_style_median_s'], '.3f')} s "
          f"over {timing['make_style_n']} examples; oracle training ({args.oracle_steps} steps): median "
          f"{shown(timing['oracle_train_median_s'], '.0f')} s; union {shown(timing['union_train_s'], '.0f')} s; "
          f"{args.threads} threads")
    print(f"generator {bench.gen_path.name}: {info['parameters']:,} parameters, {info['file_bytes'] / 1e6:.2f} MB")
    lines = targets(summary, train, timing, info)
    print("\n".join(lines))
    series, pngs = front_series(found["heldout"]), []
    for name, methods in PLOTS.items():  # line_plot has five colours: the generator and four others a plot
        pngs.append(line_plot({m: series[m] for m in methods if m in series}, bench.out / name,
                              title="median share of the oracle's gain % (up) against neutral cost % (right), "
                                    f"one point per strength (costs above +{PLOT_MAX_COST:.0f} % left out)"))
    setting = {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}
    result = {"setting": {**setting, "model": str(bench.model_dir), "model_fingerprint": bench.fp},
              "methods": summary, "training_styles": train, "timings": timing, "generator": info, "targets": lines,
              "init": found.get("init"), "styles": {k: found[k] for k in ("heldout", "training")}}
    (bench.out / "summary.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {bench.out / 'summary.json'}, {', '.join(map(str, pngs))}")
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model_dir, generator, library = tiny_setup(out)
    else:
        model_dir = Path(args.model or cache_root() / "SmolLM2-135M-Instruct").expanduser()
        generator, library = args.generator, Path(args.library or cache_root() / "styles")
    if not model_dir.exists():
        sys.exit(f"{model_dir}: no such model; run: python scripts/prepare_smollm2.py")
    transformers.utils.logging.disable_progress_bar()
    try:
        bench = Bench(args, model_dir, generator, library)
        report(bench, run(bench))
    except HnkitError as exc:
        sys.exit(f"bench_generated: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"bench_generated: interrupted; run the same command again to resume from {out}")


if __name__ == "__main__":
    main()
