"""A run's output folder survives kills, full disks and a second run: every checkpoint under a real
name is whole, leftovers are tidied, a fresh run never overwrites a run by accident, and errors are
one line (issue 16)."""

import errno
import json
import os
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from hnkit.commands.cli import main
from hnkit.run_folder import OutputLock, clean_leftovers, complete_checkpoints
from hnkit.util import atomic_write
from test_train_text import assert_same, rows, start_training, train_args


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_folder_without_a_complete_checkpoint_starts_over(tiny_lm, tmp_path):
    out = tmp_path / "run"
    half_written = out / "checkpoints" / ".step-0000004.tmp"  # killed inside the first checkpoint write
    half_written.mkdir(parents=True)
    (half_written / "model.safetensors").write_bytes(b"cut")
    (out / "checkpoints" / "step-0000002").mkdir()  # a real name without its last file
    (out / ".hypernetwork.safetensors.x1y2.tmp").write_bytes(b"stale")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "lo')
    assert main(train_args(tiny_lm, out, "--max-steps", 2)) == 0
    assert names(out / "checkpoints") == ["step-0000002"]
    assert complete_checkpoints(out) == [out / "checkpoints" / "step-0000002"]
    assert [r["step"] for r in rows(out)] == [1, 2] and all(r["loss"] != 99.0 for r in rows(out))
    assert not list(out.glob(".*.tmp"))


def test_an_interrupted_prune_and_a_cut_metrics_line_do_not_stop_an_exact_resume(tiny_lm, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args(tiny_lm, straight, "--max-steps", 6, "--save-every", 2, "--keep-last", 5)) == 0
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000004")
    deleting = out / "checkpoints" / ".step-0000002.4242.del"  # killed while pruning step 2
    shutil.copytree(straight / "checkpoints" / "step-0000002", deleting)
    (deleting / "trainer_state.json").unlink()
    lines = (straight / "metrics.jsonl").read_text().splitlines()[:4]
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed mid-line
    assert main(train_args(tiny_lm, out, "--max-steps", 6, "--save-every", 2, "--resume", out)) == 0
    assert_same(load_file(str(straight / "hypernetwork.safetensors")), load_file(str(out / "hypernetwork.safetensors")))
    assert names(out / "checkpoints") == ["step-0000004", "step-0000006"]
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]


def test_saving_a_step_again_keeps_a_whole_checkpoint_at_every_moment(tiny_lm, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, "--max-steps", 2, "--keep-last", 1)) == 0
    before = load_file(str(out / "checkpoints" / "step-0000002" / "hypernetwork.safetensors"))
    # resumed at its last step: nothing to train, and the same step is saved again
    assert main(train_args(tiny_lm, out, "--max-steps", 2, "--keep-last", 1, "--resume", out)) == 0
    assert names(out / "checkpoints") == ["step-0000002"]
    assert_same(before, load_file(str(out / "checkpoints" / "step-0000002" / "hypernetwork.safetensors")))
    # killed between the two renames of a re-save: the whole copy comes back at the next start
    os.replace(out / "checkpoints" / "step-0000002", out / "checkpoints" / ".step-0000002.old")
    clean_leftovers(out)
    assert complete_checkpoints(out) == [out / "checkpoints" / "step-0000002"]
    assert names(out / "checkpoints") == ["step-0000002"]


def test_sigterm_stops_after_the_step_and_saves_like_ctrl_c(tiny_lm, tmp_path):
    out = tmp_path / "run"
    proc = start_training(tiny_lm, out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGTERM: stopping after this step" in stdout and "interrupted at step" in stdout
    assert "Traceback" not in stderr and len(complete_checkpoints(out)) == 1


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(tiny_lm, tmp_path, monkeypatch, capsys):
    from hnkit import trainer as trainer_mod

    real_save = trainer_mod.save

    def save(hn, path, *args, **kwargs):
        if hn.step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(hn, path, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "save", save)
    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, "--max-steps", 6, "--save-every", 2)) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "step-0000004" in err, err
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'step-0000002'}" in err and err.count("\n") == 1
    assert names(out / "checkpoints") == ["step-0000002"]


def test_the_last_good_checkpoint_named_after_a_nan_has_finite_weights(tiny_lm, tmp_path, capsys):
    """A run resumed from step 2 with weights that overflow stops at its first step; the newer
    checkpoint whose weights are NaN is not the one it names."""
    from safetensors import safe_open

    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, "--max-steps", 4, "--save-every", 2, "--keep-last", 5)) == 0
    for step, value in ((2, 1e38), (4, float("nan"))):
        path = out / "checkpoints" / f"step-{step:07d}" / "hypernetwork.safetensors"
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        save_file({k: torch.full_like(t, value) for k, t in load_file(str(path)).items()}, str(path), metadata)
    capsys.readouterr()
    step2 = out / "checkpoints" / "step-0000002"
    assert main(train_args(tiny_lm, out, "--max-steps", 4, "--resume", step2)) == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "at step 3: training stopped" in err and err.count("\n") == 1, err
    assert err.endswith(f"the last good checkpoint is {step2} (try a lower --lr or --precision fp32)\n"), err
    assert names(out / "checkpoints") == ["step-0000002", "step-0000004"]  # nothing saved over them


def test_a_second_run_into_the_same_folder_is_refused(tiny_lm, tmp_path, capsys):
    out = tmp_path / "run"
    lock = OutputLock(out)  # another run holds the folder
    try:
        assert main(train_args(tiny_lm, out, "--max-steps", 1)) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert f"another run (pid {os.getpid()}) is writing to this folder" in err and err.count("\n") == 1
    assert not (out / "checkpoints").exists()
    assert main(train_args(tiny_lm, out, "--max-steps", 1)) == 0  # a dead holder's lock is gone


def test_a_finished_network_is_never_trained_over_without_force(tiny_lm, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, "--max-steps", 1)) == 0
    shutil.rmtree(out / "checkpoints")
    first = load_file(str(out / "hypernetwork.safetensors"))
    assert main(train_args(tiny_lm, out, "--max-steps", 2)) == 2
    assert "already holds a trained network (hypernetwork.safetensors)" in capsys.readouterr().err
    assert_same(first, load_file(str(out / "hypernetwork.safetensors")))
    assert main(train_args(tiny_lm, out, "--max-steps", 2, "--force")) == 0
    assert [r["step"] for r in rows(out)] == [1, 2] and names(out / "checkpoints") == ["step-0000002"]


def test_an_output_that_is_a_file_is_one_line(tiny_lm, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for output in (taken, taken / "sub"):
        assert main(train_args(tiny_lm, output, "--max-steps", 1)) == 2
        err = capsys.readouterr().err
        assert "is a file, expected a folder" in err and err.count("\n") == 1
    assert taken.read_text() == "not a folder"


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "shared", lambda f: f.write(b"x"))
        os.umask(0o077)
        atomic_write(tmp_path / "private", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


def _damage(folder, how):
    state = folder / "trainer_state.json"
    if how == "rng missing":
        (folder / "rng_state_0.pt").unlink()
    elif how == "rng noise":
        (folder / "rng_state_0.pt").write_bytes(os.urandom(300))
    elif how == "rng cut":
        data = (folder / "rng_state_0.pt").read_bytes()
        (folder / "rng_state_0.pt").write_bytes(data[: len(data) // 2])
    elif how == "optimizer pickle":
        torch.save({"optimizer": _RunsCode()}, folder / "training_state.pt")
    elif how == "optimizer cut":
        data = (folder / "training_state.pt").read_bytes()
        (folder / "training_state.pt").write_bytes(data[: len(data) // 2])
    elif how == "optimizer wrong":
        torch.save({"optimizer": {"state": 3}}, folder / "training_state.pt")
    elif how == "weights cut":
        data = (folder / "hypernetwork.safetensors").read_bytes()
        (folder / "hypernetwork.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "state types":
        state.write_text(json.dumps({**json.loads(state.read_text()), "step": "2"}))
    elif how == "state list":
        state.write_text("[1, 2]")
    return {"rng": "rng_state_0.pt", "optimizer": "training_state.pt", "weights": "hypernetwork.safetensors",
            "state": "trainer_state.json"}[how.split()[0]]


DAMAGES = ["rng missing", "rng noise", "rng cut", "optimizer pickle", "optimizer cut", "optimizer wrong",
           "weights cut", "state types", "state list"]


def test_every_damaged_resume_file_is_one_line_naming_it_and_nothing_is_overwritten(tiny_lm, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good"
    assert main(train_args(tiny_lm, good, "--max-steps", 2)) == 0
    for how in DAMAGES:
        out = tmp_path / how.replace(" ", "-")
        shutil.copytree(good, out)
        checkpoint = out / "checkpoints" / "step-0000002"
        name = _damage(checkpoint, how)
        before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
        assert main(train_args(tiny_lm, out, "--max-steps", 4, "--resume", out)) == 2, how
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err and "Traceback" not in err, (how, err)
        assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before, how
        assert not (tmp_path / "ran-code").exists()


def test_a_second_ctrl_c_right_after_the_first_still_exits_cleanly(tiny_lm, tmp_path):
    out = tmp_path / "run"
    proc = start_training(tiny_lm, out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.15)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "Traceback" not in stderr
    assert all((c / "trainer_state.json").exists() for c in (out / "checkpoints").glob("step-*"))


class _Acc:
    """The few parts of an accelerate Accelerator that Metrics uses, recording what it is asked."""

    def __init__(self, main=True):
        self.is_main_process, self.logged, self.waits = main, [], 0

    def wait_for_everyone(self):
        self.waits += 1

    def log(self, values, step):
        self.logged.append((step, values))


def test_metrics_keep_write_and_mirror_rows_from_the_main_process_only(tmp_path):
    from hnkit.run_folder import Metrics

    acc = _Acc()
    metrics = Metrics(tmp_path / "run", acc, tensorboard=True)
    metrics.add({"step": 1, "loss": 2.5, "lr": 0.1})
    metrics.add({"step": 1, "val_loss": 2.0})
    assert list(metrics) == [{"step": 1, "loss": 2.5, "lr": 0.1}, {"step": 1, "val_loss": 2.0}]
    assert rows(tmp_path / "run") == list(metrics)
    assert acc.logged == [(1, {"loss": 2.5, "lr": 0.1}), (1, {"val_loss": 2.0})]
    other = Metrics(tmp_path / "other", _Acc(main=False), tensorboard=True)
    other.add({"step": 1, "loss": 2.5})
    assert list(other) == [] and not (tmp_path / "other").exists()


def test_metrics_load_keeps_the_rows_up_to_the_resumed_step_and_refuses_a_damaged_line(tmp_path):
    from hnkit.errors import HnkitError
    from hnkit.run_folder import Metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    acc = _Acc()
    metrics = Metrics(tmp_path, acc)
    metrics.load(2)
    assert [r["step"] for r in metrics] == [1, 2] and [r["step"] for r in rows(tmp_path)] == [1, 2]
    assert acc.waits == 1  # every process meets once, found or not
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": "low"}\n{"step": 3, "loss": 1.0}\n')
    before = path.read_bytes()
    with pytest.raises(HnkitError) as refused:
        Metrics(tmp_path, _Acc(main=False)).load(3)
    assert str(refused.value).startswith(f"{path}: line 2: loss must be a number") and "\n" not in str(refused.value)
    assert path.read_bytes() == before
    empty = Metrics(tmp_path / "none", _Acc())
    empty.load(3)
    assert list(empty) == [] and not (tmp_path / "none").exists()


def test_metrics_plot_draws_the_loss_only_when_there_is_a_training_loss(tmp_path):
    from hnkit.run_folder import Metrics

    metrics = Metrics(tmp_path, _Acc())
    metrics.add({"step": 0, "val_loss": 3.0})
    metrics.plot("run: loss by step")
    assert not (tmp_path / "loss.png").exists()
    for step in (1, 2, 3):
        metrics.add({"step": step, "loss": 3.0 - step / 2})
    metrics.plot("run: loss by step")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    metrics.clear()
    assert list(metrics) == [] and not (tmp_path / "metrics.jsonl").exists()
