"""What a training run is set up with: its options (``TrainConfig``), the record of them a
checkpoint keeps so that a resume cannot change what the run computes, the learning rate at each
step (a number with a warm-up and a schedule, or the web UI's step string) and the optimizer.
:class:`hnkit.trainer.Trainer` runs the loop with them."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .errors import HnkitError, shown


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


# -- the record of a run's options --------------------------------------------------------------
# Options that change how long a run goes or what it shows, never the weights it computes: they
# may differ on --resume (gradient checkpointing and the latent cache give the same numbers bit for
# bit). Every other recorded option must stay the same; NOT_RECORDED ones are not the run's.
MAY_CHANGE = {"name", "max_steps", "save_every", "keep_last", "eval_every", "eval_batches",
              "sample_every", "sample_prompts", "sample_tokens", "sample_steps", "sample_guidance", "log_every",
              "tensorboard", "gradient_checkpointing", "save_pt", "disk_cache"}
NOT_RECORDED = {"output_dir", "output", "force", "resume", "config"}
# Paths (recorded resolved when they exist here) and their content, recorded beside them (key ->
# option, what it is): the content decides whether a resume may go on, never the path (a folder
# moved, copied or remounted is the same data; a different path is a note).
IDENTITIES = {"data_tokens": ("data", "its text"), "preserve_data_tokens": ("preserve_data", "its text"),
              "data_images": ("data", "its content (image names and sizes, captions)"),
              "template_lines": ("template", "its template text"),
              "model_config": ("model", "its config.json"),
              "init_sha256": ("init", "its content (the style the run started from)")}
PATHS = {option for option, _ in IDENTITIES.values()}
MODEL_CONFIGS = ("config.json", "model_index.json", "unet/config.json")  # what identifies a local model


def config_options(config: TrainConfig) -> dict:
    """The trainer's options as a checkpoint records them."""
    return {k: v for k, v in asdict(config).items() if k not in NOT_RECORDED}


def task_options(opts: dict) -> dict:
    """A command's options (``opts``: name -> value) beyond the trainer's, as a checkpoint records
    them: local paths resolved, a local model with the sha256 of its config. The data's content is
    added by the command once it is read (``data_tokens``, ``data_images``, ...: :data:`IDENTITIES`)."""
    trainer = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in opts.items():
        if key in trainer or key in NOT_RECORDED:
            continue
        local = isinstance(value, str) and key in PATHS and Path(value).exists()
        out[key] = str(Path(value).resolve()) if local else value
        if key == "model":
            out["model_config"] = model_fingerprint(Path(value)) if local else None
    return out


def model_fingerprint(path: Path) -> str:
    """sha256 of a local model folder's configuration files (``MODEL_CONFIGS``, those it has)."""
    h = hashlib.sha256()
    for name in MODEL_CONFIGS:
        if (path / name).is_file():
            h.update(f"{name}|{(path / name).stat().st_size}|".encode())
            h.update((path / name).read_bytes())
    return h.hexdigest()


def check_resume(resume, options: dict) -> list[str]:
    """Refuse a resume from ``resume`` (a checkpoint or output folder) whose checkpoint records
    other values for ``options``: the options known so far. The commands call it before loading the
    model, and again as soon as the data's content is known, so a changed option costs nothing; the
    trainer calls it once more when it resumes, and prints the notes it returns."""
    from .run_folder import checkpoint_to_resume, read_trainer_state, recorded_options

    folder = checkpoint_to_resume(Path(resume))
    recorded = recorded_options(read_trainer_state(folder), folder)
    return [] if recorded is None else check_same_run(recorded, options, folder)


def check_same_run(recorded: dict, current: dict, where: Path) -> list[str]:
    """Refuse a resume whose options (``current``) change what the run recorded in checkpoint
    ``where`` computes; the notes to print for options that may change. Options only one side
    records (another hnkit version's, or data not read yet) are not compared."""
    notes = []
    for key, now in current.items():
        if key not in recorded or recorded[key] == now:
            continue
        was, flag = recorded[key], "--" + key.replace("_", "-")
        if key in IDENTITIES:
            _refuse_content(key, recorded, current, where)
        elif key in PATHS and None not in (now, was):  # another path: its content decides
            identity = next((k for k, (option, _) in IDENTITIES.items() if option == key and k in current), None)
            if identity is None:
                continue  # compared once the command has read it
            if identity not in recorded:
                _refuse(flag, now, was, where)
            if recorded[identity] == current[identity]:
                notes.append(f"{flag} {now} is not the run's path {was}; {IDENTITIES[identity][1]} is the same")
        elif key == "max_steps":
            notes.append(_max_steps_note(now, _value(flag, was), current))
        elif key not in MAY_CHANGE:
            _refuse(flag, now, was, where)
    return notes


def _refuse(flag: str, now, was, where: Path):
    raise HnkitError(f"{_with_flag(flag, now)} differs from the run's {_value(flag, was)} in {where}; "
                     "resume with the same value or start over with --force")


def _refuse_content(key: str, recorded: dict, current: dict, where: Path):
    option, what = IDENTITIES[key]
    flag, now, was = "--" + option.replace("_", "-"), current.get(option), recorded.get(option)
    if None in (current[key], recorded[key]):  # a hub model against a local one
        _refuse(flag, now, was, where)
    raise HnkitError(f"{flag} {_value(flag, now)}: {what} differs from the run's ({_value(flag, was)}) in {where}; "
                     "resume with what the run was trained on or start over with --force")


def _max_steps_note(now: int, was: str, current: dict) -> str:
    note = f"--max-steps {now} differs from the run's {was}: training continues to step {now}"
    if current.get("lr_schedule") != "constant" and not isinstance(current.get("lr"), str):
        note += f"; the {current['lr_schedule']} learning-rate schedule now spans {now} steps"
    return note


def _value(flag: str, value) -> str:
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if value is None:
        return "none"
    if isinstance(value, list) and all(type(x) in (int, float) for x in value):
        return ",".join(f"{x:g}" for x in value)
    return value if isinstance(value, str) and len(value) <= 200 and value.isprintable() else shown(value)


def _with_flag(flag: str, value) -> str:
    return _value(flag, value) if isinstance(value, bool) else f"{flag} {_value(flag, value)}"


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
