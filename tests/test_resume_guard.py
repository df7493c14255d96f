"""`--resume` is safe against damaged state and changed options (issue 24): a damaged
``metrics.jsonl`` or ``trainer_state.json`` is one line naming the file, a resume that changes what
the run computes is refused naming the option and both values, options that only change how long
or how visibly it runs may change, and a checkpoint without a record of its options still resumes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hnkit.commands.cli import main
from conftest import with_option
from test_train_text import train_args

STEP2 = "checkpoints/step-0000002"


@pytest.fixture(scope="module")
def straight(tiny_lm, tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6, on its own copy of the corpus."""
    root = tmp_path_factory.mktemp("straight")
    corpus = root / "corpus.txt"
    shutil.copy2(tiny_lm["corpus"], corpus)
    out = root / "run"
    lm = {**tiny_lm, "corpus": corpus}
    assert main(train_args(lm, out, "--max-steps", 6, "--save-every", 2, "--keep-last", 5)) == 0
    return {"lm": lm, "out": out}


def resumable(straight, tmp_path, step="0000002"):
    """A fresh output folder holding the straight run's checkpoint ``step`` and its metrics up to it."""
    out = tmp_path / "resumed"
    shutil.copytree(straight["out"] / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
    lines = (straight["out"] / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= int(step)))
    return out


def resume_args(straight, out, *extra):
    return train_args(straight["lm"], out, "--max-steps", 6, "--save-every", 2, *extra, "--resume", out)


def snapshot(out):
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".hnkit.lock"]
    return {p.relative_to(out): p.read_bytes() for p in files}


def assert_refused(args, out, capsys, *needles):
    """Exit 2, one line on stderr holding every needle, nothing in ``out`` changed or added."""
    before = snapshot(out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    assert snapshot(out) == before
    return err


def set_state(out, **fields):
    path = out / STEP2 / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return path


# -- damaged state ------------------------------------------------------------------------------
@pytest.mark.parametrize("step", ['"x"', "1.5", "true", "-1", "[" * 100_000 + "]" * 100_000],
                         ids=["text", "fraction", "bool", "negative", "nested"])
def test_a_metrics_row_with_a_bad_step_is_one_line(straight, tmp_path, capsys, step):
    out = resumable(straight, tmp_path)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(f'{lines[0]}\n{{"step": {step}, "loss": 1.0}}\n{lines[1]}\n')
    assert_refused(resume_args(straight, out), out, capsys, metrics, "line 2")


def test_a_metrics_row_with_a_text_loss_is_one_line(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path)
    metrics = out / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": "low"}\n' + metrics.read_text())
    assert_refused(resume_args(straight, out), out, capsys, metrics, "line 1", "loss")


def test_garbage_before_the_last_metrics_line_is_one_line(straight, tmp_path, capsys):
    """Only the last line can be cut by a kill; a broken line before it is damage."""
    out = resumable(straight, tmp_path)
    metrics = out / "metrics.jsonl"
    metrics.write_text('{"step": 1, "lo\n' + metrics.read_text())
    assert_refused(resume_args(straight, out), out, capsys, metrics, "line 1")


def test_a_huge_epoch_is_one_line(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path)
    path = set_state(out, epoch=10 ** 30)
    assert_refused(resume_args(straight, out), out, capsys, path, "epoch")


def test_a_step_beyond_the_checkpoint_name_is_one_line_and_trains_nothing(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path)
    path = set_state(out, step=10 ** 30)
    assert_refused(resume_args(straight, out), out, capsys, path, "step")
    assert not (out / "hypernetwork.safetensors").exists()


def test_a_step_beyond_the_runs_max_steps_is_one_line(straight, tmp_path, capsys):
    out = tmp_path / "renamed"
    shutil.copytree(straight["out"] / STEP2, out / "checkpoints" / "step-0000009")  # name and step agree
    path = out / "checkpoints" / "step-0000009" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "step": 9}))
    assert_refused(resume_args(straight, out, "--max-steps", 20), out, capsys, path, "max_steps 6")


@pytest.mark.parametrize("field, value", [("offset", 10 ** 9), ("offset", -4), ("num_processes", 0),
                                          ("num_processes", "1"), ("options", [1]), ("step", 3)])
def test_other_bad_trainer_state_fields_are_one_line(straight, tmp_path, capsys, field, value):
    out = resumable(straight, tmp_path)
    path = set_state(out, **{field: value})
    assert_refused(resume_args(straight, out), out, capsys, path, field)


def test_deeply_nested_trainer_state_is_one_line(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path)
    path = out / STEP2 / "trainer_state.json"
    path.write_text('{"step": 2, "epoch": 0, "offset": 8, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_refused(resume_args(straight, out), out, capsys, path, "nested")


CHILD = r"""
import json, resource, sys
import transformers, accelerate, hnkit.trainer, hnkit.text  # what a resume imports, loaded before measuring
from hnkit.commands.cli import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
code = main(json.loads(sys.argv[1]))
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_an_oversized_trainer_state_is_refused_without_reading_it(straight, tmp_path):
    """Measured in a child process: this one's peak was raised by the tests before it."""
    out = resumable(straight, tmp_path)
    path = out / STEP2 / "trainer_state.json"
    with open(path, "r+b") as f:
        f.truncate(1 << 30)  # a sparse GiB: reading it whole would show in the peak RSS
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(resume_args(straight, out))], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    code, growth_kib = map(int, run.stdout.split()[-2:])
    assert code == 2 and growth_kib < 200 * 1024, (code, growth_kib)
    err = run.stderr.splitlines()[-1]
    assert str(path) in err and "larger than" in err, run.stderr


def test_resuming_with_max_steps_below_the_checkpoint_is_one_line(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path, "0000004")
    assert_refused(resume_args(straight, out, "--max-steps", 3), out, capsys, "--max-steps 3", "step 4")


# -- changed options ----------------------------------------------------------------------------
def other_corpus(straight, tmp_path):
    path = tmp_path / "other.txt"
    path.write_text("\n".join(reversed(straight["lm"]["corpus"].read_text().splitlines())))
    return path


CHANGES = {  # flag -> (new value, or a function of (straight, tmp_path) giving it; the run's value shown)
    "--data": (other_corpus, "corpus.txt"),
    "--preserve-data": (other_corpus, "the run's none"),
    "--lr": ("1e-3", "0.003"),
    "--seed": (1, 0),
    "--batch-size": (2, 4),
    "--block-size": (16, 32),
    "--grad-accum": (2, 1),
    "--lr-schedule": ("cosine", "constant"),
    "--warmup-steps": (3, 0),
    "--weight-decay": (0.1, 0.0),
    "--val-fraction": (0.2, 0.05),
    "--text-field": ("body", "text"),
    "--layer-structure": ("1,2,1", "1,0.125,1"),
    "--activation": ("tanh", "relu"),
    "--no-per-site": (None, "--per-site"),
}


@pytest.mark.parametrize("flag", list(CHANGES))
def test_a_resume_that_changes_what_the_run_computes_is_refused(straight, tmp_path, capsys, flag):
    out = resumable(straight, tmp_path)
    value, was = CHANGES[flag]
    if callable(value):
        value = value(straight, tmp_path)
    args = resume_args(straight, out)
    args = args + [flag] if value is None else with_option(args, flag, value)
    err = assert_refused(args, out, capsys, flag, was, out / STEP2, "--force")
    assert "differs from the run's" in err


def test_data_changed_in_place_is_refused(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path)
    corpus = straight["lm"]["corpus"]
    text = corpus.read_text()
    try:
        corpus.write_text(text.replace("the", "a"))
        err = assert_refused(resume_args(straight, out), out, capsys, f"--data {corpus}: its text differs", "--force")
        assert "the run's (" in err
    finally:
        corpus.write_text(text)


class Spy:
    """Counts the calls of a hnkit function (then runs it)."""

    def __init__(self, monkeypatch, module, name):
        self.calls, self.function = 0, getattr(module, name)
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.mark.parametrize("flag", [f for f in CHANGES if f != "--data"])
def test_a_changed_option_is_refused_before_the_model_is_loaded(straight, tmp_path, capsys, monkeypatch, flag):
    import hnkit.text

    out = resumable(straight, tmp_path)
    value = CHANGES[flag][0]
    value = value(straight, tmp_path) if callable(value) else value
    args = resume_args(straight, out)
    loads = Spy(monkeypatch, hnkit.text, "load_causal_lm")
    assert main(args + [flag] if value is None else with_option(args, flag, value)) == 2
    assert loads.calls == 0 and "differs from the run's" in capsys.readouterr().err


def test_other_data_is_refused_right_after_it_is_tokenized(straight, tmp_path, capsys, monkeypatch):
    import hnkit.text

    out = resumable(straight, tmp_path)
    splits = Spy(monkeypatch, hnkit.text, "split_blocks")
    assert main(with_option(resume_args(straight, out), "--data", other_corpus(straight, tmp_path))) == 2
    assert splits.calls == 0 and "its text differs" in capsys.readouterr().err


def test_other_preserve_data_is_refused_before_the_teacher_is_computed(straight, tmp_path, capsys, monkeypatch):
    import hnkit.preserve

    out, neutral = tmp_path / "run", tmp_path / "neutral.txt"
    neutral.write_text("The weather was mild and the trains ran on time. " * 200)
    args = train_args(straight["lm"], out, "--max-steps", 2, "--preserve-data", neutral)
    assert main(args) == 0
    teachers = Spy(monkeypatch, hnkit.preserve, "Teacher")
    resume = with_option(args + ["--resume", str(out)], "--max-steps", 4)
    assert_refused(with_option(resume, "--preserve-data", other_corpus(straight, tmp_path)), out, capsys,
                   "--preserve-data", "its text differs")
    assert teachers.calls == 0
    err = assert_refused(with_option(resume, "--preserve-weight", 1.0), out, capsys, "--preserve-weight", "0.3")
    assert "differs from the run's" in err and teachers.calls == 0


# -- the same data elsewhere ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_folder(tiny_lm, tmp_path_factory):
    """A 6-step run on a folder of two .txt files, with checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("folder_run")
    text = tiny_lm["corpus"].read_text()
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text(text[:len(text) // 2])
    (root / "data" / "b.txt").write_text(text[len(text) // 2:])
    lm = {**tiny_lm, "corpus": root / "data"}
    out = root / "run"
    assert main(train_args(lm, out, "--max-steps", 6, "--save-every", 2, "--keep-last", 5)) == 0
    return {"lm": lm, "out": out}


def resume_with_data(straight, tmp_path, data, capsys):
    """Resume the folder run from step 2 with ``data``: the notes printed, and whether the result
    is the straight run's bit for bit."""
    out = resumable(straight, tmp_path)
    capsys.readouterr()
    assert main(with_option(resume_args(straight, out), "--data", data)) == 0
    printed = capsys.readouterr().out
    expected = load_file(str(straight["out"] / "hypernetwork.safetensors"))
    got = load_file(str(out / "hypernetwork.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    return [line for line in printed.splitlines() if line.startswith("hnkit: note")]


def test_a_moved_data_folder_resumes_exactly_with_a_note(straight_folder, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(straight_folder["lm"]["corpus"], moved, copy_function=shutil.copy)  # new file times
    notes = resume_with_data(straight_folder, tmp_path, moved, capsys)
    assert notes == [f"hnkit: note: --data {moved} is not the run's path {straight_folder['lm']['corpus']}; "
                     "its text is the same"], notes


def test_touched_data_and_an_added_readme_resume_exactly(straight_folder, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(straight_folder["lm"]["corpus"], data)
    (data / "README.md").write_text("where this text comes from\n")  # only .txt files are read
    os.utime(data / "a.txt")
    notes = resume_with_data(straight_folder, tmp_path, data, capsys)
    assert len(notes) == 1 and "its text is the same" in notes[0]


def test_an_added_hidden_text_file_is_refused(straight_folder, tmp_path, capsys):
    """Hidden .txt files are read, so they are part of the text."""
    data = tmp_path / "data"
    shutil.copytree(straight_folder["lm"]["corpus"], data)
    (data / ".notes.txt").write_text("a hidden file that is trained on too\n")
    out = resumable(straight_folder, tmp_path)
    assert_refused(with_option(resume_args(straight_folder, out), "--data", data), out, capsys,
                   f"--data {data}: its text differs", "--force")


def test_a_moved_model_is_a_note_and_a_changed_config_is_refused(straight, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(straight["lm"]["model"], model)
    out = resumable(straight, tmp_path)
    assert main(with_option(resume_args(straight, out), "--model", model)) == 0
    assert f"--model {model} is not the run's path" in capsys.readouterr().out
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "initializer_range": 0.5}))
    out = resumable(straight, tmp_path / "again")
    assert_refused(with_option(resume_args(straight, out), "--model", model), out, capsys,
                   f"--model {model}: its config.json differs", "--force")


def test_each_of_two_processes_stops_on_a_damaged_metrics_file(tiny_lm, tmp_path):
    """Every process reads metrics.jsonl on resume, so a damaged one stops each of them with the
    line naming it, and none waits for the others forever."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"

    def launch(*extra):  # with no GPU, accelerate runs DDP over gloo on the CPU
        args = with_option(train_args(tiny_lm, out, *extra), "--batch-size", 2)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hnkit", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert launch("--max-steps", 1).returncode == 0
    metrics.write_text('{"step": "x", "loss": 1.0}\n' + metrics.read_text())
    r = launch("--max-steps", 2, "--resume", out)
    assert r.returncode != 0 and r.stderr.count(f"hnkit: error: {metrics}: line 1: ") == 2, r.stderr[-3000:]


# -- what may change ------------------------------------------------------------------------------
def test_max_steps_and_logging_may_change_on_resume(straight, tmp_path, capsys):
    """From step 2 of the 6-step run to step 4, logging and evaluation changed: the weights are
    the straight run's at step 4 (a constant learning rate, so the schedule does not move)."""
    out = resumable(straight, tmp_path)
    args = with_option(resume_args(straight, out, "--eval-every", 2, "--keep-last", 1), "--max-steps", 4)
    assert main(with_option(args, "--log-every", 2)) == 0
    printed = capsys.readouterr().out
    assert "--max-steps 4 differs from the run's 6" in printed, printed
    expected = load_file(str(straight["out"] / "checkpoints" / "step-0000004" / "hypernetwork.safetensors"))
    got = load_file(str(out / "hypernetwork.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_without_a_record_of_its_options_resumes_with_a_warning(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path)
    path = out / STEP2 / "trainer_state.json"
    state = json.loads(path.read_text())
    state.pop("options", None)  # as an older hnkit wrote it
    path.write_text(json.dumps(state))
    assert main(resume_args(straight, out)) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "does not record" in err, err
    expected = load_file(str(straight["out"] / "hypernetwork.safetensors"))
    got = load_file(str(out / "hypernetwork.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # the checkpoints it writes carry the record
    assert "options" in json.loads((out / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())


# -- train-image shares the record ----------------------------------------------------------------
@pytest.mark.parametrize("change", ["--tag-dropout", "--resolution", "a caption edited", "a template edited"])
def test_train_image_refuses_a_resume_that_changes_the_run(tmp_path, capsys, change):
    from hnkit.testing import build_tiny_sd
    from test_train_image import train_args as image_args, write_images

    sd, images = build_tiny_sd(tmp_path / "sd1", "sd1"), write_images(tmp_path / "images", n=4)
    template = tmp_path / "template.txt"
    template.write_text("a picture of [filewords]\n")
    out = tmp_path / "run"
    assert main(image_args(sd, images, out, "--max-steps", 2, "--template", template)) == 0
    capsys.readouterr()  # the tiny pipeline's build and the run
    args = image_args(sd, images, out, "--max-steps", 4, "--template", template, "--resume", out)
    if change == "a caption edited":
        (images / "img0.txt").write_text("a photo of a dog")
        needles = [f"--data {images}: its content (image names and sizes, captions) differs"]
    elif change == "a template edited":
        template.write_text("a drawing of [filewords]\n")
        needles = [f"--template {template}: its template text differs"]
    else:
        args = with_option(args, change, {"--tag-dropout": 0.3, "--resolution": 16}[change])
        needles = [change, "differs from the run's"]
    assert_refused(args, out, capsys, *needles, "--force")


def test_train_image_resumes_from_images_copied_elsewhere_with_a_note(tmp_path, capsys):
    """The image data is identified by names, sizes and captions: a copy with new file times at
    another path is the same data."""
    from hnkit.testing import build_tiny_sd
    from test_train_image import train_args as image_args, write_images

    sd, images = build_tiny_sd(tmp_path / "sd1", "sd1"), write_images(tmp_path / "images", n=4)
    out = tmp_path / "run"
    assert main(image_args(sd, images, out, "--max-steps", 2)) == 0
    moved = tmp_path / "moved"
    shutil.copytree(images, moved, copy_function=shutil.copy)
    (moved / "notes.md").write_text("not read by the image loader\n")
    capsys.readouterr()
    assert main(image_args(sd, moved, out, "--max-steps", 3, "--resume", out)) == 0
    printed = capsys.readouterr().out
    assert f"hnkit: note: --data {moved} is not the run's path {images}; its content (image names and sizes, captions) is the same" \
        in printed, printed
