"""eval-text options that used to be silently wrong: each mistake is one line and exit code 2,
before the model is loaded or anything is measured."""

import json
import shutil

import pytest

import hnkit
from conftest import refused_in_one_line

from hnkit.commands.cli import build_parser, main


@pytest.fixture
def world(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    net = tmp_path / "net.safetensors"
    hnkit.save(hnkit.Hypernetwork.for_model(AutoModelForCausalLM.from_pretrained(tiny_lm["model"])), net)
    neutral = tmp_path / "neutral.txt"
    neutral.write_text(" ".join(f"The {c} cat sat on mat number {i}." for i in range(300) for c in ("red", "blue")))
    shutil.copy(tiny_lm["corpus"], tmp_path / "copy.txt")
    (tmp_path / "style_dir").mkdir()
    (tmp_path / "neutral_dir").mkdir()
    shutil.copy(tiny_lm["corpus"], tmp_path / "style_dir" / "a.txt")
    shutil.copy(tiny_lm["corpus"], tmp_path / "neutral_dir" / "a.txt")
    (tmp_path / "notes.txt").write_text("just some notes\n")
    return {"model": str(tiny_lm["model"]), "corpus": str(tiny_lm["corpus"]), "net": str(net), "dir": tmp_path,
            "neutral": str(neutral)}


def evaluate(w, *extra, style=None):
    return ["eval-text", "--model", w["model"], "--hypernetwork", w["net"], "--style-data", str(style or w["corpus"]),
            "--block-size", "32", "--max-blocks", "2", "--strengths", "0,1", *map(str, extra)]


MISTAKES = {
    "a bare number above 1": (lambda w: evaluate(w, "--neutral-data", w["neutral"], "--max-neutral-cost", "3"),
                              "--max-neutral-cost 3: a bare number is a fraction (0.03 is 3 %); write 3% for 3 %"),
    "a negative cost": (lambda w: evaluate(w, "--neutral-data", w["neutral"], "--max-neutral-cost=-1%"),
                        "--max-neutral-cost -1%: expected"),
    "not a number": (lambda w: evaluate(w, "--neutral-data", w["neutral"], "--max-neutral-cost", "lots"),
                     "--max-neutral-cost lots: expected"),
    "not finite": (lambda w: evaluate(w, "--neutral-data", w["neutral"], "--max-neutral-cost", "nan"),
                   "--max-neutral-cost nan: expected"),
    "a cost limit without neutral text": (lambda w: evaluate(w, "--max-neutral-cost", "5%"),
                                          "--max-neutral-cost needs --neutral-data"),
    "neutral is the style file": (lambda w: evaluate(w, "--neutral-data", w["corpus"]),
                                  "is the same text as --style-data"),
    "neutral is a copy of the style": (lambda w: evaluate(w, "--neutral-data", w["dir"] / "copy.txt"),
                                       "is the same text as --style-data"),
    "neutral folder is a copy of the style folder": (
        lambda w: evaluate(w, "--neutral-data", w["dir"] / "neutral_dir", style=w["dir"] / "style_dir"),
        "is the same text as --style-data"),
    "plot without an extension": (lambda w: evaluate(w, "--plot", w["dir"] / "x"), "--plot"),
    "plot as svg": (lambda w: evaluate(w, "--plot", w["dir"] / "x.svg"), "x.svg: a plot is a PNG"),
    "plot under a file": (lambda w: evaluate(w, "--plot", w["dir"] / "notes.txt" / "x.png"), "cannot write there"),
    "json is a folder": (lambda w: evaluate(w, "--json", w["dir"] / "style_dir", "--force"), "is a folder"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_is_one_line_exit_2_before_any_evaluation(mistake, world, capsys):
    make_args, words = MISTAKES[mistake]
    out = refused_in_one_line(make_args(world), world["dir"], capsys, words)
    assert "perplexity" not in out  # nothing was measured


def test_percent_or_fraction(capsys):
    from hnkit.commands.eval_text import neutral_cost_limit

    assert neutral_cost_limit("3%") == neutral_cost_limit("0.03") == neutral_cost_limit(" 3 % ") == 0.03
    assert neutral_cost_limit("0.5%") == 0.005 and neutral_cost_limit("0") == 0 and neutral_cost_limit("1") == 1
    assert neutral_cost_limit("150%") == 1.5  # written as a percent, above 100 % is what it says
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval-text", "--help"])
    assert "a percent (3%) or a fraction (0.03)" in " ".join(capsys.readouterr().out.split())


def test_a_percent_limit_is_the_same_as_its_fraction(world, tmp_path, capsys):
    reports = []
    for n, limit in enumerate(("3%", "0.03")):
        report = tmp_path / f"r{n}.json"
        assert main(evaluate(world, "--neutral-data", world["neutral"], "--max-neutral-cost", limit,
                             "--json", report)) == 0
        reports.append(json.loads(report.read_text()))
    rec = [r["styles"]["hypernetwork"]["recommended"] for r in reports]
    assert rec[0] == rec[1] and rec[0]["max_neutral_cost"] == 0.03
    assert "(limit +3.0%)" in capsys.readouterr().out
