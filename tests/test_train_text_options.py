"""train-text options that used to be silently wrong (prior preservation): each mistake is one line
and exit code 2, before the model is loaded; and generate-text leaves the global RNG alone."""

import json
import shutil

import pytest
import torch

from hnkit.commands.cli import build_parser, main


@pytest.fixture
def world(tiny_lm, tmp_path):
    """The tiny corpus, copies of it (a file, a folder, a .jsonl), neutral text and a recipe folder."""
    corpus = tiny_lm["corpus"]
    shutil.copy(corpus, tmp_path / "copy.txt")
    for name in ("style_dir", "neutral_dir"):
        (tmp_path / name).mkdir()
        shutil.copy(corpus, tmp_path / name / "a.txt")
    with open(tmp_path / "copy.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": corpus.read_text(encoding="utf-8")}) + "\n")
    neutral = tmp_path / "neutral.txt"
    neutral.write_text(" ".join(f"The {c} cat sat on mat number {i}." for i in range(300) for c in ("red", "blue")))
    return {"model": str(tiny_lm["model"]), "corpus": str(corpus), "dir": tmp_path, "neutral": str(neutral)}


def train(w, *extra, data=None, model=None):
    return ["train-text", "--model", str(model or w["model"]), "--data", str(data or w["corpus"]),
            "--output", str(w["dir"] / "out"), "--block-size", "32", "--batch-size", "2", "--max-steps", "1",
            *map(str, extra)]


def recipe(w, text):
    path = w["dir"] / "recipe.yaml"
    path.write_text(text)
    return ["--config", path]


SAME = "is the same text as --data"
NOTHING = "does nothing with --no-preserve"
OFF_AND_ON = "--no-preserve turns prior preservation off, but --preserve-data"
MISTAKES = {
    "preserve-data is the style file": (lambda w: train(w, "--preserve-data", w["corpus"]), SAME),
    "preserve-data is the style file by another path": (
        lambda w: train(w, "--preserve-data", w["dir"] / ".." / w["dir"].name / "copy.txt",
                        data=w["dir"] / "copy.txt"), SAME),
    "preserve-data is a copy of the style": (lambda w: train(w, "--preserve-data", w["dir"] / "copy.txt"), SAME),
    "preserve-data folder is a copy of the style folder": (
        lambda w: train(w, "--preserve-data", w["dir"] / "neutral_dir", data=w["dir"] / "style_dir"), SAME),
    "a weight with preservation off": (lambda w: train(w, "--no-preserve", "--preserve-weight", "0.5"),
                                       "--preserve-weight 0.5 does nothing with --no-preserve"),
    "the default weight, given, with preservation off": (
        lambda w: train(w, "--no-preserve", "--preserve-weight", "0.3"), NOTHING),
    "a recipe's weight with preservation off in the recipe": (
        lambda w: train(w, *recipe(w, "preserve_weight: 1.0\npreserve: false\n")), NOTHING),
    "neutral text with preservation off": (lambda w: train(w, "--no-preserve", "--preserve-data", w["neutral"]),
                                           OFF_AND_ON),
    "neutral text with preservation off in a recipe": (
        lambda w: train(w, "--preserve-data", w["neutral"], *recipe(w, "preserve: false\n")), OFF_AND_ON),
    "a nan weight": (lambda w: train(w, "--preserve-data", w["neutral"], "--preserve-weight", "nan"),
                     "--preserve-weight must be 0 or more (a finite number), got nan"),
    "an infinite weight": (lambda w: train(w, "--preserve-data", w["neutral"], "--preserve-weight", "inf"),
                           "got inf"),
    "a negative weight": (lambda w: train(w, "--preserve-data", w["neutral"], "--preserve-weight=-0.1"),
                          "got -0.1"),
    "a nan weight in a recipe": (lambda w: train(w, "--preserve-data", w["neutral"],
                                                 *recipe(w, "preserve_weight: .nan\n")), "got nan"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_is_one_line_exit_2_before_the_model_loads(mistake, world, capsys):
    make_args, words = MISTAKES[mistake]
    # a model folder that does not exist: had the check come after loading, that would be the error
    args = make_args(world)
    args[args.index("--model") + 1] = str(world["dir"] / "no_model")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "no_model" not in err, err
    assert not (world["dir"] / "out").exists()  # nothing written


def test_the_same_text_in_another_form_is_refused_once_tokenized(world, capsys):
    """A .jsonl holding the style's text is not the same bytes, but the same tokens: refused before the
    teacher is computed or a step is taken."""
    assert main(train(world, "--preserve-data", world["dir"] / "copy.jsonl")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "copy.jsonl is the same text as --data" in err and "once tokenized" in err, err
    assert not list((world["dir"] / "out").glob("*.safetensors"))


@pytest.mark.parametrize("extra", [["--preserve-weight", "0"], [], ["--preserve-weight", "0.5"], ["--no-preserve"],
                                   ["--no-preserve", "--preserve-weight", "0"]])
def test_what_stays_allowed(world, extra):
    """A weight of 0 (preservation off, as asked), the default unsaid (preservation on the model's own
    text), a weight without neutral text (it applies to the model's own text) and --no-preserve."""
    assert main(train(world, *extra)) == 0


def test_preservation_with_neutral_text_still_trains(world):
    assert main(train(world, "--preserve-data", world["neutral"], "--preserve-weight", "0.5")) == 0


# -- generate-text and the global RNG -----------------------------------------------------------------
def generate(tiny_lm, *extra):
    from hnkit.commands.generate_text import run

    return run(build_parser().parse_args(["generate-text", "--model", str(tiny_lm["model"]), "--prompt",
                                          "The with statement", "--max-new-tokens", "8", *map(str, extra)]))


def test_generate_text_leaves_the_global_rng_alone(tiny_lm, capsys):
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    first = generate(tiny_lm, "--seed", 5)
    assert torch.equal(torch.random.get_rng_state(), before)  # not reseeded, not drawn from
    assert generate(tiny_lm, "--seed", 5, "--strengths", "0,1") == first * 2  # each from the same seed
    assert torch.equal(torch.random.get_rng_state(), before)
    assert generate(tiny_lm, "--seed", 6) != first
