"""A training run's output folder: which checkpoints in it are complete, how a checkpoint is
removed without ever leaving a partial one under its real name, what killed runs leave behind and
how it is tidied, whether a fresh run would overwrite anything, and the lock that keeps one run per
folder. The trainer (:mod:`hnkit.trainer`) writes checkpoints; this file only reads and tidies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .errors import HnkitError


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


def existing_run(output: Path, name: str) -> str | None:
    """What in ``output`` a fresh run would overwrite: a complete checkpoint or a final network."""
    output = Path(output)
    if complete_checkpoints(output):
        return "already holds a training run"
    if (output / f"{name}.safetensors").exists():
        return f"already holds a trained network ({name}.safetensors)"
    return None


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
