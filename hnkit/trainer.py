"""The one training loop, shared by the text and image tasks.

A task brings the frozen base model, the hypernetwork, the data and the loss; this file owns the
rest: devices and precision (accelerate), accumulation, clipping, learning-rate schedules,
checkpoints and exact resume, validation, progress, metrics, previews, Ctrl-C and NaN handling.
The options, the schedules and the optimizer are defined in :mod:`hnkit.train_config`.

A task is any object with:
    model           the frozen base model the hypernetwork is attached to
    hypernetwork    the Hypernetwork being trained
    train_dataset   a sequence of examples (len() and [i])
    eval_dataset    the same, or None
    collate(examples) -> batch (a dict of tensors)
    loss(batch) -> scalar tensor (the hypernetwork is attached while it runs)
    sample(step, folder) -> None    optional: write previews at strength 1
    loss_is_token_cross_entropy     optional, default True: log validation perplexity too

Data order is a pure function of (seed, epoch), so the data position saved in a checkpoint is
just (epoch, offset): resume replays nothing and skips nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import nn

from .attach import attach
from .checkpoint import save
from .errors import HnkitError
from .models import enable_gradient_checkpointing
from .train_config import TrainConfig, lr_at, make_optimizer
from .util import atomic_write


# -- data order ----------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class _LossModule(nn.Module):
    """What accelerate wraps (DDP in multi-process runs): the hypernetwork's parameters and a
    forward that runs the task's loss. The base model is not a submodule, so DDP never touches it."""

    def __init__(self, hypernetwork: nn.Module, loss_fn):
        super().__init__()
        self.hypernetwork = hypernetwork
        self.__dict__["loss_fn"] = loss_fn

    def forward(self, batch):
        return self.loss_fn(batch)


class _StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the step in progress (so the checkpoint it then
    writes is exact); a second one interrupts at once."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainingStopped(HnkitError):
    """Training stopped on a NaN/inf loss; the last good checkpoint is kept."""


class Trainer:
    def __init__(self, task, config: TrainConfig):
        self.task, self.config = task, config
        c = config
        if c.precision not in ("fp32", "fp16", "bf16"):
            raise HnkitError(f"unknown precision {c.precision!r}; use fp32, fp16 or bf16")
        if c.precision == "fp16" and not torch.cuda.is_available():
            raise HnkitError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        if c.grad_accum < 1 or c.batch_size < 1 or c.max_steps < 1:
            raise HnkitError("--batch-size, --grad-accum and --max-steps must be at least 1")
        lr_at(0, c)  # a bad schedule fails now, not at step 0 of a long run
        if c.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise HnkitError("--tensorboard needs the tensorboard package: pip install tensorboard")
        self.output = Path(c.output_dir)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # with no GPU, multi-process runs use DDP over gloo
            mixed_precision={"fp32": "no"}.get(c.precision, c.precision),
            step_scheduler_with_optimizer=False,
            log_with="tensorboard" if c.tensorboard else None,
            project_dir=str(self.output),
        )
        set_seed(c.seed)
        acc = self.accelerator
        model, hn = task.model, task.hypernetwork
        model.requires_grad_(False)
        if c.precision != "fp32" and acc.device.type == "cuda":
            model.to(torch.float16 if c.precision == "fp16" else torch.bfloat16)  # the frozen base in half
        model.to(acc.device)
        hn.to(acc.device, torch.float32)  # the hypernetwork's weights stay fp32
        model.eval()  # the frozen base runs without dropout
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = make_optimizer(hn.parameters(), lr=1.0, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, c))
        self.loss_module, self.optimizer, self.scheduler = acc.prepare(_LossModule(hn, task.loss), optimizer, scheduler)
        self.step, self.epoch, self.offset = 0, 0, 0
        self.metrics: list[dict] = []

    # -- data --------------------------------------------------------------------------------
    def _next_batch(self):
        """This process's share of the next global batch of ``batch_size * num_processes``."""
        acc, bs = self.accelerator, self.config.batch_size
        n = len(self.task.train_dataset)
        world = bs * acc.num_processes
        if n < world:
            raise HnkitError(f"the training set has {n} examples, fewer than one batch of {world}")
        if self.offset + world > n:  # the tail that does not fill a batch is dropped
            self.epoch, self.offset = self.epoch + 1, 0
        order = epoch_order(n, self.config.seed, self.epoch)
        start = self.offset + acc.process_index * bs
        examples = [self.task.train_dataset[i] for i in order[start:start + bs]]
        self.offset += world
        return send_to_device(self.task.collate(examples), acc.device)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.output / "checkpoints" / f"step-{step:07d}"

    def save_checkpoint(self) -> Path:
        """Training state (accelerate) + the hypernetwork + data position, written atomically."""
        acc = self.accelerator
        final, tmp = self.checkpoint_dir(self.step), self.output / "checkpoints" / f".step-{self.step:07d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its own RNG state
        if acc.is_main_process:
            hn = self.task.hypernetwork
            hn.step = self.step
            save(hn, tmp / "hypernetwork.safetensors")
            state = {"step": self.step, "epoch": self.epoch, "offset": self.offset,
                     "num_processes": acc.num_processes, "config": asdict(self.config)}
            atomic_write(tmp / "trainer_state.json", lambda f: f.write(json.dumps(state, indent=1).encode()))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            kept = sorted(self.output.glob("checkpoints/step-*"))
            for old in kept[: max(0, len(kept) - max(1, self.config.keep_last))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        if (folder / "checkpoints").is_dir():  # an output folder: take its latest checkpoint
            found = sorted(folder.glob("checkpoints/step-*"))
            if not found:
                raise HnkitError(f"{folder}: no checkpoints to resume from")
            folder = found[-1]
        state_file = folder / "trainer_state.json"
        if not state_file.is_file():
            raise HnkitError(f"{folder}: not a training checkpoint (no trainer_state.json)")
        try:
            state = json.loads(state_file.read_text())
            self.step, self.epoch, self.offset = state["step"], state["epoch"], state["offset"]
        except (ValueError, KeyError) as exc:
            raise HnkitError(f"{state_file}: unreadable trainer state ({exc})") from None
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            raise HnkitError(f"{folder}: saved with {state['num_processes']} processes, resumed with "
                             f"{self.accelerator.num_processes}; the data order would change")
        self.accelerator.load_state(str(folder))
        self.task.hypernetwork.step = self.step
        self._load_metrics()

    def _load_metrics(self) -> None:
        """Keep the metrics up to the resumed step; later rows belong to the run being replaced."""
        path = self.output / "metrics.jsonl"
        if path.exists() and self.accelerator.is_main_process:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.metrics = [r for r in rows if r["step"] <= self.step]
            text = "".join(json.dumps(r) + "\n" for r in self.metrics)
            atomic_write(path, lambda f: f.write(text.encode()))

    # -- logging -----------------------------------------------------------------------------
    def log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.metrics.append(row)
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.config.tensorboard:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    @torch.no_grad()
    def evaluate(self) -> float | None:
        ds = self.task.eval_dataset
        if ds is None or len(ds) == 0:
            return None
        acc, bs = self.accelerator, self.config.batch_size
        losses = []
        for b in range(min(self.config.eval_batches, math.ceil(len(ds) / bs))):
            idx = range(b * bs, min(len(ds), (b + 1) * bs))
            if b % acc.num_processes != acc.process_index:
                continue
            batch = send_to_device(self.task.collate([ds[i] for i in idx]), acc.device)
            with acc.autocast():
                losses.append(self.task.loss(batch).float())
        mean = torch.stack(losses).mean() if losses else torch.zeros((), device=acc.device)
        count = torch.tensor(float(len(losses)), device=acc.device)
        total = acc.reduce(mean * count, "sum") / acc.reduce(count, "sum").clamp(min=1)
        return total.item()

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to ``max_steps``; returns the path of the final hypernetwork file."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        c, acc, task = self.config, self.accelerator, self.task
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
        if c.tensorboard:
            acc.init_trackers(c.name)
        params = [p for p in task.hypernetwork.parameters()]
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} it/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            disable=not acc.is_main_process,
        )
        bar = progress.add_task("training", total=c.max_steps, completed=self.step, loss="-", lr="-", speed="-")
        handle = attach(task.model, task.hypernetwork, strength=1.0)
        task.hypernetwork.train()
        started, steps_done = time.perf_counter(), 0
        if c.eval_every and self.step == 0:
            self._run_eval()  # the baseline: the untrained hypernetwork
        try:
            with progress, _StopOnCtrlC() as ctrl_c:
                while self.step < c.max_steps:
                    loss = self._train_step(params)
                    self.step += 1
                    steps_done += 1
                    lr = self.scheduler.get_last_lr()[0]
                    speed = steps_done / (time.perf_counter() - started)
                    progress.update(bar, completed=self.step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{speed:.2f}")
                    if self.step % c.log_every == 0 or self.step == c.max_steps:
                        self.log({"step": self.step, "loss": loss, "lr": lr, "epoch": self.epoch})
                    if c.eval_every and self.step % c.eval_every == 0:
                        self._run_eval()
                    if c.sample_every and self.step % c.sample_every == 0:
                        self._run_samples()
                    if c.save_every and self.step % c.save_every == 0 and self.step < c.max_steps:
                        self.save_checkpoint()
                    if self._any_process(ctrl_c.requested) and self.step < c.max_steps:
                        path = self.save_checkpoint()
                        if acc.is_main_process:
                            print(f"interrupted at step {self.step}: saved {path}; "
                                  f"continue with the same command and --resume {self.output}")
                        raise KeyboardInterrupt
        finally:
            handle.remove()
            if c.tensorboard:
                acc.end_training()
        self.save_checkpoint()
        final = self.output / f"{c.name}.safetensors"
        if acc.is_main_process:
            task.hypernetwork.step = self.step
            save(task.hypernetwork, final)
            self._plot_loss()
        acc.wait_for_everyone()
        return final

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor(float(flag), device=self.accelerator.device)
        return self.accelerator.reduce(t, "sum").item() > 0  # every process stops at the same step

    def _train_step(self, params) -> float:
        c, acc = self.config, self.accelerator
        total = torch.zeros((), device=acc.device)
        for micro in range(c.grad_accum):
            batch = self._next_batch()
            last = micro == c.grad_accum - 1
            with nullcontext() if last else acc.no_sync(self.loss_module):
                with acc.autocast():
                    loss = self.loss_module(batch)
                if not torch.isfinite(loss):
                    raise TrainingStopped(self._nan_message(loss))
                acc.backward(loss / c.grad_accum)
            total += loss.detach().float() / c.grad_accum
        if c.max_grad_norm:
            acc.clip_grad_norm_(params, c.max_grad_norm)  # unscales fp16 gradients first
        if c.max_grad_value:
            acc.clip_grad_value_(params, c.max_grad_value)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return acc.reduce(total, "mean").item()

    def _nan_message(self, loss) -> str:
        kept = sorted(self.output.glob("checkpoints/step-*"))
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been saved yet"
        return (f"loss became {loss.item()} at step {self.step + 1}: training stopped, nothing saved "
                f"over good files; {where} (try a lower --lr or --precision fp32)")

    def _run_eval(self) -> None:
        self.task.hypernetwork.eval()
        val = self.evaluate()
        self.task.hypernetwork.train()
        if val is not None:
            row = {"step": self.step, "val_loss": val}
            if getattr(self.task, "loss_is_token_cross_entropy", True):  # the image task's MSE has no perplexity
                row["val_ppl"] = math.exp(min(val, 50))
            self.log(row)

    def _run_samples(self) -> None:
        if self.accelerator.is_main_process and hasattr(self.task, "sample"):
            self.task.hypernetwork.eval()
            self.task.sample(self.step, self.output / "samples")
            self.task.hypernetwork.train()
        self.accelerator.wait_for_everyone()

    def _plot_loss(self) -> None:
        from .plot import line_plot

        train = [(r["step"], r["loss"]) for r in self.metrics if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.metrics if "val_loss" in r]
        if train:
            line_plot({"train loss": train, "validation loss": val}, self.output / "loss.png",
                      title=f"{self.config.name}: loss by step")
