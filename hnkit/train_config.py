"""What a training run is set up with: its options (``TrainConfig``), the learning rate at each
step (a number with a warm-up and a schedule, or the web UI's step string) and the optimizer.
:class:`hnkit.trainer.Trainer` runs the loop with them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import HnkitError


@dataclass
class TrainConfig:
    output_dir: str = "runs/hypernetwork"
    max_steps: int = 1000
    batch_size: int = 4  # per process
    grad_accum: int = 1
    lr: float | str = 1e-4  # a number, or the web UI's step string "5e-3:100, 1e-3:1000, 1e-5"
    lr_schedule: str = "constant"  # constant | linear | cosine (ignored for a step string)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_grad_value: float | None = None
    precision: str = "fp32"  # fp32 | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    eval_every: int = 0
    eval_batches: int = 16
    sample_every: int = 0
    log_every: int = 10
    tensorboard: bool = False
    name: str = "hypernetwork"
    force: bool = False  # a fresh run may replace a finished or resumable run in output_dir


# -- learning-rate schedules -------------------------------------------------------------------
def parse_step_string(text: str) -> list[tuple[float, int | None]]:
    """``"5e-3:100, 1e-3:1000, 1e-5"`` -> [(5e-3, 100), (1e-3, 1000), (1e-5, None)]."""
    pieces = []
    try:
        for part in str(text).split(","):
            rate, _, until = part.strip().partition(":")
            pieces.append((float(rate), int(until) if until.strip() else None))
    except ValueError:
        raise HnkitError(f"bad learning rate {text!r}: expected a number or 'rate:step, rate:step, rate'") from None
    if any(until is None for _, until in pieces[:-1]):
        raise HnkitError(f"bad learning rate {text!r}: only the last rate may omit ':step'")
    return pieces


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based)."""
    if isinstance(config.lr, str):
        # parse_step_string guarantees the last piece has no end step, so this always returns
        return next(rate for rate, until in parse_step_string(config.lr) if until is None or step < until)
    lr, warm, total = float(config.lr), config.warmup_steps, config.max_steps
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if config.lr_schedule == "constant":
        return lr
    if config.lr_schedule == "linear":
        return lr * max(0.0, 1.0 - progress)
    if config.lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise HnkitError(f"unknown lr schedule {config.lr_schedule!r}; use constant, linear or cosine")


# -- the optimizer -------------------------------------------------------------------------------
def make_optimizer(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW updating all tensors in one fused kernel, on CUDA and on the CPU alike: a per-site
    hypernetwork has four small tensors per module, two modules per attention layer, and torch's
    per-tensor loop (the CPU default) or its foreach path spend more time per tensor than on the
    arithmetic (SmolLM2's 240 tensors: 5.8 ms per step with foreach, 1.6 ms fused, one CPU core).
    Where no fused kernel exists for the device, the foreach path."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
