"""The adapter part of a training step alone: every K/V projection of a model, forward and backward.

    python scripts/bench_parts.py            # SmolLM2-135M's shapes: 30 layers, 576 -> 192, 4 x 128 rows

End-to-end step ratios (scripts/bench_text.py) move by several percent from run to run on a shared
2-core machine; this isolates what an adapter adds to the frozen K/V projections: a 512 x 576
input that requires a gradient, the 60 projections, and (1 thread, ``time.thread_time``) the
median of paired rounds. It compares PEFT-style LoRA with hnkit's per-site bottleneck run through
hnkit's own Chain kernel, at matched size (the same pairing as figure 1a of bench_text.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnkit.kernels import Chain  # noqa: E402
from hnkit.strengths import Strengths  # noqa: E402
from hnkit.module import HypernetworkModule  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d", type=int, default=576, help="hidden width (the K/V input)")
    p.add_argument("--d-kv", type=int, default=192, help="K/V projection output width")
    p.add_argument("--rows", type=int, default=512, help="tokens in a step (batch x sequence)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--hidden", type=int, default=10, help="per-site bottleneck width (10 matches rank 16)")
    p.add_argument("--rounds", type=int, default=14)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, L = args.d, args.layers
    projections = [(torch.randn(args.d_kv, d) * 0.02, torch.randn(args.d_kv, d) * 0.02) for _ in range(L)]
    lora = [[(torch.nn.Parameter(torch.randn(args.rank, d) * 0.01), torch.nn.Parameter(torch.zeros(args.d_kv, args.rank)))
             for _ in range(2)] for _ in range(L)]
    structure = [1, (args.hidden + 0.5) / d, 1]
    kernels = [Chain([(0, (HypernetworkModule(d, structure, "relu"), HypernetworkModule(d, structure, "relu")), 1.0)],
                     Strengths([1.0])) for _ in range(L)]
    x0 = torch.randn(args.rows, d)

    def frozen():
        x = x0.clone().requires_grad_(True)
        sum(F.linear(x, w).sum() for pair in projections for w in pair).backward()

    def with_lora():
        x = x0.clone().requires_grad_(True)
        sum((F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0).sum()
            for pair, ab in zip(projections, lora) for w, (a, b) in zip(pair, ab)).backward()

    def with_hnkit():
        x = x0.clone().requires_grad_(True)
        sum(F.linear(kernel(x, which), w).sum()
            for pair, kernel in zip(projections, kernels) for which, w in enumerate(pair)).backward()

    variants = {"frozen projections": frozen, f"LoRA r={args.rank}": with_lora,
                f"hnkit per-site [1, {args.hidden}/{d}, 1] relu (Chain)": with_hnkit}
    times = {name: [] for name in variants}
    for i in range(args.rounds + 2):
        for name, run in variants.items():
            t = time.thread_time()
            run()
            if i >= 2:
                times[name].append(time.thread_time() - t)
    base = statistics.median(times["frozen projections"])
    print(f"{L} layers, {d} -> {args.d_kv}, {args.rows} rows, forward + backward, 1 thread, median of {args.rounds}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:45s} {t * 1e3:7.1f} ms" + ("" if ts is times["frozen projections"] else f"  (+{(t - base) * 1e3:.1f} ms)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
