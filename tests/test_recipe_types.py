"""Recipe values are checked against their option's type, as the command line would take them."""

from pathlib import Path

import pytest

from hnkit import HnkitError
from hnkit.commands import train_image, train_text
from hnkit.commands.cli import build_parser, main
from hnkit.commands.options import module_config, read_recipe, resolve_options, train_config


def recipe(tmp_path, text, options=train_text.OPTIONS):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\ndata: d\n" + text)
    return path, read_recipe(str(path), options)


def refused(tmp_path, text, options=train_text.OPTIONS):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(HnkitError) as err:
        read_recipe(str(path), options)
    return path, str(err.value)


def test_yaml_11_exponents_are_numbers_as_on_the_command_line(tmp_path):
    """YAML 1.1 reads 1e-2 (no dot) as a string: it is converted as --weight-decay 1e-2 would be."""
    _, o = recipe(tmp_path, "lr: 1e-2\nweight_decay: 1e-2\nmax_grad_norm: 2\nmax_steps: '30'\n")
    assert o["weight_decay"] == 0.01 and isinstance(o["weight_decay"], float)
    assert o["max_grad_norm"] == 2.0 and isinstance(o["max_grad_norm"], float)
    assert o["max_steps"] == 30 and isinstance(o["max_steps"], int)
    assert train_config({**_defaults(), **o}, Path("o")).lr == 0.01


def test_a_quoted_false_is_not_true(tmp_path):
    path, msg = refused(tmp_path, 'layer_norm: "false"\n')
    assert msg == (f"{path}: layer_norm: got the string 'false', expected a YAML boolean: true or false, unquoted")
    _, o = recipe(tmp_path, "layer_norm: false\nper_site: no\nzero_init_last: true\n")
    assert (o["layer_norm"], o["per_site"], o["zero_init_last"]) == (False, False, True)
    assert not module_config({**_defaults(), **o}).layer_norm


@pytest.mark.parametrize("text, says", [
    ("max_steps: [100]\n", "max_steps: got the list [100], expected an integer"),
    ("weight_decay: {a: 1}\n", "weight_decay: got the mapping {'a': 1}, expected a number"),
    ("max_steps: 100.5\n", "max_steps: got the number 100.5, expected an integer"),
    ("max_steps: true\n", "max_steps: got the boolean True, expected an integer"),
    ("max_steps:\n", "max_steps: got no value, expected an integer"),
    ("layer_structure: [1, [2], 1]\n", "layer_structure: got the list [1, [2], 1], expected numbers"),
    ("layer_structure: 1,x,1\n", "layer_structure: got the string '1,x,1', expected numbers"),
    ("name: yes\n", "name: got the boolean True, expected a string (quote it:"),
    ("sample_prompts: [a cat, [b]]\n", "sample_prompts: got the list ['a cat', ['b']], expected a text"),
    ("precision: 16\n", "precision: got the number 16, expected one of fp32, fp16, bf16"),
    ("lr_schedule: cosinus\n", "lr_schedule: got the string 'cosinus', expected one of constant, linear, cosine"),
    ("weight_init: normal\n", "weight_init: got the string 'normal', expected one of Normal, XavierUniform"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_file_key_value_and_type(tmp_path, text, says):
    path, msg = refused(tmp_path, text)
    assert msg.startswith(f"{path}: ") and says in msg and "\n" not in msg, msg


def test_unknown_keys_are_still_refused(tmp_path):
    path, msg = refused(tmp_path, "max-steps: 10\nwarp: 9\n7: x\n")
    assert msg.startswith(f"{path}: unknown option(s) max-steps, warp, 7") and "max_steps" in msg, msg


def test_every_mistake_is_its_own_line_and_the_command_exits_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\ndata: d\nlayer_norm: 'false'\nmax_steps: [1]\nprecision: 16\n")
    assert main(["train-text", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(f"{path}: " in line for line in lines), lines
    assert [line.split(f"{path}: ")[1].split(":")[0] for line in lines] == ["layer_norm", "max_steps", "precision"]
    assert not (tmp_path / "run").exists()


def test_nulls_mean_the_default_only_where_the_default_is_none(tmp_path):
    _, o = recipe(tmp_path, "resume:\ndropout_structure: null\nsample_prompts:\n")
    assert o["resume"] is None and o["dropout_structure"] is None and o["sample_prompts"] is None


def test_lists_and_texts_take_the_command_line_forms_too(tmp_path):
    _, o = recipe(tmp_path, "layer_structure: 1,2,1\ndropout_structure: [0, '0.3', 0]\nsample_prompts: a cat\n")
    assert o["layer_structure"] == [1.0, 2.0, 1.0] and o["dropout_structure"] == [0, 0.3, 0]
    assert o["sample_prompts"] == ["a cat"]
    _, o = recipe(tmp_path, "sample_prompts: [a cat, 42]\nname: 7\n")
    assert o["sample_prompts"] == ["a cat", "42"] and o["name"] == "7"


def test_train_image_tables_are_checked_too(tmp_path):
    path, msg = refused(tmp_path, "save_pt: 'true'\n", train_image.OPTIONS)
    assert msg.startswith(f"{path}: save_pt: got the string 'true'"), msg
    _, o = recipe(tmp_path, "save_pt: true\nresolution: '64'\nsample_guidance: 7\n", train_image.OPTIONS)
    assert o["save_pt"] is True and o["resolution"] == 64 and o["sample_guidance"] == 7.0


def test_the_command_line_refuses_a_choice_out_of_its_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train-text", "--precision", "fp8"])
    assert exc.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def _defaults():
    args = build_parser().parse_args(["train-text", "--model", "m", "--data", "d"])
    return resolve_options(args, train_text.OPTIONS)

