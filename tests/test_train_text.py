"""The shared trainer through `hnkit train-text` on a tiny model: learning, exact resume, Ctrl-C,
NaN, multi-process, recipes and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hnkit
from hnkit.commands.cli import main
from hnkit.train_config import TrainConfig, lr_at, parse_step_string
from conftest import with_option

BASE = ["--batch-size", "4", "--block-size", "32", "--lr", "3e-3", "--log-every", "1"]


def train_args(tiny_lm, output, *extra):
    return ["train-text", "--model", str(tiny_lm["model"]), "--data", str(tiny_lm["corpus"]),
            "--output", str(output), *BASE, *map(str, extra)]


def weights(path):
    return load_file(str(path))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rows(output):
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs_are_written(tiny_lm, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, "--max-steps", 40, "--eval-every", 20, "--sample-every", 40,
                           "--lr", "1e-2")) == 0
    val = [(r["step"], r["val_loss"]) for r in rows(out) if "val_loss" in r]
    train = [r["loss"] for r in rows(out) if "loss" in r]
    assert [s for s, _ in val] == [0, 20, 40]  # step 0: the untrained baseline
    assert val[2][1] < val[1][1] < val[0][1] - 0.2
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.2
    hn = hnkit.load(out / "hypernetwork.safetensors")
    assert hn.step == 40 and hn.family == "gpt2"
    # text's defaults (docs/benchmarks.md, bench_quality): a per-site relu bottleneck starting as the identity
    c = hn.config
    assert (c.layer_structure, c.activation, c.zero_init_last, c.per_site) == ([1, 0.125, 1], "relu", True, True)
    assert (out / "loss.png").stat().st_size > 1000
    assert "### continuation" in (out / "samples" / "step-0000040.txt").read_text()
    assert (out / "checkpoints" / "step-0000040" / "trainer_state.json").exists()


def test_defaults_are_the_measured_ones():
    """train-text with only --model --data --output gets the configuration bench_quality.py chose
    (docs/benchmarks.md): the per-site ReLU bottleneck, lr 1e-3, preservation on, weight 0.3."""
    from hnkit.commands.cli import build_parser
    from hnkit.commands.options import module_config, resolve_options, train_config
    from hnkit.commands.train_text import OPTIONS

    args = build_parser().parse_args(["train-text", "--model", "m", "--data", "d", "--output", "o"])
    o = resolve_options(args, OPTIONS)
    assert train_config(o, Path("o")).lr == 1e-3 and o["preserve_weight"] == 0.3 and o["preserve"] is True
    c = module_config(o)
    assert (c.layer_structure, c.activation, c.zero_init_last, c.per_site) == ([1, 0.125, 1], "relu", True, True)


RESUME_OPTS = ("--max-steps", 8, "--grad-accum", 2, "--lr", "3e-3", "--lr-schedule", "cosine", "--warmup-steps", 2,
               "--dropout-structure", "0,0.3,0", "--activation", "relu")


def test_resume_is_exact(tiny_lm, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args(tiny_lm, straight, *RESUME_OPTS, "--save-every", 4, "--keep-last", 5)) == 0
    # a second run that starts from the step-4 checkpoint of the first and goes on to step 8
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(straight / "checkpoints" / "step-0000004", resumed / "checkpoints" / "step-0000004")
    assert main(train_args(tiny_lm, resumed, *RESUME_OPTS, "--resume", resumed)) == 0
    assert_same(weights(straight / "hypernetwork.safetensors"), weights(resumed / "hypernetwork.safetensors"))


def start_training(tiny_lm, output, *extra):
    """A long train-text run in a real process, returned once it has logged its first step."""
    cmd = [sys.executable, "-m", "hnkit", *train_args(tiny_lm, output, *extra, "--max-steps", 100000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (output / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    return proc


def test_ctrl_c_in_a_real_process_saves_a_checkpoint(tiny_lm, tmp_path):
    interrupted = tmp_path / "interrupted"
    proc = start_training(tiny_lm, interrupted, *RESUME_OPTS[2:])
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    state = json.loads(next((interrupted / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["step"] >= 1  # stopped between steps, with a complete checkpoint
    assert not (interrupted / "hypernetwork.safetensors").exists()  # the run is not finished


def test_interrupt_then_resume_equals_straight(tiny_lm, tmp_path, monkeypatch):
    """In-process Ctrl-C during step 3 of 8 (the signal handler's flag, set from inside a step)."""
    from hnkit.text import TextTask

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(train_args(tiny_lm, straight, *RESUME_OPTS)) == 0
    real_loss = TextTask.loss
    calls = {"n": 0}

    def loss_then_ctrl_c(self, batch):
        loss = real_loss(self, batch)
        if torch.is_grad_enabled():  # a training micro-batch (evaluation runs without gradients)
            calls["n"] += 1
            if calls["n"] == 6:  # the last of step 3's two micro-batches (--grad-accum 2)
                os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(TextTask, "loss", loss_then_ctrl_c)
    assert main(train_args(tiny_lm, interrupted, *RESUME_OPTS)) == 130
    assert [p.name for p in (interrupted / "checkpoints").iterdir()] == ["step-0000003"]
    monkeypatch.setattr(TextTask, "loss", real_loss)
    assert main(train_args(tiny_lm, interrupted, *RESUME_OPTS, "--resume", interrupted)) == 0
    assert_same(weights(straight / "hypernetwork.safetensors"), weights(interrupted / "hypernetwork.safetensors"))
    assert [r["step"] for r in rows(interrupted)] == list(range(1, 9))  # the metrics log is continuous


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_lm, tmp_path, monkeypatch, capsys):
    from hnkit.text import TextTask

    real_loss = TextTask.loss
    calls = {"n": 0}

    def loss(self, batch):
        calls["n"] += 1
        value = real_loss(self, batch)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(TextTask, "loss", loss)
    out = tmp_path / "nan"
    assert main(train_args(tiny_lm, out, "--max-steps", 10, "--save-every", 2)) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 5" in err and "step-0000004" in err and err.count("\n") == 1, err
    good = out / "checkpoints" / "step-0000004" / "hypernetwork.safetensors"
    assert hnkit.load(good).step == 4 and torch.isfinite(torch.cat([t.flatten() for t in weights(good).values()])).all()
    assert not (out / "hypernetwork.safetensors").exists()


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_lm, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # the web UI's shared network, its weights drawn large: gradients well above float noise
    # without prior preservation: its neutral share is at least one block per process, so 2 x 2 blocks
    # take two neutral blocks where 1 x 4 takes one
    opts = ("--max-steps", 4, "--activation", "relu", "--weight-init", "XavierNormal", "--layer-structure", "1,2,1",
            "--no-per-site", "--no-zero-init-last", "--no-preserve")
    assert main(train_args(tiny_lm, one, *opts)) == 0
    args = train_args(tiny_lm, two, *opts)
    args[args.index("--batch-size") + 1] = "2"  # 2 processes x 2 = the same 4 blocks per step
    # --multi_gpu starts torchrun; with no GPU accelerate runs DDP over gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hnkit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(one / "hypernetwork.safetensors"), weights(two / "hypernetwork.safetensors")
    # The K module's output bias shifts every key by the same vector, which softmax ignores: its
    # gradient is zero in exact arithmetic, so Adam turns float noise into +-lr steps. Skip it.
    for k in a:
        if k != "32.k.linear.2.bias":
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(a["32.k.linear.0.weight"], hnkit.load(one / "hypernetwork.safetensors")[32][1].linear[0].weight)


def test_recipe_file_with_command_line_overrides(tiny_lm, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_lm['model']}\ndata: {tiny_lm['corpus']}\nmax_steps: 50\nbatch_size: 2\n"
                      "block_size: 32\nlayer_structure: [1, 1.5, 1]\nlog_every: 1\n")
    out = tmp_path / "recipe_run"
    assert main(["train-text", "--config", str(recipe), "--max-steps", "3", "--output", str(out)]) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert hnkit.load(out / "hypernetwork.safetensors").config.layer_structure == [1, 1.5, 1]
    recipe.write_text("model: x\nbogus_option: 1\n")
    assert main(["train-text", "--config", str(recipe)]) == 2


def test_lr_schedules():
    c = TrainConfig(lr=1.0, max_steps=10, warmup_steps=2, lr_schedule="cosine")
    assert [lr_at(s, c) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, c) == 1.0 and abs(lr_at(6, c) - 0.5) < 1e-9 and lr_at(10, c) < 1e-9
    c = TrainConfig(lr=2.0, max_steps=11, lr_schedule="linear", warmup_steps=1)
    assert lr_at(1, c) == 2.0 and abs(lr_at(6, c) - 1.0) < 1e-9
    c = TrainConfig(lr="5e-3:100, 1e-3:1000, 1e-5")
    assert parse_step_string(c.lr) == [(5e-3, 100), (1e-3, 1000), (1e-5, None)]
    assert [lr_at(s, c) for s in (0, 99, 100, 999, 1000, 5000)] == [5e-3, 5e-3, 1e-3, 1e-3, 1e-5, 1e-5]
    with pytest.raises(hnkit.HnkitError):
        parse_step_string("fast")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hnkit", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_bad_input_gives_one_clear_line_and_exit_2(tiny_lm, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    cases = [
        (["--data", tmp_path / "missing.txt"], "missing.txt: no such file or folder"),
        (["--data", empty], "empty.txt: no text found"),
        (["--data", short], "fewer than one block"),
        (["--model", tmp_path / "no_model"], "no_model: no such model folder"),
        (["--block-size", 4096], "larger than the model's context of 128"),
        (["--precision", "fp16"], "fp16 needs a CUDA GPU"),
    ]
    for i, (override, message) in enumerate(cases):
        args = with_option(train_args(tiny_lm, tmp_path / f"out{i}", "--max-steps", 1), *override)
        assert main(args) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    r = run_cli("train-text", "--model", tiny_lm["model"], "--data", empty, "--block-size", 32, "--output", tmp_path / "y")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no text found" in r.stderr
    # an existing run is never overwritten
    out = tmp_path / "done"
    assert main(train_args(tiny_lm, out, "--max-steps", 1)) == 0
    before = (out / "hypernetwork.safetensors").read_bytes()
    assert main(train_args(tiny_lm, out, "--max-steps", 1)) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (out / "hypernetwork.safetensors").read_bytes() == before


def test_tokenized_blocks_are_cached(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    from hnkit.text import tokenized_blocks
    from hnkit.util import cache_root

    tok = AutoTokenizer.from_pretrained(tiny_lm["model"])
    folder = tmp_path / "docs"
    folder.mkdir()
    text = tiny_lm["corpus"].read_text()
    (folder / "a.txt").write_text(text[:3000])
    (folder / "b.txt").write_text(text[3000:6000])
    a = tokenized_blocks(folder, tok, 32)
    n_cached = len(list((cache_root() / "text").iterdir()))
    b = tokenized_blocks(folder, tok, 32)
    assert torch.equal(a, b) and len(list((cache_root() / "text").iterdir())) == n_cached
    assert a.shape[1] == 32 and (a == tok.eos_token_id).sum() >= 1  # documents are separated by EOS
    n_tokens = sum(len(tok(t, add_special_tokens=False).input_ids) + 1 for t in (text[:3000], text[3000:6000]))
    assert len(a) == n_tokens // 32  # packed across documents, only the last partial block dropped
    (folder / "b.txt").write_text(text[3000:5000])  # a changed file is tokenized again
    assert len(tokenized_blocks(folder, tok, 32)) < len(a)


def test_the_run_keeps_only_the_split_blocks(tiny_lm, tmp_path, monkeypatch):
    """train-text lets go of the whole blocks tensor once it is split into training and validation
    blocks (a copy), so a run holds the blocks once, not twice."""
    import weakref

    import hnkit.text
    from hnkit.trainer import Trainer

    refs, alive = [], []
    split, train = hnkit.text.split_blocks, Trainer.train

    def spy_split(blocks, *args):
        refs.append(weakref.ref(blocks))
        return split(blocks, *args)

    def spy_train(self):
        alive.append(refs[0]() is not None)
        return train(self)

    monkeypatch.setattr(hnkit.text, "split_blocks", spy_split)
    monkeypatch.setattr(Trainer, "train", spy_train)
    assert main(train_args(tiny_lm, tmp_path / "run", "--max-steps", 1)) == 0
    assert alive == [False]


def test_every_recipe_is_valid_and_shows_its_command():
    from hnkit.commands import train_image, train_text
    from hnkit.commands.options import read_recipe

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert {"sd15_style.yaml", "sd21_style.yaml", "sdxl_style.yaml"} <= {p.name for p in recipes}
    for path in recipes:
        header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        command = "train-image" if "hnkit train-image" in header else "train-text"
        table = (train_image if command == "train-image" else train_text).OPTIONS
        options = read_recipe(str(path), table)  # unknown keys or bad YAML raise
        assert options["model"] and options["data"]
        if "{cache}" in path.read_text():  # follows $HNKIT_CACHE (set to a temporary folder for the tests)
            assert options["model"].startswith(os.environ["HNKIT_CACHE"]) and "{" not in options["data"]
        assert f"hnkit {command} --config recipes/{path.name}" in header


def test_jsonl_and_saved_datasets_input_with_tensorboard(tiny_lm, tmp_path):
    from datasets import Dataset

    text = tiny_lm["corpus"].read_text()
    docs = [text[i:i + 2000] for i in range(0, 40000, 2000)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    for data, out in ((jsonl, tmp_path / "from_jsonl"), (tmp_path / "saved", tmp_path / "from_saved")):
        args = train_args(tiny_lm, out, "--max-steps", 2, "--text-field", "body", "--tensorboard")
        args[args.index("--data") + 1] = str(data)
        assert main(args) == 0
        assert [r["step"] for r in rows(out)] == [1, 2]
        assert list(out.rglob("events.out.tfevents.*"))  # accelerate's TensorBoard tracker wrote
    # the same documents give the same blocks either way
    a = weights(tmp_path / "from_jsonl" / "hypernetwork.safetensors")
    assert_same(a, weights(tmp_path / "from_saved" / "hypernetwork.safetensors"))
    args = train_args(tiny_lm, tmp_path / "bad", "--max-steps", 1)
    args[args.index("--data") + 1] = str(jsonl)
    assert main(args) == 2  # no "text" field: one clear error


def test_validation_during_training_sees_every_step(tiny_lm, tmp_path):
    """Validation passes between the steps of the trainer's fused AdamW (which bumps no parameter
    versions) see the weights of each step, not those of the first pass."""
    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, "--max-steps", 20, "--eval-every", 10, "--lr", "1e-2",
                           "--per-site", "--activation", "relu")) == 0
    val = [r["val_loss"] for r in rows(out) if "val_loss" in r]
    assert len(val) == 3 and val[2] < val[1] < val[0]


def test_eval_text_measures_the_blocks_the_run_held_out_without_repeating_its_settings(tiny_lm, tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file appears in the working folder unless asked for
    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, "--max-steps", 2, "--val-fraction", "0.2", "--seed", "3")) == 0
    stdout = capsys.readouterr().out
    assert "step 2/2 loss" in stdout  # not a terminal: a plain line per logged step
    assert "2 steps in" in stdout and str(out) in stdout  # and a summary at the end
    hn = hnkit.load(out / "hypernetwork.safetensors")
    assert hn.extra["data"] == {"block_size": 32, "val_fraction": 0.2, "seed": 3, "text_field": "text"}
    report = tmp_path / "report.json"
    assert main(["eval-text", "--model", str(tiny_lm["model"]), "--hypernetwork", str(out / "hypernetwork.safetensors"),
                 "--style-data", str(tiny_lm["corpus"]), "--strengths", "0,1", "--json", str(report)]) == 0
    from hnkit.commands.eval_text import held_out_blocks
    from hnkit.text import load_causal_lm

    _, tokenizer = load_causal_lm(str(tiny_lm["model"]))
    expected = held_out_blocks(tiny_lm["corpus"], tokenizer, 32, 0.2, 3, 32)
    data = json.loads(report.read_text())
    assert data["block_size"] == 32 and data["blocks"]["style"] == len(expected)
    assert not list(tmp_path.glob("*.png"))
