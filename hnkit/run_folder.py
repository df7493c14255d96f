"""A training run's output folder: which checkpoints in it are complete, how a checkpoint is
removed without ever leaving a partial one under its real name, what killed runs leave behind and
how it is tidied, whether a fresh run would overwrite anything, and the lock that keeps one run per
folder, and the checkpoint's state files (plain tensors and numbers, never a pickle that runs): how a
checkpoint is written into place whole, which one a resume reads, and its data position; and the
run's metrics (``metrics.jsonl``, checked on resume, and ``loss.png``). The trainer
(:mod:`hnkit.trainer`) decides when to write a checkpoint and what goes into it, and what it logs;
this file names, places and checks their parts."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from .errors import HnkitError, first_line, shown
from .safe_load import load_plain
from .util import atomic_write


def complete_checkpoints(output: Path) -> list[Path]:
    """``checkpoints/step-N`` folders holding their last file, oldest first."""
    return sorted(p.parent for p in Path(output).glob("checkpoints/step-*/trainer_state.json"))


def remove(folder: Path) -> None:
    """Delete a checkpoint folder out of sight: renamed to a hidden name first, so an interrupted
    delete never leaves a partial folder under a real name (:func:`clean_leftovers` ends it)."""
    if folder.exists() or folder.is_symlink():
        hidden = folder.with_name(f".{folder.name}.{os.getpid()}.del")
        os.replace(folder, hidden)
        _delete(hidden)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(output: Path) -> None:
    """Tidy what killed runs left in ``output``: a whole checkpoint swapped out for its re-save goes
    back if the new one never landed; hidden ``*.tmp`` files and folders, half-deleted checkpoints
    and ``step-N`` folders without their last file go."""
    output = Path(output)
    for old in output.glob("checkpoints/.step-*.old"):
        final = old.with_name(old.name[1:].removesuffix(".old"))
        if (old / "trainer_state.json").exists() and not (final / "trainer_state.json").exists():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
    for path in [*output.glob(".*.tmp"), *output.glob("checkpoints/.*"), *output.glob("checkpoints/step-*")]:
        if path.name.startswith(".") or not (path / "trainer_state.json").exists():
            _delete(path)


TRAINING_STATE = "training_state.pt"  # the optimizer's, the scheduler's and the grad scaler's state
TRAINER_STATE = "trainer_state.json"  # step, data position, processes, options: a checkpoint's last file


def write_checkpoint(output: Path, step: int, keep_last: int, acc, write) -> Path:
    """Write checkpoint ``step`` of the run in ``output``: ``write(folder)`` (called in every process
    of ``acc``, an accelerate Accelerator) fills a hidden folder, which is renamed into place only
    when complete, so a ``step-N`` folder is always whole; old ones are pruned only after that
    (all but the last ``keep_last``), each renamed out of sight before it is deleted."""
    final = output / "checkpoints" / f"step-{step:07d}"
    tmp = output / "checkpoints" / f".step-{step:07d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    try:
        if acc.is_main_process:
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        write(tmp)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(output, exc, tmp) from None
    if acc.is_main_process:
        swapped = final.with_name(f".{final.name}.old")  # the same step saved again: keep it whole
        if final.exists():  # until the new one is in place (clean_leftovers puts it back if killed)
            shutil.rmtree(swapped, ignore_errors=True)
            os.replace(final, swapped)
        os.replace(tmp, final)
        remove(swapped)
        kept = complete_checkpoints(output)
        for old in kept[: max(0, len(kept) - max(1, keep_last))]:
            remove(old)
    acc.wait_for_everyone()
    return final


def checkpoint_to_resume(folder: Path) -> Path:
    """The checkpoint ``--resume FOLDER`` names: the folder itself, or an output folder's latest
    complete checkpoint."""
    if (folder / "checkpoints").is_dir():
        found = complete_checkpoints(folder)
        if not found:
            raise HnkitError(f"{folder}: no checkpoints to resume from")
        folder = found[-1]
    if not (folder / TRAINER_STATE).is_file():
        raise HnkitError(f"{folder}: not a training checkpoint (no {TRAINER_STATE})")
    return folder


STATE_LIMIT = 1 << 20  # bytes: a trainer state is a few KiB of numbers and options
COUNT_LIMIT = 1 << 40  # steps, epochs, examples: far beyond any run, and safe as part of a torch seed


def read_trainer_state(folder: Path) -> dict:
    """A checkpoint's ``trainer_state.json`` as a dict: one line naming it if it is too large, not
    JSON, nested too deeply or not an object."""
    path = folder / TRAINER_STATE
    try:
        with open(path, "rb") as f:
            raw = f.read(STATE_LIMIT + 1)
        if len(raw) > STATE_LIMIT:
            raise ValueError(f"larger than {STATE_LIMIT >> 10} KiB")
        state = json.loads(raw)
    except RecursionError:
        raise HnkitError(f"{path}: unreadable trainer state (nested too deeply)") from None
    except (OSError, ValueError) as exc:
        raise HnkitError(f"{path}: unreadable trainer state ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise HnkitError(f"{path}: unreadable trainer state (not a JSON object)")
    return state


def recorded_options(state: dict, folder: Path) -> dict | None:
    """The record of the run's options in a checkpoint's trainer ``state`` (None if an older hnkit
    wrote it without one); one line if it is not a JSON object."""
    recorded = state.get("options")
    if recorded is not None and not isinstance(recorded, dict):
        raise HnkitError(f"{folder / TRAINER_STATE}: unreadable trainer state (options is not a JSON object)")
    return recorded


def _count(state: dict, key: str, path: Path, low: int = 0, high: int = COUNT_LIMIT) -> int:
    value = state.get(key)
    if type(value) is not int or not low <= value <= high:
        raise HnkitError(f"{path}: {key} must be a whole number from {low} to {high}, got {shown(value)}")
    return value


def read_position(folder: Path, state: dict, config, num_processes: int, examples: int) -> tuple[int, int, int]:
    """A checkpoint's ``(step, epoch, offset)`` from its trainer ``state``, each checked against what
    the run allows: the step is the one in the folder's name and within the run's and this resume's
    ``max_steps`` (``config``, a TrainConfig), each micro-batch starts at most one epoch, the offset
    lies in the ``examples`` of the training set. Refused when saved by another number of processes
    (the data order would change)."""
    path = folder / TRAINER_STATE
    processes = _count({"num_processes": 1, **state}, "num_processes", path, low=1)
    step = _count(state, "step", path)
    named = re.fullmatch(r"step-(\d+)", folder.name)
    if named and int(named[1]) != step:
        raise HnkitError(f"{path}: step {shown(step)} does not match the checkpoint's name {folder.name}")
    run_max = (recorded_options(state, folder) or {}).get("max_steps")
    if type(run_max) is int and step > run_max:
        raise HnkitError(f"{path}: step {step} is beyond the run's max_steps {run_max}")
    if step > config.max_steps:
        raise HnkitError(f"--max-steps {config.max_steps} is below step {step} of {folder}; "
                         f"resume with --max-steps {step} or more")
    epoch = _count(state, "epoch", path, high=min(step * config.grad_accum, COUNT_LIMIT))
    offset = _count(state, "offset", path, high=examples)
    if processes != num_processes:
        raise HnkitError(f"{folder}: saved with {processes} processes, resumed with {num_processes}; "
                         "the data order would change")
    return step, epoch, offset


METRIC_NUMBERS = ("loss", "lr", "epoch", "val_loss", "val_ppl")  # what the trainer logs besides the step


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``; one line naming it and the line if a row is damaged.
    Only the last line may be cut off (a run killed mid-write): it is dropped."""
    lines = path.read_bytes().decode(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            problem = "not JSON"
        except RecursionError:
            problem = "nested too deeply"
        else:
            problem = _metrics_problem(row)
        if problem:
            raise HnkitError(f"{path}: line {number}: {problem}; fix or delete that line to resume")
        rows.append(row)
    return rows


def _metrics_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    if type(row.get("step")) is not int or row["step"] < 0:
        return f"step must be a whole number of 0 or more, got {shown(row.get('step'))}"
    for key in METRIC_NUMBERS:
        if key in row and type(row[key]) not in (int, float):
            return f"{key} must be a number, got {shown(row[key])}"
    return None


class Metrics:
    """The run's metrics rows: kept in memory, appended to ``metrics.jsonl`` as they come (one JSON
    object a line) and to TensorBoard when ``tensorboard``, and drawn as ``loss.png`` at the end.
    ``acc`` is the run's accelerate Accelerator: only its main process writes; iterating a Metrics
    gives its rows."""

    def __init__(self, output: Path, acc, tensorboard: bool = False):
        self.path, self.acc, self.tensorboard = Path(output) / "metrics.jsonl", acc, tensorboard
        self.rows: list[dict] = []

    def __iter__(self):
        return iter(self.rows)

    def add(self, row: dict) -> None:
        if not self.acc.is_main_process:
            return
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def load(self, step: int) -> None:
        """On resume: keep the rows up to ``step``; later rows belong to the run being replaced."""
        found = self.path.exists()
        if found:  # read by every process, so that a damaged file stops them all
            self.rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.acc.wait_for_everyone()  # outside the if: processes that disagree still meet here
        if found and self.acc.is_main_process:
            text = "".join(json.dumps(r) + "\n" for r in self.rows)
            atomic_write(self.path, lambda f: f.write(text.encode()))

    def clear(self) -> None:
        """A run from step 0: no rows, and no file left by an earlier run."""
        self.rows = []
        self.path.unlink(missing_ok=True)

    def plot(self, title: str) -> None:
        """``loss.png`` beside the metrics file: training and validation loss by step."""
        from .plot import line_plot

        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        if train:
            line_plot({"train loss": train, "validation loss": val}, self.path.with_name("loss.png"), title=title)


DAMAGED = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError)  # a state that does not fit


def training_state(optimizer, scheduler, scaler) -> dict:
    """What :data:`TRAINING_STATE` holds: the optimizer's, the scheduler's and the grad scaler's state
    (None without a scaler)."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None}


def set_training_state(training: dict, path: Path, optimizer, scheduler, scaler) -> None:
    """Put back what :func:`training_state` saved (read from ``path``): one line naming it if damaged."""
    try:
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(training["scaler"])
    except DAMAGED as exc:
        raise HnkitError(f"{path}: damaged training state ({type(exc).__name__}: {first_line(exc)})") from None


def write_trainer_state(folder: Path, state: dict) -> None:
    """A checkpoint's last file, :data:`TRAINER_STATE` (read back by :func:`read_trainer_state`)."""
    atomic_write(folder / TRAINER_STATE, lambda f: f.write(json.dumps(state, indent=1).encode()))


def rng_state() -> dict:
    """Every random generator training draws from, as tensors and numbers only (loadable with
    weights_only=True): the CPU's and each GPU's torch generator, and Python's."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict, path: Path) -> None:
    """Put back what :func:`rng_state` saved (read from ``path``): one line naming it if damaged."""
    try:
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
    except DAMAGED as exc:
        raise HnkitError(f"{path}: damaged random state ({type(exc).__name__}: {first_line(exc)})") from None


def read_state(path: Path, kind: type):
    """A checkpoint's state file, never unpickling code: one line naming the file if it is missing,
    damaged or not what it should be."""
    if not path.is_file():
        raise HnkitError(f"{path}: missing from the checkpoint")
    try:
        data = load_plain(path)
    except HnkitError:  # a bounded loader's refusal already names the file
        raise
    except Exception as exc:  # an unpickler refusal, a cut-off zip, noise: all mean a damaged file
        raise HnkitError(f"{path}: damaged or not plain tensors and numbers ({first_line(exc)})") from None
    if not isinstance(data, kind):
        raise HnkitError(f"{path}: holds a {type(data).__name__}, expected a {kind.__name__}")
    return data


def write_error(output: Path, exc: Exception, where: Path) -> HnkitError:
    """A failed checkpoint write as one line; a full disk is said so, whatever library raised it."""
    kept = complete_checkpoints(output)
    last = f"the last complete checkpoint is {kept[-1]}" if kept else "no complete checkpoint exists yet"
    full = getattr(exc, "errno", None) == errno.ENOSPC or shutil.disk_usage(output).free < 1 << 20
    reason = "no space left on device" if full else f"{type(exc).__name__}: {first_line(exc)}"
    return HnkitError(f"{reason} while writing {where.parent / where.name.strip('.').removesuffix('.tmp')}; {last}")


def existing_run(output: Path, name: str) -> str | None:
    """What in ``output`` a fresh run would overwrite: a complete checkpoint or a final network."""
    output = Path(output)
    if complete_checkpoints(output):
        return "already holds a training run"
    if (output / f"{name}.safetensors").exists():
        return f"already holds a trained network ({name}.safetensors)"
    return None


def refuse_existing_run(output: Path, name: str) -> None:
    """One line if a fresh run would overwrite a run in ``output`` (the caller decides about --force)."""
    found = existing_run(output, name)
    if found:
        raise HnkitError(f"{output}: {found}; continue it with --resume {output}, choose another --output, "
                         "or start over with --force")


class OutputLock:
    """An exclusive lock on an output folder for the life of a run: a second run into the same
    folder is refused at once. ``flock`` locks die with their process, so a killed run leaves no
    stale lock; the file keeps the holder's pid for the message."""

    def __init__(self, output: Path):
        import fcntl

        self.path = Path(output) / ".hnkit.lock"
        try:
            Path(output).mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as exc:
            raise HnkitError(f"--output {output}: {exc.strerror}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise HnkitError(f"{output}: another run (pid {holder}) is writing to this folder; "
                             "wait for it or choose another --output") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing the file releases the lock


def finite_weights(path: Path) -> bool:
    from safetensors.torch import load_file

    try:
        return all(torch.isfinite(t).all() for t in load_file(str(path)).values())
    except (OSError, RuntimeError, ValueError):
        return False
