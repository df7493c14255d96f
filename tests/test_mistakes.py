"""A new user's mistakes, table-driven: each is one line on stderr naming the problem, exit code 2,
no traceback, and nothing written (issue 16)."""

import json

import pytest
import torch

from conftest import refused_in_one_line

import hnkit


@pytest.fixture
def world(tiny_lm, tmp_path):
    """Files a user has lying around: a tiny model and corpus, a trained-looking network, bad data."""
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    (tmp_path / "notes.txt").write_text("just some notes\n")
    (tmp_path / "taken.png").write_bytes(b"an earlier plot")
    net = tmp_path / "net.safetensors"
    from transformers import AutoModelForCausalLM

    hn = hnkit.Hypernetwork.for_model(AutoModelForCausalLM.from_pretrained(tiny_lm["model"]))
    hnkit.save(hn, net)
    return {"model": str(tiny_lm["model"]), "corpus": str(tiny_lm["corpus"]), "net": str(net), "dir": tmp_path}


def train(w, *extra):
    return ["train-text", "--model", w["model"], "--data", w["corpus"], "--output", str(w["dir"] / "out"),
            "--block-size", "32", "--max-steps", "1", *extra]


def evaluate(w, *extra):
    return ["eval-text", "--model", w["model"], "--hypernetwork", w["net"], "--style-data", w["corpus"],
            "--block-size", "32", *extra]


MISTAKES = {
    "val fraction above 1": (lambda w: train(w, "--val-fraction", "1.5"), "--val-fraction must be"),
    "val fraction 1": (lambda w: train(w, "--val-fraction", "1.0"), "--val-fraction must be"),
    "negative val fraction": (lambda w: train(w, "--val-fraction", "-0.5"), "--val-fraction must be"),
    "batch larger than the data": (lambda w: train(w, "--batch-size", "100000"), "fewer than one batch"),
    "missing model": (lambda w: train(w, "--model", str(w["dir"] / "nope")), "no such model folder"),
    "missing data": (lambda w: train(w, "--data", str(w["dir"] / "nope.txt")), "no such file or folder"),
    "empty jsonl": (lambda w: train(w, "--data", str(w["dir"] / "empty.jsonl")), "no text found"),
    "broken jsonl": (lambda w: train(w, "--data", str(w["dir"] / "bad.jsonl")), "line 2: not valid JSON"),
    "missing preserve data": (lambda w: train(w, "--preserve-data", str(w["dir"] / "nope")), "no such file"),
    "block beyond the context": (lambda w: train(w, "--block-size", "100000"), "larger than the model's context"),
    "bad learning rate": (lambda w: train(w, "--lr", "fast"), "bad learning rate"),
    "output is a file": (lambda w: train(w, "--output", str(w["dir"] / "notes.txt")), "is a file"),
    "plot exists": (lambda w: evaluate(w, "--plot", str(w["dir"] / "taken.png")), "already exists"),
    "eval val fraction": (lambda w: evaluate(w, "--val-fraction", "2"), "--val-fraction must be"),
    "text file as a network": (lambda w: ["inspect", str(w["dir"] / "notes.txt")], "it holds text"),
    "convert over a file": (lambda w: ["convert", w["net"], str(w["dir"] / "notes.txt")], "already exists"),
}
if not torch.cuda.is_available():
    MISTAKES["eval on cuda"] = (lambda w: evaluate(w, "--device", "cuda"), "CUDA is not available")
    MISTAKES["generate on cuda"] = (lambda w: ["generate-text", "--model", w["model"], "--prompt", "x",
                                               "--device", "cuda"], "CUDA is not available")


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_is_one_line_exit_2_and_writes_nothing(mistake, world, capsys):
    make_args, words = MISTAKES[mistake]
    refused_in_one_line(make_args(world), world["dir"], capsys, words)
    assert not (world["dir"] / "out").exists()
