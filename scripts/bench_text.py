"""Benchmark hnkit on a causal LM: every figure is a ratio against a baseline run in this process,
on the same model and the same batch (see docs/design.md). Nothing here asserts a time.

    python scripts/bench_text.py                      # SmolLM2-135M, CPU fp32, batch 4 x 128 (~3 min, 2 cores)
    python scripts/bench_text.py --tiny               # small random Llama: a smoke run in seconds
    python scripts/bench_text.py --device cuda --dtype bf16 --batch-size 8 --seq-len 512
    python scripts/bench_text.py --only-generate      # figures 3 only (no training steps): ~2.5 min

Needs PEFT for the LoRA baseline: pip install -e ".[bench]"

1. training step (forward + backward + AdamW step, base frozen) of a hypernetwork vs a PEFT LoRA
   step on k_proj/v_proj with about the same number of trainable parameters, for
   (a) a per-site bottleneck hypernetwork [1, m/d, 1], m chosen to match LoRA rank --lora-rank;
   (b) the classic web UI hypernetwork [1, 2, 1] (one (k, v) pair shared by all layers of a width),
       against a LoRA whose rank is chosen to match its size.
2. hypernetwork training step vs a no-grad forward of the same batch.
4. per-site training step with prior preservation (train-text --preserve-data: neutral rows in the
   same forward and a KL term against cached bare-model outputs) vs the same step without.
3. greedy generate() tokens/s (KV cache on, batch 1) with a hypernetwork attached vs without:
   (a) per-site, (b) shared [1, 2, 1], both with --activation; and a linear shared [1, 2, 1] (the
   SmolLM2 demo recipe's network) (c) attached and (d) fused into the K/V weights (hnkit.fuse).

Timing: warm-up rounds, then --steps timed rounds. Each round runs every variant once, one after the
other in a rotating order, so that load from other processes falls on all of them alike; a ratio is
the median over rounds of (hnkit time / baseline time) within a round.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hnkit  # noqa: E402
from hnkit.preserve import Teacher  # noqa: E402
from hnkit.targets import find_sites  # noqa: E402
from hnkit.text import TextTask  # noqa: E402
from hnkit.train_config import make_optimizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# -----------------------------------------------------------------------------------------------
# setup


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="transformers folder or hub id (default: SmolLM2-135M-Instruct, "
                                                 "made by scripts/prepare_smollm2.py)")
    p.add_argument("--tiny", action="store_true", help="a small random Llama built from a config (smoke run)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of comparison (a)")
    p.add_argument("--activation", default="relu", help="hypernetwork activation (relu, gelu, linear, ...)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per generate() call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="bf16/fp16: the forward runs under autocast (hypernetwork and LoRA weights stay fp32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--only-generate", action="store_true",
                   help="skip the training figures (1, 2): time generate() only")
    p.add_argument("--profile", action="store_true",
                   help="also time the hypernetwork modules alone and print a torch.profiler table per config")
    return p.parse_args(argv)


def load_model(args, device):
    if args.tiny:
        config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(config)
    else:
        folder = args.model
        if folder is None:
            from prepare_smollm2 import prepare_smollm2

            folder = prepare_smollm2()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        # from_pretrained may leave the weights mapped from the file; the LoRA baselines are copies in
        # ordinary memory, so the hypernetwork's base is one too.
        model = copy.deepcopy(model)
    return model.to(device)


def kv_widths(model):
    """(input width d, k_proj out, v_proj out, number of layers) of a model with separate k_proj and
    v_proj (Llama, Mistral, Qwen2, OPT, GPT-Neo, GPT-J), which is what the LoRA baseline targets."""
    attn = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")]
    if not attn:
        sys.exit(f"bench_text: {type(model).__name__} has no k_proj/v_proj layers for the LoRA baseline")
    return attn[0].k_proj.in_features, attn[0].k_proj.out_features, attn[0].v_proj.out_features, len(attn)


def n_trainable(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def lora_model(model, rank: int):
    """A PEFT LoRA on k_proj and v_proj of a copy of ``model``."""
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["k_proj", "v_proj"])
    return get_peft_model(copy.deepcopy(model), config)


def bottleneck_for(lora_params: int, d: int, n_sites: int) -> int:
    """Hidden width m of a per-site [1, m/d, 1] hypernetwork with about ``lora_params`` parameters:
    each site has two modules of d*m + m + m*d + d parameters."""
    return max(1, round((lora_params / (2 * n_sites) - d) / (2 * d + 1)))


def lora_rank_for(hn_params: int, d: int, dk: int, dv: int, n_layers: int) -> int:
    """LoRA rank on k_proj/v_proj with about ``hn_params`` parameters: r*(d+dk) + r*(d+dv) per layer."""
    return max(1, round(hn_params / (n_layers * (2 * d + dk + dv))))


# -----------------------------------------------------------------------------------------------
# the steps being timed


def train_step(model, optimizer, batch, autocast, scaler):
    with autocast():
        loss = model(**batch).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def forward_only(model, batch, autocast):
    with autocast():
        model(**batch)


class Variant:
    """Something to time: ``run()`` inside ``context()`` (e.g. a hypernetwork attached)."""

    def __init__(self, name, run, context=contextlib.nullcontext, params=None):
        self.name, self.run, self.context, self.params = name, run, context, params
        self.times: list[float] = []
        self.last = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(variants, warmup: int, steps: int, sync, console, what: str) -> None:
    for r in range(warmup + steps):
        k = r % len(variants)  # rotate the order, so that no variant always follows the same one
        for v in variants[k:] + variants[:k]:
            with v.context():
                sync()
                t0 = time.perf_counter()
                v.run()
                sync()
                v.last = time.perf_counter() - t0
            if r >= warmup:
                v.times.append(v.last)
        label = "warm-up" if r < warmup else f"round {r - warmup + 1}/{steps}"
        console.log(f"{what} {label}: " + ", ".join(f"{v.name} {v.last:.3f}s"
                                                     for v in variants))


def per_round(v, base) -> list[float]:
    """``v``'s time over ``base``'s time, round by round (the same round: the same load)."""
    return [a / b for a, b in zip(v.times, base.times)]


def middle_half(v, base) -> str:
    """The 25th to 75th percentile of the per-round ratios, e.g. ``0.97-1.02``."""
    ratios = sorted(per_round(v, base))
    if len(ratios) < 2:
        return ""
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{q1:.3f}-{q3:.3f}"


# -----------------------------------------------------------------------------------------------
# diagnostics (--profile)


def time_modules_alone(model, hn, batch_size, seq_len, device, steps, sync) -> float:
    """Forward + backward of just the hypernetwork's modules, once per site as in the model."""
    _, sites = find_sites(model)
    pairs = [hn.pair_for(site) for site in sites]
    d = sites[0].width
    x = torch.randn(batch_size, seq_len, d, device=device, requires_grad=True)
    grad = torch.randn(batch_size, seq_len, d, device=device)
    times = []
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        outs = [m(x) for pair in pairs for m in pair]
        torch.autograd.backward(outs, [grad] * len(outs))
        sync()
        if i:
            times.append(time.perf_counter() - t0)
        hn.zero_grad(set_to_none=True)
        x.grad = None
    return statistics.median(times)


def profile_step(variant, console, device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with variant.context(), torch.profiler.profile(activities=activities) as prof:
        variant.run()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    console.print(f"[bold]torch.profiler: {variant.name}[/bold]")
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40), flush=True)


# -----------------------------------------------------------------------------------------------


def setup(args):
    """The run's device (with --threads applied on the CPU), a sync for timing, and its autocast:
    bf16/fp16 under torch.autocast, fp32 without."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = DTYPES[args.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    return device, sync, autocast


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 130)
    device, sync, autocast = setup(args)
    torch.manual_seed(0)
    model = load_model(args, device)
    d, dk, dv, n_layers = kv_widths(model)
    vocab = model.config.vocab_size
    console.print(f"model: {model.config.model_type}, hidden {d}, {n_layers} layers, k/v out {dk}/{dv}, "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; device {device}, "
                  f"{args.dtype}, {torch.get_num_threads()} threads; batch {args.batch_size} x {args.seq_len}")

    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), device=device)
    batch = dict(input_ids=ids, labels=ids, use_cache=False)

    # The four trainable setups, matched in size in pairs.
    lora_a = lora_model(model, args.lora_rank)
    m = bottleneck_for(n_trainable(lora_a.parameters()), d, n_layers)
    fraction = m / d if int(d * (m / d)) == m else (m + 0.5) / d  # int(d * fraction) must give m
    site_config = hnkit.HypernetworkConfig(layer_structure=[1, fraction, 1], activation=args.activation,
                                         per_site=True)
    hn_site = hnkit.Hypernetwork.for_model(model, site_config, name="per-site")
    hidden = hn_site[hn_site.keys()[0]][0].linear[0].out_features
    assert hidden == m, f"bottleneck width {hidden} != {m} (float rounding of {m}/{d})"
    shared_config = hnkit.HypernetworkConfig(layer_structure=[1, 2, 1], activation=args.activation)
    hn_shared = hnkit.Hypernetwork.for_model(model, shared_config, name="shared")
    lora_b_rank = lora_rank_for(n_trainable(hn_shared.parameters()), d, dk, dv, n_layers)
    lora_b = lora_model(model, lora_b_rank)
    hn_site.to(device)
    hn_shared.to(device)

    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")

    def hn_variant(name, hn):
        optimizer = make_optimizer(hn.parameters(), lr=1e-4)  # what hnkit's Trainer uses
        return Variant(name, lambda: train_step(model, optimizer, batch, autocast, scaler),
                       context=lambda: hnkit.attach(model, hn), params=n_trainable(hn.parameters()))

    def lora_variant(name, peft_model):
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, lr=1e-4)  # the same optimizer for LoRA
        return Variant(name, lambda: train_step(peft_model, optimizer, batch, autocast, scaler),
                       params=n_trainable(params))

    no_grad = Variant("no-grad forward", lambda: forward_only(model, batch, autocast))
    site = hn_variant(f"hnkit per-site [1, {m}/{d}, 1] {args.activation}", hn_site)
    lora_site = lora_variant(f"LoRA r={args.lora_rank} k,v", lora_a)
    shared = hn_variant(f"hnkit shared [1, 2, 1] {args.activation}", hn_shared)
    lora_shared = lora_variant(f"LoRA r={lora_b_rank} k,v", lora_b)
    # The one kept fast path, against itself switched off: the classic linear [1, 2, 1] (the demo
    # recipe's network) with the Collapsed kernel, and with every site running the layers (Chain).
    hn_linear_train = hnkit.Hypernetwork.for_model(model, hnkit.HypernetworkConfig(layer_structure=[1, 2, 1]),
                                                   name="linear").to(device)
    linear = hn_variant("hnkit shared [1, 2, 1] linear (Collapsed)", hn_linear_train)
    linear_layers = hn_variant("hnkit shared [1, 2, 1] linear, layers at every site (Chain)", hn_linear_train)
    linear_layers.context = lambda: hnkit.attach(model, hn_linear_train, fast=False)
    # Prior preservation (train-text --preserve-data): the same step with the neutral rows and the KL
    # term that TextTask adds, against cached teacher outputs computed before anything is attached.
    torch.manual_seed(3)
    neutral = torch.randint(3, vocab, (args.batch_size, args.seq_len), device=device)
    task = TextTask(model, None, None, ids.cpu(), preserve=Teacher(model, neutral))
    preserve_batch = {k: v.to(device) for k, v in task.collate([task.train_dataset[i] for i in range(len(ids))]).items()}
    preserve_optimizer = make_optimizer(hn_site.parameters(), lr=1e-4)

    def preserve_step():
        with autocast():
            loss = task.loss(preserve_batch)
        scaler.scale(loss).backward()
        scaler.step(preserve_optimizer)
        scaler.update()
        preserve_optimizer.zero_grad(set_to_none=True)

    site_preserve = Variant(f"{site.name} + preservation ({len(preserve_batch['preserve_ids'])} neutral rows)",
                            preserve_step, context=lambda: hnkit.attach(model, hn_site))
    train_variants = [no_grad, site, lora_site, shared, lora_shared, linear, linear_layers, site_preserve]

    params = Table("setup", "trainable parameters", "vs its LoRA", title="Trainable parameters")
    for v, ref in ((site, lora_site), (lora_site, None), (shared, lora_shared), (lora_shared, None)):
        params.add_row(v.name, f"{v.params:,}", f"{v.params / ref.params - 1:+.1%}" if ref else "")
    console.print(params)

    model.train()
    lora_a.train()
    lora_b.train()
    if not args.only_generate:
        measure(train_variants, args.warmup, args.steps, sync, console, "train")

    if args.profile and not args.only_generate:
        for v, hn in ((site, hn_site), (shared, hn_shared)):
            alone = time_modules_alone(model, hn, args.batch_size, args.seq_len, device, args.steps, sync)
            console.print(f"{v.name}: modules alone (fwd + bwd, every site) {alone:.3f}s = "
                          f"{alone / v.median:.0%} of its training step ({v.median:.3f}s)")
        for v in (site, lora_site, shared):
            profile_step(v, console, device)

    # Generation: batch 1, greedy, KV cache on, a fixed number of new tokens.
    model.eval()
    hn_site.eval()  # as hnkit.load returns a network
    hn_shared.eval()
    torch.manual_seed(1)
    prompt = torch.randint(3, vocab, (1, 16), device=device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id

    @torch.no_grad()
    def generate():
        with autocast():
            out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=pad)
        assert out.shape[1] == prompt.shape[1] + args.new_tokens

    gen_base = Variant("generate, no hypernetwork", generate)
    gen_site = Variant("generate, per-site attached", generate, context=lambda: hnkit.attach(model, hn_site))
    gen_shared = Variant("generate, shared attached", generate, context=lambda: hnkit.attach(model, hn_shared))
    # A linear network (no activation) can be folded into the K/V weights: hnkit.fuse.
    torch.manual_seed(2)
    hn_linear = hnkit.Hypernetwork.for_model(model, hnkit.HypernetworkConfig(layer_structure=[1, 2, 1]),
                                             name="linear").to(device).eval()
    gen_linear = Variant("generate, linear attached", generate, context=lambda: hnkit.attach(model, hn_linear))
    gen_fused = Variant("generate, linear fused", generate, context=lambda: hnkit.fuse(model, hn_linear))
    gen_variants = [gen_base, gen_site, gen_shared, gen_linear, gen_fused]
    measure(gen_variants, args.warmup, args.steps, sync, console, "generate")

    # Report. A ratio is the median over rounds of (hnkit time / baseline time) within one round, so
    # that a burst of load from another process skews one round, not the figure.
    def ratio(v, base):
        return statistics.median(per_round(v, base))

    table = Table("figure", "hnkit", "baseline", "ratio", "rounds, middle half", "target", "met",
                  title=f"hnkit vs same-run baselines (median of {args.steps} rounds; batch {args.batch_size} x "
                        f"{args.seq_len}; {device.type} {args.dtype}, {torch.get_num_threads()} threads)")

    def row(figure, value, base, r, target, unit="s", spread=""):
        ok = "[green]yes[/green]" if r <= target else "[red]no[/red]"
        fmt = "{:.3f} s" if unit == "s" else "{:.1f} tok/s"
        table.add_row(figure, fmt.format(value), fmt.format(base), f"{r:.3f}", spread, f"<= {target:g}", ok)

    if not args.only_generate:
        row(f"1a train step: per-site vs LoRA r={args.lora_rank}", site.median, lora_site.median,
            ratio(site, lora_site), 1.03, spread=middle_half(site, lora_site))
        row(f"1b train step: shared [1, 2, 1] vs LoRA r={lora_b_rank}", shared.median, lora_shared.median,
            ratio(shared, lora_shared), 1.0, spread=middle_half(shared, lora_shared))
        row("2a train step: per-site vs no-grad forward", site.median, no_grad.median, ratio(site, no_grad), 2.3,
            spread=middle_half(site, no_grad))
        row("2b train step: shared [1, 2, 1] vs no-grad forward", shared.median, no_grad.median,
            ratio(shared, no_grad), 2.3, spread=middle_half(shared, no_grad))
        row(f"(ref) train step: LoRA r={args.lora_rank} vs no-grad forward", lora_site.median, no_grad.median,
            ratio(lora_site, no_grad), 2.3, spread=middle_half(lora_site, no_grad))
        row("1c train step: linear [1, 2, 1] Collapsed vs its layers (Chain)", linear.median,
            linear_layers.median, ratio(linear, linear_layers), 0.95, spread=middle_half(linear, linear_layers))
        row("4 train step: per-site with prior preservation vs without", site_preserve.median, site.median,
            ratio(site_preserve, site), 1.5, spread=middle_half(site_preserve, site))
    for label, v, target in (("3a generate: per-site attached vs none", gen_site, 1.06),
                             ("3b generate: shared [1, 2, 1] attached vs none", gen_shared, 1.05),
                             ("3c generate: linear [1, 2, 1] attached vs none", gen_linear, 1.05),
                             ("3d generate: linear [1, 2, 1] fused vs none", gen_fused, 1.01)):
        row(label, args.new_tokens / v.median, args.new_tokens / gen_base.median, ratio(v, gen_base), target,
            unit="tok/s", spread=middle_half(v, gen_base))
    console.print(table)
    console.print(f"per-site = {site.name}, shared = {shared.name}. ratio = hnkit time / baseline time, "
                  "the median of per-round ratios (the middle half of them beside it: a spread wider than the "
                  "distance to the target means the machine cannot tell; --threads 1 and more --steps narrow "
                  "it); for generate 1.05 means 5% fewer tokens per second.")
    for v in gen_variants[1:]:
        extra = (v.median - gen_base.median) / args.new_tokens
        console.print(f"{v.name}: {extra * 1e3:+.2f} ms per token = {extra / n_layers * 1e6:+.0f} us per "
                      f"attention layer (K and V together)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
