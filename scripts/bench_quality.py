"""Quality benchmark: how much of a style a hypernetwork gives a language model, and what it costs
the model's ordinary language, against a PEFT LoRA of the same trainable size trained by the same
loop on the same batches for the same steps. Nothing here asserts a figure; it prints them.

    python scripts/bench_quality.py                    # SmolLM2-135M, 100 steps, batch 4 x 128, CPU
    python scripts/bench_quality.py --tiny             # a small random Llama: a smoke run in a minute
    python scripts/bench_quality.py --only lora        # some tools (results are kept per run)
    python scripts/bench_quality.py --only hnkit+preserve --lrs 1e-3 --hnkit-module activation=gelu  # a study
    python scripts/bench_quality.py --only hnkit hnkit+preserve hnkit+self --lrs 1e-3  # train-text's default

Needs PEFT: pip install -e ".[bench]". SmolLM2 comes from scripts/prepare_smollm2.py.

Corpora (offline, public domain or permissive, whole documents held out; nothing is copied into the
repository, they are written under ~/.cache/hnkit/corpora):
- style: Ambrose Bierce's *The Devil's Dictionary* (1911, public domain) from Debian's ``dict-devil``
  package, one document per entry; every entry whose headword hashes to 0 mod 8 is held out.
- neutral: the Python reference manual's topics (``pydoc_data.topics``, PSF license), one document per
  topic; the topics hashing to 0 mod 2 are held out for measuring, the others feed prior preservation.
- self (tool ``hnkit+self``, what ``train-text`` preserves without ``--preserve-data``): blocks the bare
  model writes itself, made by the function train-text uses (``hnkit.self_text``), as many as it makes;
  the time to write them and to compute the teacher on them is printed and kept with the run.

Each variant trains from the same seed (--seed: initial weights and data order), then sweeps the
strength; a point is (style gain = 1 - style ppl / bare style ppl, neutral cost = neutral ppl / bare
neutral ppl - 1). Printed: every run's
sweep, each tool's front over its lr grid (a tool is judged at its best lr), the recommended strength
(largest gain at a neutral cost of at most --max-neutral-cost), and whether hnkit's front dominates
LoRA's (for every LoRA point an hnkit point with at least its gain at no more cost). The fronts are
drawn as a PNG; every run is kept as JSON under --out, so an interrupted bench resumes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hnkit  # noqa: E402
from bench_serve import model_folder  # noqa: E402
from bench_text import lora_rank_for  # noqa: E402
from hnkit.commands.train_text import OPTIONS as TRAIN_TEXT  # noqa: E402
from hnkit.front import pareto_front, points, recommend  # noqa: E402
from hnkit.plot import line_plot  # noqa: E402
from hnkit.preserve import WEIGHT as PRESERVE_WEIGHT, Teacher  # noqa: E402
from hnkit.text import NEUTRAL_SHARE, TextTask, perplexity, tokenized_blocks  # noqa: E402
from hnkit.train_config import make_optimizer  # noqa: E402
from hnkit.trainer import epoch_order  # noqa: E402
from hnkit.util import cache_root  # noqa: E402

console = Console()

# -- corpora ------------------------------------------------------------------------------------
DICT_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # dictd's offsets


def _dict_number(text: str) -> int:
    n = 0
    for ch in text:
        n = n * 64 + DICT_B64.index(ch)
    return n


def devil_files() -> tuple[Path, Path]:
    """The installed dict-devil data, or the package fetched with apt-get and unpacked in the cache."""
    installed = Path("/usr/share/dictd")
    if (installed / "devil.index").exists():
        return installed / "devil.index", installed / "devil.dict.dz"
    unpacked = cache_root() / "debs" / "dict-devil"
    found = unpacked / "usr/share/dictd"
    if not (found / "devil.index").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "dict-devil"], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("dict-devil_*.deb"))
            unpacked.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    return found / "devil.index", found / "devil.dict.dz"


def devil_entries() -> dict[str, str]:
    """headword -> entry text (the dictionary's own metadata entries left out)."""
    index, data = devil_files()
    text = gzip.decompress(data.read_bytes())  # dictzip is gzip with an index in its header
    entries = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00database"):
            start = _dict_number(offset)
            entries[word] = text[start:start + _dict_number(length)].decode("utf-8").strip()
    return entries


def _held_out(name: str, modulus: int) -> bool:
    return zlib.crc32(name.encode()) % modulus == 0


def write_corpus(folder: Path, docs: dict[str, str]) -> Path:
    """One .txt file per document; rewritten only when its text changed (keeps the token cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(sorted(docs)):
        path = folder / f"{i:04d}.txt"
        if not path.exists() or path.read_text(encoding="utf-8") != docs[name]:
            path.write_text(docs[name], encoding="utf-8")
    return folder


def prepare_corpora() -> dict[str, Path]:
    from pydoc_data.topics import topics

    root, devil = cache_root() / "corpora", devil_entries()
    return {
        "style-train": write_corpus(root / "devil-train", {k: v for k, v in devil.items() if not _held_out(k, 8)}),
        "style-test": write_corpus(root / "devil-test", {k: v for k, v in devil.items() if _held_out(k, 8)}),
        "neutral-train": write_corpus(root / "pydoc-preserve", {k: v for k, v in topics.items() if not _held_out(k, 2)}),
        "neutral-test": write_corpus(root / "pydoc-test", {k: v for k, v in topics.items() if _held_out(k, 2)}),
    }


# -- models and adapters ------------------------------------------------------------------------
def load_model(args):
    """The model, fresh from its folder (every run starts from the same weights), and its tokenizer.
    ``--tiny``: a 2-layer Llama with SmolLM2's tokenizer, built from a config and saved once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(args, Path(args.out))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


def hnkit_default_config(changes: dict | None = None):
    """The module ``hnkit train-text`` builds when given no module option, with ``changes`` (module
    options, as ``--hnkit-module`` gives them) applied."""
    from hnkit.commands.options import module_config

    changes = {k: v for k, v in (changes or {}).items() if k in hnkit.commands.options.MODULE}
    return module_config({name: TRAIN_TEXT[name][1] for name in hnkit.commands.options.MODULE} | changes)


STUDY_KNOBS = ("tie_kv", "out_lr_ratio")  # --hnkit-module names that are not module options


def module_changes(texts: list[str]) -> dict:
    """``["weight_init=KaimingUniform", "layer_structure=[1, 0.25, 1]"]`` -> a dict of module options."""
    import yaml

    out = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or name not in [*hnkit.commands.options.MODULE, *STUDY_KNOBS]:
            sys.exit(f"--hnkit-module {text}: expected NAME=VALUE with NAME one of "
                     f"{', '.join([*hnkit.commands.options.MODULE, *STUDY_KNOBS])}")
        out[name] = yaml.safe_load(value)
    return out


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class HnkitAdapter:
    def __init__(self, model, config, seed: int, tie_kv: bool = False):
        torch.manual_seed(seed)
        self.model, self.hn = model, hnkit.Hypernetwork.for_model(model, config, name="bench")
        if tie_kv:  # study: one module per site feeds both K and V
            for name, pair in self.hn.pairs.items():
                self.hn.pairs[name] = torch.nn.ModuleList([pair[0], pair[0]])
        self.handle = hnkit.attach(model, self.hn, strength=1.0)

    def params(self):
        return list(self.hn.parameters())

    def groups(self, lr: float, out_lr_ratio: float) -> list[dict]:
        """study: the output layers' lr ``out_lr_ratio`` times the others' (as LoRA+ does for B)."""
        last = {id(p) for m in self.hn.modules() if isinstance(m, hnkit.module.HypernetworkModule)
                for p in [x for x in m.linear if isinstance(x, torch.nn.Linear)][-1].parameters()}
        return [{"params": [p for p in self.params() if id(p) not in last], "lr": lr},
                {"params": [p for p in self.params() if id(p) in last], "lr": lr * out_lr_ratio}]

    def set_strength(self, s: float) -> None:
        self.handle.strength = s

    def train(self, mode: bool) -> None:
        self.hn.train(mode)


class LoraAdapter:
    def __init__(self, model, rank: int, seed: int):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["k_proj", "v_proj"])
        self.model = get_peft_model(model, config)
        self.layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def set_strength(self, s: float) -> None:
        for layer in self.layers:
            layer.set_scale("default", s)  # scaling = s * alpha / r

    def train(self, mode: bool) -> None:
        pass  # no dropout; the base stays in eval mode


def lora_rank(hn_params: int, model) -> int:
    """The LoRA rank on k_proj and v_proj of every layer with about ``hn_params`` parameters."""
    cfg = model.config
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return lora_rank_for(hn_params, cfg.hidden_size, kv, kv, cfg.num_hidden_layers)


# -- one run ------------------------------------------------------------------------------------
def train_and_sweep(args, variant: dict, data: dict) -> dict:
    model, tokenizer = load_model(args)
    if variant["tool"] == "hnkit":
        adapter = HnkitAdapter(model, hnkit_default_config(variant["module"]), args.seed,
                               variant["module"].get("tie_kv", False))
    else:
        adapter = LoraAdapter(model, variant["rank"], args.seed)
    params = adapter.params()
    task = TextTask(model, tokenizer, None, data["style-train"])
    if variant["preserve"]:
        task.use_preservation(data["self-teacher" if variant["preserve"] == "self" else "teacher"],
                              args.preserve_weight)
    ratio = variant["module"].get("out_lr_ratio")
    optimizer = make_optimizer(adapter.groups(variant["lr"], ratio) if ratio else params, lr=variant["lr"])
    adapter.train(True)
    started, step, epoch, offset = time.perf_counter(), 0, 0, 0
    n = len(task.train_dataset)
    order = epoch_order(n, args.seed, epoch)
    while step < args.steps:  # the trainer's loop: same data order, AdamW, clipping at 1.0
        if offset + args.batch_size > n:
            epoch, offset = epoch + 1, 0
            order = epoch_order(n, args.seed, epoch)
        batch = task.collate([task.train_dataset[i] for i in order[offset:offset + args.batch_size]])
        offset += args.batch_size
        loss = task.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    seconds = (time.perf_counter() - started) / args.steps
    adapter.train(False)
    style, neutral = [], []
    for s in args.strengths:
        adapter.set_strength(s)
        style.append(perplexity(model, data["style-test"], args.eval_batch))
        neutral.append(perplexity(model, data["neutral-test"], args.eval_batch))
    times = data.get("self-seconds", {}) if variant["preserve"] == "self" else data.get("teacher-seconds", {})
    return {**variant, "params": sum(p.numel() for p in params), "step_seconds": seconds, **times,
            "final_loss": loss.item(), "strengths": args.strengths, "style": style, "neutral": neutral}


# -- report -------------------------------------------------------------------------------------
def dominates(ours, theirs) -> tuple[bool, list]:
    """Whether for every point of ``theirs`` some point of ``ours`` has at least its gain at no more
    cost; returns the points of ``theirs`` left undominated too."""
    missed = [p for p in theirs if not any(q[1] >= p[1] and q[2] <= p[2] for q in ours)]
    return not missed, missed


def report(args, runs: list[dict], bare: dict) -> dict:
    out = {"bare": bare, "runs": runs, "tools": {}}
    table = Table("run", "params", "step s", *[f"s={s:g}" for s in args.strengths],
                  title="held-out perplexity after training: style / neutral")
    table.add_row("bare model", "-", "-", *[f"{bare['style']:.2f} / {bare['neutral']:.2f}"] * len(args.strengths))
    for r in runs:
        table.add_row(r["name"], f"{r['params'] / 1e6:.2f} M", f"{r['step_seconds']:.2f}",
                      *[f"{a:.2f} / {b:.2f}" for a, b in zip(r["style"], r["neutral"])])
    console.print(table)
    fronts, curves = {}, {}
    for tool in sorted({r["tool_name"] for r in runs}):
        pts = [(0.0, 0.0, 0.0, 0.0)]  # strength 0: the bare model, which every tool has
        for r in (r for r in runs if r["tool_name"] == tool):
            pts += [(s, g, c, r["lr"]) for s, g, c in
                    points(r["strengths"], r["style"], r["neutral"], bare["style"], bare["neutral"])]
        front = pareto_front(pts)
        best = recommend(pts, args.max_neutral_cost)
        fronts[tool] = pts
        curves[tool] = [(100 * c, 100 * g) for _, g, c, *_ in front]
        t = Table("lr", "strength", "style gain", "neutral cost", title=f"{tool}: Pareto front over its lr grid")
        for s, g, c, lr in front:
            t.add_row(f"{lr:g}", f"{s:g}", f"{g:+.1%}", f"{c:+.1%}")
        console.print(t)
        rec = {"strength": best[0], "style_gain": best[1], "neutral_cost": best[2],
               "lr": best[3] if len(best) > 3 else None}
        print(f"{tool}: recommended (neutral cost <= {args.max_neutral_cost:.0%}): lr {rec['lr']}, strength "
              f"{rec['strength']:g}: style perplexity {-rec['style_gain']:+.1%}, neutral {rec['neutral_cost']:+.1%}")
        out["tools"][tool] = {"front": [dict(zip(("strength", "style_gain", "neutral_cost", "lr"), p)) for p in front],
                              "recommended": rec}
    comparisons = [("hnkit+preserve", "lora"), ("hnkit+preserve", "lora+preserve"), ("hnkit", "lora")]
    out["dominance"] = {}
    for ours, theirs in comparisons:
        if ours in fronts and theirs in fronts:
            ok, missed = dominates(fronts[ours], fronts[theirs])
            useful = [p for p in fronts[theirs] if p[2] <= args.max_neutral_cost]
            ok_useful, _ = dominates(fronts[ours], useful)
            out["dominance"][f"{ours} vs {theirs}"] = {"all_points": ok, "points_within_max_neutral_cost": ok_useful}
            print(f"{ours} dominates {theirs}: {'yes' if ok else 'no'} over all its points; "
                  f"{'yes' if ok_useful else 'no'} over its points with neutral cost <= {args.max_neutral_cost:.0%}"
                  + ("" if ok else "; not beaten: " + ", ".join(
                      f"lr {p[3]:g} s={p[0]:g} (gain {p[1]:+.1%}, cost {p[2]:+.1%})" for p in missed[:4])))
    # hnkit at one lr (a default is one lr) against each LoRA's front over its whole lr grid
    for r in (r for r in runs if r["tool_name"] == "hnkit+preserve"):
        ours = [(0.0, 0.0, 0.0, 0.0)] + [(st, g, c, r["lr"]) for st, g, c in
                                          points(r["strengths"], r["style"], r["neutral"], bare["style"], bare["neutral"])]
        for theirs in ("lora", "lora+preserve"):
            if theirs in fronts:
                ok, missed = dominates(ours, fronts[theirs])
                ok_useful, _ = dominates(ours, [p for p in fronts[theirs] if p[2] <= args.max_neutral_cost])
                out["dominance"][f"hnkit+preserve lr {r['lr']:g} vs {theirs}"] = {
                    "all_points": ok, "points_within_max_neutral_cost": ok_useful}
                print(f"hnkit+preserve at lr {r['lr']:g} alone dominates {theirs} (all lrs): all points "
                      f"{'yes' if ok else 'no'} ({len(missed)} not beaten), within the cost limit "
                      f"{'yes' if ok_useful else 'no'}")
    # Step times: one 100-step run each, on a shared machine (bench_text.py times steps properly).
    steps = {}
    for r in runs:
        steps.setdefault((r["tool"], r["preserve"]), []).append(r["step_seconds"])
    med = {k: sorted(v)[len(v) // 2] for k, v in steps.items()}
    for preserve in (False, True):
        if ("hnkit", preserve) in med and ("lora", preserve) in med:
            ratio = out[f"step_ratio_vs_lora{'_preserve' if preserve else ''}"] = \
                med[("hnkit", preserve)] / med[("lora", preserve)]
            print(f"step time, hnkit / same-size LoRA{' (both with preservation)' if preserve else ''}: "
                  f"{ratio:.3f} (median of the lr runs)")
    startup_times(runs, med, out)
    for tool in ("hnkit", "lora"):
        if (tool, True) in med and (tool, False) in med:
            ratio = out[f"preserve_step_ratio_{tool}"] = med[(tool, True)] / med[(tool, False)]
            print(f"step time with preservation / without ({tool}): {ratio:.3f}")
    path = line_plot(curves, Path(args.out) / "quality-front.png",
                     title="Pareto fronts: style gain % (up) against neutral cost % (right), best of each lr grid")
    print(f"wrote {path} and {Path(args.out) / 'quality.json'}")
    return out


def startup_times(runs: list[dict], med: dict, out: dict) -> None:
    """Print what preservation costs before training (writing neutral text, the teacher) and per step."""
    if ("hnkit", "self") in med and ("hnkit", False) in med:
        ratio = out["self_step_ratio_hnkit"] = med[("hnkit", "self")] / med[("hnkit", False)]
        print(f"step time with preservation on self-written text / without (hnkit): {ratio:.3f}")
    for r in runs:
        if "generate_seconds" in r or "teacher_seconds" in r:
            print(f"{r['name']}: start-up {r.get('generate_seconds', 0):.0f} s writing neutral text "
                  f"({r.get('neutral_blocks')} blocks), {r.get('teacher_seconds', 0):.0f} s computing the teacher")


def timed_teacher(model, blocks) -> tuple[Teacher, dict]:
    started = time.perf_counter()
    teacher = Teacher(model, blocks)
    return teacher, {"teacher_seconds": time.perf_counter() - started, "neutral_blocks": len(blocks)}


def self_teacher(model, tokenizer, n_train: int, block_size: int) -> tuple[Teacher, dict]:
    """The teacher on neutral text the model writes itself, as train-text makes it without
    --preserve-data (the same function and count), and the seconds the writing and the teacher took."""
    from hnkit.self_text import count, self_blocks

    started = time.perf_counter()
    blocks, _ = self_blocks(model, tokenizer, count(n_train), block_size, say=print)
    seconds = time.perf_counter() - started
    teacher, times = timed_teacher(model, blocks)
    return teacher, {"generate_seconds": seconds, **times}


def add_teacher(data: dict, preserve, model, tokenizer, neutral_train, block_size: int) -> None:
    """The bare model's distributions a run with ``preserve`` needs, once, when first needed: on the
    neutral corpus (True), or on text the model writes itself ("self")."""
    if preserve is True and "teacher" not in data:
        data["teacher"], data["teacher-seconds"] = timed_teacher(model, neutral_train)
    if preserve == "self" and "self-teacher" not in data:
        data["self-teacher"], data["self-seconds"] = self_teacher(model, tokenizer, len(data["style-train"]), block_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="transformers folder (default: SmolLM2-135M-Instruct in the cache)")
    p.add_argument("--tiny", action="store_true", help="a small random Llama built from a config (smoke run)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="the lr grid of every tool")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.5])
    p.add_argument("--preserve-weight", type=float, default=PRESERVE_WEIGHT, help="default: train-text's")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks measured per corpus")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--max-neutral-cost", type=float, default=0.03)
    p.add_argument("--only", nargs="+", default=None,
                   help="tools to run: hnkit+preserve, lora, lora+preserve, hnkit, hnkit+self (default: all "
                        "but hnkit+self)")
    p.add_argument("--hnkit-module", nargs="+", default=[], metavar="NAME=VALUE",
                   help="hnkit runs with module options other than train-text's defaults, or the study knobs "
                        "tie_kv=true (one module per attention layer feeds K and V) and out_lr_ratio=R (the "
                        "output layers' lr R times the others'); the LoRA rank still matches the default size")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order (runs are kept per seed)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="runs/bench-quality", help="folder for the runs' JSON, the table and the PNG")
    p.add_argument("--fresh", action="store_true", help="ignore kept runs")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = prepare_corpora()
    model, tokenizer = load_model(args)
    blocks = {name: tokenized_blocks(path, tokenizer, args.block_size) for name, path in paths.items()}
    data = {"style-train": blocks["style-train"],
            "style-test": blocks["style-test"][:args.eval_blocks],
            "neutral-test": blocks["neutral-test"][:args.eval_blocks]}
    print(", ".join(f"{k}: {len(v)} blocks of {args.block_size}" for k, v in blocks.items()))
    neutral_train = blocks["neutral-train"][:len(data["style-train"])]  # as train-text: one per style block
    bare = {"style": perplexity(model, data["style-test"], args.eval_batch),
            "neutral": perplexity(model, data["neutral-test"], args.eval_batch)}
    hn_params = n_params(hnkit.Hypernetwork.for_model(model, hnkit_default_config()))
    rank = lora_rank(hn_params, model)
    print(f"bare model: style ppl {bare['style']:.2f}, neutral ppl {bare['neutral']:.2f}; hnkit default "
          f"{hn_params / 1e6:.2f} M parameters, LoRA rank {rank} on k_proj, v_proj")
    tools = {"hnkit+preserve": ("hnkit", True), "lora": ("lora", False), "lora+preserve": ("lora", True),
             "hnkit": ("hnkit", False)}
    extra_tools = {"hnkit+self": ("hnkit", "self")}  # preservation on self-written text (train-text's default)
    setting = {k: getattr(args, k) for k in ("steps", "batch_size", "block_size", "strengths", "eval_blocks",
                                              "preserve_weight", "seed", "tiny", "model")}
    setting["neutral_share"] = NEUTRAL_SHARE

    changes = module_changes(args.hnkit_module)

    def run_setting(tool: str, preserve: bool) -> dict:  # what a run depends on: a plain run not on preservation's knobs
        out = setting if preserve else {k: v for k, v in setting.items() if k not in ("preserve_weight", "neutral_share")}
        if preserve == "self":
            from hnkit.self_text import MAX_BLOCKS, METHOD

            out = out | {"self_text": METHOD, "self_max_blocks": MAX_BLOCKS}
        return out | {"hnkit_module": changes} if tool == "hnkit" and changes else out
    runs = []
    for tool_name in args.only or tools:
        tool, preserve = (tools | extra_tools)[tool_name]
        for lr in args.lrs:
            name = " ".join([tool_name, f"lr {lr:g}", *(args.hnkit_module if tool == "hnkit" else [])])
            key = f"{zlib.crc32(json.dumps(run_setting(tool, preserve), sort_keys=True).encode()):08x}"
            kept = out / f"{tool_name}_lr_{lr:g}_{key}.json"  # a run per setting: a new one never overwrites
            if kept.exists() and json.loads(kept.read_text())["setting"] == run_setting(tool, preserve):
                runs.append(json.loads(kept.read_text())["run"])
                continue
            variant = {"name": name, "tool_name": tool_name, "tool": tool, "preserve": preserve, "lr": lr, "rank": rank,
                       "module": changes if tool == "hnkit" else {}}
            if preserve:
                add_teacher(data, preserve, model, tokenizer, neutral_train, args.block_size)
            started = time.perf_counter()
            run = train_and_sweep(args, variant, data)
            kept.write_text(json.dumps({"setting": run_setting(tool, preserve), "run": run}, indent=1))
            print(f"{name}: {time.perf_counter() - started:.0f} s; style {[round(v, 2) for v in run['style']]}, "
                  f"neutral {[round(v, 2) for v in run['neutral']]}", flush=True)
            runs.append(run)
    result = report(args, runs, bare)
    (out / "quality.json").write_text(json.dumps({"setting": setting, **result}, indent=1))


if __name__ == "__main__":
    main()
