"""``hnkit train-text --init STYLE`` (issue 26): a new run starts from a style's weights instead of
the identity; the file decides the architecture, the run records its content for --resume, and a
file that is missing, damaged, made for another model or contradicted by an option is one line."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import hnkit
from hnkit.commands.cli import main
from hnkit.hypernetwork import HypernetworkConfig
from hnkit.trainer import Trainer
from conftest import refused_in_one_line
from test_train_text import assert_same, rows, train_args

QUICK = ("--no-preserve", "--max-steps", 2)


@pytest.fixture(scope="module")
def styles(tiny_lm, tmp_path_factory):
    """Two styles trained a few steps on the tiny GPT-2: the default network (per-site ReLU
    bottleneck) and a low-rank one."""
    root = tmp_path_factory.mktemp("init_styles")
    assert main(train_args(tiny_lm, root / "mlp", "--max-steps", 4, "--lr", "1e-2", "--no-preserve")) == 0
    assert main(train_args(tiny_lm, root / "lowrank", "--max-steps", 4, "--lr", "1e-2", "--no-preserve",
                           "--form", "lowrank", "--rank", "4")) == 0
    return {"mlp": root / "mlp" / "hypernetwork.safetensors", "lowrank": root / "lowrank" / "hypernetwork.safetensors"}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_starts_from_the_files_weights(tiny_lm, styles, tmp_path, monkeypatch):
    seen = {}
    real_train = Trainer.train

    def spy_train(self):  # the network the loop starts from, as the trainer holds it at step 0
        hnkit.save(self.task.hypernetwork, tmp_path / "step0.safetensors")
        seen["step"] = self.step
        return real_train(self)

    monkeypatch.setattr(Trainer, "train", spy_train)
    out = tmp_path / "run"
    # options that agree with the file are fine
    assert main(train_args(tiny_lm, out, *QUICK, "--eval-every", 1, "--init", styles["mlp"], "--name", "mine",
                           "--per-site", "--layer-structure", "1,0.125,1")) == 0
    assert seen["step"] == 0 and hnkit.load(tmp_path / "step0.safetensors").step == 0
    assert_same(load_file(tmp_path / "step0.safetensors"), load_file(styles["mlp"]))  # bit for bit
    hn = hnkit.load(out / "mine.safetensors")
    assert hn.name == "mine" and hn.step == 2 and hn.family == "gpt2"
    assert hn.extra["init"] == {"file": "hypernetwork.safetensors", "sha256": sha256(styles["mlp"])}
    assert hn.config == hnkit.load(styles["mlp"]).config
    # step 0's validation loss is the style's, not the bare model's (a fresh run starts as the identity)
    fresh = tmp_path / "fresh"
    assert main(train_args(tiny_lm, fresh, *QUICK, "--eval-every", 1)) == 0
    step0 = [r["val_loss"] for r in rows(out) if r["step"] == 0 and "val_loss" in r]
    fresh0 = [r["val_loss"] for r in rows(fresh) if r["step"] == 0 and "val_loss" in r]
    assert len(step0) == len(fresh0) == 1 and abs(step0[0] - fresh0[0]) > 1e-3
    state = json.loads((out / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["options"]["init_sha256"] == sha256(styles["mlp"])


def test_the_file_decides_the_architecture(tiny_lm, styles, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, *QUICK, "--init", styles["lowrank"])) == 0  # no --form, no --rank
    hn = hnkit.load(out / "hypernetwork.safetensors")
    assert (hn.config.form, hn.config.rank, hn.config.per_site) == ("lowrank", 4, True)
    trained, start = load_file(out / "hypernetwork.safetensors"), load_file(styles["lowrank"])
    assert trained.keys() == start.keys() and not all(torch.equal(trained[k], start[k]) for k in start)  # it trained


CONTRADICTIONS = {
    "a layer structure": ("mlp", ["--layer-structure", "1,2,1"], "--layer-structure 1,2,1 contradicts --init {file}, "
                                                                 "a network with --layer-structure 1,0.125,1"),
    "per width": ("mlp", ["--no-per-site"], "--no-per-site contradicts --init {file}, a network with --per-site"),
    "an activation": ("mlp", ["--activation", "linear"], "--activation linear contradicts --init {file}, a network "
                                                         "with --activation relu"),
    "a form in a recipe": ("mlp", ["recipe", "form: lowrank\nrank: 4\n"], "--form lowrank contradicts --init {file}"),
    "an MLP option on a low-rank file": ("lowrank", ["--activation", "relu"],
                                         "--activation relu does not apply to --init {file}, a lowrank network of "
                                         "rank 4"),
    "a rank": ("lowrank", ["--rank", "8"], "--rank 8 contradicts --init {file}, a network with --rank 4"),
    "an explicit default": ("lowrank", ["--form", "mlp"], "--form mlp contradicts --init {file}, a network with "
                                                          "--form lowrank"),
}


@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_an_option_that_contradicts_the_file_is_one_line(case, tiny_lm, styles, tmp_path, capsys):
    style, extra, words = CONTRADICTIONS[case]
    if extra[0] == "recipe":
        (tmp_path / "recipe.yaml").write_text(extra[1])
        extra = ["--config", tmp_path / "recipe.yaml"]
    out = tmp_path / "run"
    refused_in_one_line(train_args(tiny_lm, out, *QUICK, "--init", styles[style], *extra), tmp_path, capsys,
                        words.format(file=styles[style]))
    assert not out.exists()


def test_a_style_for_another_model_is_one_line(tiny_lm, load_tiny, tmp_path, capsys):
    llama = hnkit.Hypernetwork.for_model(load_tiny("llama"), HypernetworkConfig(per_site=True), name="llama-style")
    hnkit.save(llama, tmp_path / "llama.safetensors")
    wide = hnkit.Hypernetwork(HypernetworkConfig(), keys=[48], name="wide", base_model="other/model")
    hnkit.save(wide, tmp_path / "wide.pt")  # a web UI file, keyed by width
    out = tmp_path / "run"
    for style, made_for, why in ((tmp_path / "llama.safetensors", llama.base_model, "sites this gpt2 model lacks"),
                                 (tmp_path / "wide.pt", "other/model", "widths [48], which fit no attention layer")):
        refused_in_one_line(train_args(tiny_lm, out, *QUICK, "--init", style), tmp_path, capsys,
                            f"--init {style}: made for {made_for}, it does not fit --model {tiny_lm['model']}: "
                            f"hypernetwork {style.stem if style.suffix == '.pt' else 'llama-style'!r} has {why}")
        assert not out.exists()


class Boom:  # a pickle that would make a folder if it ran
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.path),)


def test_a_missing_or_damaged_file_is_one_line(tiny_lm, styles, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(styles["mlp"].read_bytes()[:200])
    hostile = tmp_path / "hostile.pt"
    torch.save({"a": Boom(tmp_path / "pwned")}, hostile)
    out = tmp_path / "run"
    for path, words in ((tmp_path / "missing.safetensors", "no such file"),
                        (truncated, "corrupt or truncated safetensors file"),
                        (hostile, "refused: not loadable as plain tensors"),
                        (tmp_path, "is a directory")):
        refused_in_one_line(train_args(tiny_lm, out, *QUICK, "--init", path), tmp_path, capsys,
                            f"--init {path}: {words}")
        assert not out.exists()
    assert not (tmp_path / "pwned").exists()  # the pickle never ran


def test_resume_of_an_init_run_is_exact_and_keeps_its_init(tiny_lm, styles, tmp_path, capsys):
    init = tmp_path / "init.safetensors"
    shutil.copy(styles["lowrank"], init)  # not the default architecture: the resume must take it from the record
    steps = ("--max-steps", 4, "--save-every", 2, "--keep-last", 5, "--lr", "3e-3")
    straight = tmp_path / "straight"
    assert main(train_args(tiny_lm, straight, *steps, "--init", init)) == 0  # prior preservation on
    final = load_file(straight / "hypernetwork.safetensors")

    def from_step_2(name):
        out = tmp_path / name
        shutil.copytree(straight / "checkpoints" / "step-0000002", out / "checkpoints" / "step-0000002")
        return out

    # with --init again, and without it (the record knows the file; it need not exist any more)
    with_init = from_step_2("with_init")
    assert main(train_args(tiny_lm, with_init, *steps, "--init", init, "--resume", with_init)) == 0
    assert_same(final, load_file(with_init / "hypernetwork.safetensors"))
    init.rename(tmp_path / "moved.safetensors")
    without = from_step_2("without")
    assert main(train_args(tiny_lm, without, *steps, "--resume", without)) == 0
    assert_same(final, load_file(without / "hypernetwork.safetensors"))
    assert hnkit.load(without / "hypernetwork.safetensors").extra["init"]["sha256"] == sha256(styles["lowrank"])
    # a moved copy is the same style: a note; another style at the run's path is refused
    moved = from_step_2("moved")
    assert main(train_args(tiny_lm, moved, *steps, "--init", tmp_path / "moved.safetensors", "--resume", moved)) == 0
    assert "is not the run's path" in capsys.readouterr().out
    changed = from_step_2("changed")
    refused_in_one_line(train_args(tiny_lm, changed, *steps, "--init", tmp_path / "moved.safetensors",
                                   "--rank", "8", "--resume", changed), tmp_path, capsys, "--rank 8 contradicts")
    started = sha256(styles["lowrank"])[:12]
    for other in (styles["mlp"], styles["lowrank"]):  # another network; the same one saved again, other bytes
        edited = hnkit.load(other)
        edited.description = "edited"
        hnkit.save(edited, init)
        refused_in_one_line(train_args(tiny_lm, changed, *steps, "--init", init, "--resume", changed), tmp_path,
                            capsys, f"--init {init}: not the style the run started from (sha256 {started}...")


def test_init_on_resume_of_a_run_without_one_is_one_line(tiny_lm, styles, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_lm, out, *QUICK)) == 0
    refused_in_one_line(train_args(tiny_lm, out, *QUICK, "--max-steps", 3, "--init", styles["mlp"], "--resume", out),
                        tmp_path, capsys, f"--init {styles['mlp']}: the run in --resume {out} did not start from a "
                                          "style; resume it without --init")
