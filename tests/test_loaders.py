"""One way to read a model and one way to read styles (issue 25): every command tells a local
folder from a hub id with `hnkit.util.model_source`, and reads its `FILE[:STRENGTH]` styles with
`hnkit.commands.common.load_styles`."""

import re
import shutil

import pytest

import hnkit
from hnkit.commands.cli import main
from hnkit.commands.common import load_styles, parse_styles
from hnkit.errors import HnkitError
from hnkit.util import model_source


# -- a local folder or a hub id ------------------------------------------------------------------
def test_model_source_tells_a_folder_from_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(HnkitError, match=r"^~/model: not a transformers model folder \(no config.json\)$"):
        model_source("~/model", "config.json", "transformers model")
    (model / "config.json").write_text("{}")
    assert model_source("~/model", "config.json", "transformers model") == str(model)  # ~ expanded
    assert model_source(str(model), "config.json", "transformers model") == str(model)
    with pytest.raises(HnkitError, match=r"^\./nowhere: no such model folder$"):
        model_source("./nowhere", "model_index.json", "diffusers pipeline")
    monkeypatch.chdir(tmp_path)
    assert model_source("model", "config.json", "transformers model") == "model"  # an existing name is a folder
    with pytest.raises(HnkitError, match=r"^a//b: no such model folder, and not a Hugging Face hub id$"):
        model_source("a//b", "config.json", "transformers model")  # neither: refused without the network


@pytest.mark.parametrize("command", ["generate-text", "train-text"])
def test_text_commands_read_a_model_alike(command, tiny_lm, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--prompt", "x"] if command == "generate-text" else ["--data", str(tiny_lm["corpus"]),
                                                                   "--output", str(out)]
    for model, words in ((tmp_path / "nowhere", "no such model folder"),
                         (tmp_path, "not a transformers model folder (no config.json)")):
        assert main([command, "--model", str(model), *common]) == 2
        err = capsys.readouterr().err
        assert err == f"hnkit: error: {model}: {words}\n", err
    assert not out.exists()


def test_generate_image_reads_a_model_folder_given_with_a_tilde(tmp_path, monkeypatch, capsys):
    """Before: generate-image took '~/sd' as a folder named '~' (no such model folder)."""
    from hnkit.testing import build_tiny_sd

    monkeypatch.setenv("HOME", str(tmp_path))
    build_tiny_sd(tmp_path / "sd", "sd1")
    out = tmp_path / "out"
    argv = ["generate-image", "--model", "~/sd", "--prompt", "x", "--steps", "1", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["00-x-seed0.png"]
    shutil.rmtree(tmp_path / "sd" / "unet")
    (tmp_path / "sd" / "model_index.json").unlink()
    assert main(argv) == 2
    assert capsys.readouterr().err == "hnkit: error: ~/sd: not a diffusers pipeline folder (no model_index.json)\n"


# -- styles ----------------------------------------------------------------------------------------
@pytest.fixture
def style(tmp_path):
    path = tmp_path / "ink.safetensors"
    hnkit.save(hnkit.Hypernetwork(hnkit.HypernetworkConfig([1, 1]), [8]), path)
    return path


def test_styles_are_parsed_then_read(style, tmp_path):
    assert parse_styles([f"{style}:0.5", str(style)]) == [(style, 0.5), (style, 1.0)]
    ((hn, strength),) = load_styles([f"{style}:-0.25"])
    assert isinstance(hn, hnkit.Hypernetwork) and hn.keys() == [8] and strength == -0.25
    with pytest.raises(HnkitError, match=r"^--hypernetwork .*ink.safetensors:5: strength 5 is outside \[-4, 4\]"):
        parse_styles([f"{style}:5"])
    with pytest.raises(HnkitError, match=r"ink.safetensors:2 with --grid factor 3: strength 6 is outside"):
        parse_styles([f"{style}:2"], [1.0, 3.0], factor_option="--grid")
    assert parse_styles([f"{style}:5"], [10.0], bounded=False) == [(style, 5.0)]  # generate-image's rule
    with pytest.raises(HnkitError, match=r"missing.pt: no such file"):
        load_styles([f"{style}:0.5", str(tmp_path / "missing.pt")])


def test_every_command_refuses_a_bad_style_before_loading_the_model(style, tmp_path, capsys):
    """The same spec syntax and the same one-line errors from each command that takes styles;
    the model named does not exist, so any model loading would say so instead."""
    nowhere = str(tmp_path / "no_model")
    commands = {
        "generate-text": ["generate-text", "--model", nowhere, "--prompt", "x"],
        "eval-text": ["eval-text", "--model", nowhere, "--style-data", str(style)],
        "generate-image": ["generate-image", "--model", nowhere, "--prompt", "x", "--output", str(tmp_path / "o")],
    }
    for name, argv in commands.items():
        for spec, words in ((f"{style}:lots", r"bad strength 'lots', expected a number such as .*ink.safetensors:0.7"),
                            (f"{tmp_path / 'missing.pt'}:0.5", "missing.pt: no such file")):
            if name == "generate-image" and "missing" in spec:
                continue  # generate-image checks its model folder before reading styles
            assert main([*argv, "--hypernetwork", spec]) == 2, (name, spec)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and re.search(words, err), (name, err)
    assert main([*commands["generate-text"], "--hypernetwork", f"{style}:5"]) == 2
    assert "--hypernetwork" in capsys.readouterr().err  # the commands' bound on a strength, naming the option
