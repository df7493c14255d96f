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
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import nn

from .attach import attach
from .checkpoint import load, save
from .errors import HnkitError
from .models import enable_gradient_checkpointing
from .train_config import TrainConfig, check_same_run, config_options, lr_at, make_optimizer
from .run_folder import (TRAINING_STATE, Metrics, OutputLock, checkpoint_to_resume, clean_leftovers,
                         complete_checkpoints, finite_weights, read_position, read_state, read_trainer_state,
                         recorded_options, refuse_existing_run, rng_state, set_rng_state, set_training_state,
                         training_state, write_checkpoint, write_trainer_state)


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
    """The first Ctrl-C (or SIGTERM, which schedulers, ``timeout`` and ``docker stop`` send) asks the
    loop to stop after the step in progress, so the checkpoint it then writes is exact; a second one
    interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)")

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[speed]} it/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled,
    )


class TrainingStopped(HnkitError):
    """Training stopped on a NaN/inf loss; the last good checkpoint is kept."""


class Trainer:
    def __init__(self, task, config: TrainConfig, options: dict | None = None):
        """``options``: the task's own options that change what the run computes (its data, model,
        network structure: :func:`hnkit.train_config.task_options`), recorded with the trainer's
        in every checkpoint; a resume that changes one of them is refused."""
        self.task, self.config = task, config
        self.options = {**config_options(config), **(options or {})}
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
        self.metrics = Metrics(self.output, acc, c.tensorboard)  # the rows logged: ``for row in trainer.metrics``
        self.resumed, self.started = False, time.perf_counter()
        n, world = len(task.train_dataset), c.batch_size * acc.num_processes
        if n < world:  # found before anything is written
            raise HnkitError(f"the training set has {n} example{'' if n == 1 else 's'}, fewer than one batch of "
                             f"{world}; use a smaller --batch-size or more data")
        # one run per folder: taken before anything is written there, released when train() ends
        self.lock = OutputLock(self.output) if acc.is_main_process else None

    # -- data --------------------------------------------------------------------------------
    def _next_batch(self):
        """This process's share of the next global batch of ``batch_size * num_processes``."""
        acc, bs = self.accelerator, self.config.batch_size
        n = len(self.task.train_dataset)
        world = bs * acc.num_processes
        if self.offset + world > n:  # the tail that does not fill a batch is dropped
            self.epoch, self.offset = self.epoch + 1, 0
        order = epoch_order(n, self.config.seed, self.epoch)
        start = self.offset + acc.process_index * bs
        examples = [self.task.train_dataset[i] for i in order[start:start + bs]]
        self.offset += world
        return send_to_device(self.task.collate(examples), acc.device)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """The hypernetwork, the optimizer/scheduler/scaler state, every process's RNG state and the
        data position (docs/design.md, "The run folder"), put in place whole by
        :func:`hnkit.run_folder.write_checkpoint`."""
        acc = self.accelerator

        def write(folder: Path) -> None:
            torch.save(rng_state(), folder / f"rng_state_{acc.process_index}.pt")  # each process its own
            if acc.is_main_process:
                hn = self.task.hypernetwork
                hn.step = self.step
                save(hn, folder / "hypernetwork.safetensors")
                torch.save(training_state(self.optimizer, self.scheduler, acc.scaler), folder / TRAINING_STATE)
                write_trainer_state(folder, {"step": self.step, "epoch": self.epoch, "offset": self.offset,
                                             "num_processes": acc.num_processes, "options": self.options})

        return write_checkpoint(self.output, self.step, self.config.keep_last, acc, write)

    def resume(self, folder: str | os.PathLike) -> None:
        if self.accelerator.is_main_process:
            clean_leftovers(self.output)
        folder = checkpoint_to_resume(Path(folder))
        self._read_trainer_state(folder)
        hn = load(folder / "hypernetwork.safetensors")  # checked like any network file: one line if damaged
        if hn.keys() != self.task.hypernetwork.keys() or hn.config != self.task.hypernetwork.config:
            raise HnkitError(f"{folder / 'hypernetwork.safetensors'}: not the network this run trains")
        training_file, rng_file = folder / TRAINING_STATE, folder / f"rng_state_{self.accelerator.process_index}.pt"
        training, rng = read_state(training_file, dict), read_state(rng_file, dict)
        with torch.no_grad():
            for mine, saved in zip(self.task.hypernetwork.parameters(), hn.parameters()):
                mine.copy_(saved)
        set_training_state(training, training_file, self.optimizer, self.scheduler, self.accelerator.scaler)
        set_rng_state(rng, rng_file)
        self.task.hypernetwork.step = self.step
        self.resumed = True
        self.metrics.load(self.step)

    def _read_trainer_state(self, folder: Path) -> None:
        """Step and data position from checkpoint ``folder``, once its trainer state is found sound
        and its record of the run's options matches this run's (notes for those that may change)."""
        state, main = read_trainer_state(folder), self.accelerator.is_main_process
        recorded = recorded_options(state, folder)
        notes = check_same_run(recorded, self.options, folder) if recorded is not None else []
        self.step, self.epoch, self.offset = read_position(folder, state, self.config, self.accelerator.num_processes,
                                                           len(self.task.train_dataset))
        if main and recorded is None:
            print(f"hnkit: warning: {folder} does not record the run's options (an older hnkit wrote it); "
                  "resuming without checking that they are the same", file=sys.stderr)
        for note in notes if main else []:
            print(f"hnkit: note: {note}")

    # -- logging -----------------------------------------------------------------------------
    def log(self, row: dict) -> None:
        """One metrics row (``step`` and numbers), kept, written by the main process and plotted at the end."""
        self.metrics.add(row)

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
        try:
            return self._train()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _start_fresh(self) -> None:
        """A run from step 0 owns the folder: what a killed or (with ``force``) a finished earlier
        run left there goes, so checkpoints and metrics are this run's alone."""
        if not self.config.force:
            refuse_existing_run(self.output, self.config.name)
        shutil.rmtree(self.output / "checkpoints", ignore_errors=True)
        self.metrics.clear()
        clean_leftovers(self.output)

    def _train(self) -> Path:
        c, acc, task = self.config, self.accelerator, self.task
        if acc.is_main_process and not self.resumed:
            self._start_fresh()
        acc.wait_for_everyone()
        if c.tensorboard:
            acc.init_trackers(c.name)
        params = list(task.hypernetwork.parameters())
        progress = _progress_bar(acc.is_main_process)
        bar = progress.add_task("training", total=c.max_steps, completed=self.step, loss="-", lr="-", speed="-")
        plain = acc.is_main_process and not progress.console.is_terminal  # a log file: no live bar
        handle = attach(task.model, task.hypernetwork, strength=1.0)
        task.hypernetwork.train()
        self.started, steps_done = time.perf_counter(), 0
        if c.eval_every and self.step == 0:
            self._run_eval()  # the baseline: the untrained hypernetwork
        try:
            with progress, _StopOnCtrlC() as ctrl_c:
                while self.step < c.max_steps:
                    loss = self._train_step(params)
                    self.step, steps_done = self.step + 1, steps_done + 1
                    self._report_step(loss, steps_done, progress, bar, plain)
                    self._periodic_work()
                    if self._any_process(ctrl_c.requested) and self.step < c.max_steps:
                        self._stop_interrupted()
        finally:
            handle.remove()
            if c.tensorboard:
                acc.end_training()
        return self._save_final()

    def _report_step(self, loss: float, steps_done: int, progress, bar, plain: bool) -> None:
        """The progress bar, and on a logged step the metrics row (and a printed line when ``plain``)."""
        c = self.config
        lr = self.scheduler.get_last_lr()[0]
        speed = steps_done / (time.perf_counter() - self.started)
        progress.update(bar, completed=self.step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{speed:.2f}")
        if self.step % c.log_every == 0 or self.step == c.max_steps:
            self.log({"step": self.step, "loss": loss, "lr": lr, "epoch": self.epoch})
            if plain:
                print(f"step {self.step}/{c.max_steps} loss {loss:.4f} lr {lr:.2e} {speed:.2f} it/s", flush=True)

    def _periodic_work(self) -> None:
        """Validation, previews and checkpoints, each at its ``--*-every`` steps."""
        c = self.config
        if c.eval_every and self.step % c.eval_every == 0:
            self._run_eval()
        if c.sample_every and self.step % c.sample_every == 0:
            self._run_samples()
        if c.save_every and self.step % c.save_every == 0 and self.step < c.max_steps:
            self.save_checkpoint()

    def _stop_interrupted(self) -> None:
        path = self.save_checkpoint()
        if self.accelerator.is_main_process:
            print(f"interrupted at step {self.step}: saved {path}; "
                  f"continue with the same command and --resume {self.output}")
        raise KeyboardInterrupt

    def _save_final(self) -> Path:
        """The last checkpoint, then the finished network ``NAME.safetensors`` and the loss plot."""
        self.save_checkpoint()
        final = self.output / f"{self.config.name}.safetensors"
        if self.accelerator.is_main_process:
            self.task.hypernetwork.step = self.step
            save(self.task.hypernetwork, final)
            self.metrics.plot(f"{self.config.name}: loss by step")
        self.accelerator.wait_for_everyone()
        return final

    def summary(self) -> str:
        """The run in one line: steps, time, and the last and best validation perplexity."""
        text = f"{self.step} steps in {time.perf_counter() - self.started:.0f} s"
        vals = [(r["val_ppl"], r["step"]) for r in self.metrics if "val_ppl" in r]
        if vals:
            best = min(vals)
            text += f"; validation perplexity {vals[-1][0]:.3f} (best {best[0]:.3f} at step {best[1]})"
        return text

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
        good = [c for c in complete_checkpoints(self.output) if finite_weights(c / "hypernetwork.safetensors")]
        where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint with finite weights exists"
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
