"""Where a .pt loads as is (hnkit.compat): the web UI and ComfyUI, one test per rule; save and
convert warn once, inspect shows a "loads in" section."""

import warnings

import pytest
import torch

import hnkit
from hnkit import Hypernetwork, HypernetworkConfig
from hnkit.checkpoint import to_a1111
from hnkit.commands.cli import main
from hnkit.compat import (COMFYUI, WEB_UI, PortabilityWarning, comfyui_dropouts, where_dict_loads,
                          where_it_loads)

WIDTHS = [768, 320]


def network(**options) -> Hypernetwork:
    torch.manual_seed(0)
    return Hypernetwork(HypernetworkConfig(**options), WIDTHS, name="ink")


def verdicts(report) -> dict:
    """program -> "yes" / "no" / "differently"."""
    return {p: "yes" if not probs else "no" if any(x.refused for x in probs) else "differently"
            for p, probs in report.items()}


def saved_quietly(hn, path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        return hnkit.save(hn, path)


def saved_with_one_warning(hn, path) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hnkit.save(hn, path)
    assert len(caught) == 1 and caught[0].category is PortabilityWarning, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "\n" not in message and message.startswith(str(path))
    return message


def inspected(path, capsys, monkeypatch) -> dict:
    """The "loads in" rows of ``hnkit inspect path``: label -> value."""
    monkeypatch.setenv("COLUMNS", "400")  # one table row a line
    assert main(["inspect", str(path)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return {k: rows[k] for k in ("loads in", WEB_UI, COMFYUI)}


# -- files that load as is -------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {},  # train-image's default: linear [1, 2, 1]
    {"activation": "relu"}, {"activation": "swish"}, {"activation": "softsign"}, {"activation": "mish"},
    {"activation": "relu", "activate_output": True},
    {"activation": "tanh", "layer_norm": True, "activate_output": True},
    {"layer_norm": True},  # linear with layer norm: no activation anywhere
    {"layer_structure": [1, 0.125, 1], "activation": "relu"},
])
def test_networks_that_load_as_is_write_no_warning(tmp_path, options, capsys, monkeypatch):
    hn = network(**options)
    assert where_it_loads(hn) == {WEB_UI: [], COMFYUI: []}
    saved_quietly(hn, tmp_path / "ink.pt")
    rows = inspected(tmp_path / "ink.pt", capsys, monkeypatch)
    assert rows == {"loads in": "as is", WEB_UI: "yes", COMFYUI: "yes"}


def test_a_linear_pt_says_linear_and_converts_without_a_warning(tmp_path, capsys):
    hn = network()
    assert to_a1111(hn)["activation_func"] == "linear"  # ComfyUI refuses None
    hnkit.save(hn, tmp_path / "ink.safetensors")
    assert main(["convert", str(tmp_path / "ink.safetensors"), str(tmp_path / "ink.pt")]) == 0
    assert capsys.readouterr().err == ""


# -- one test per rule -----------------------------------------------------------------------------
def test_an_activation_comfyui_does_not_know_is_refused_there_only(tmp_path):
    hn = network(activation="gelu")
    report = where_it_loads(hn)
    assert verdicts(report) == {WEB_UI: "yes", COMFYUI: "no"}  # the web UI knows every torch activation
    assert "'gelu'" in report[COMFYUI][0].text and "mish" in report[COMFYUI][0].text
    message = saved_with_one_warning(hn, tmp_path / "ink.pt")
    assert "ComfyUI will not load it" in message and "gelu" in message and "web UI" not in message


def test_an_activation_the_web_ui_does_not_know():
    data = {**to_a1111(network()), "activation_func": "wobble"}
    assert verdicts(where_dict_loads(data)) == {WEB_UI: "no", COMFYUI: "no"}
    weird = {**to_a1111(network()), "activation_func": ["relu"]}  # not even a name: still one clear line
    assert verdicts(where_dict_loads(weird)) == {WEB_UI: "no", COMFYUI: "no"}


def test_layer_norm_without_activate_output_loads_differently_in_comfyui(tmp_path):
    hn = network(activation="relu", layer_norm=True)
    report = where_it_loads(hn)
    assert verdicts(report) == {WEB_UI: "yes", COMFYUI: "differently"}
    assert "layer norm" in report[COMFYUI][0].text and "after the last layer" in report[COMFYUI][0].text
    message = saved_with_one_warning(hn, tmp_path / "ink.pt")
    assert "ComfyUI loads it differently" in message


def test_dropout_loads_differently_in_comfyui(tmp_path):
    hn = network(activation="relu", dropout_structure=[0, 0.1, 0])
    report = where_it_loads(hn)
    assert verdicts(report) == {WEB_UI: "yes", COMFYUI: "differently"}
    assert "dropout" in report[COMFYUI][0].text
    deep = network(layer_structure=[1, 2, 2, 1], dropout_structure=[0, 0.3, 0, 0])
    assert verdicts(where_it_loads(deep)) == {WEB_UI: "yes", COMFYUI: "differently"}
    saved_with_one_warning(deep, tmp_path / "deep.pt")


@pytest.mark.parametrize("structure, layer_norm, last_layer_dropout, expected", [
    ([1, 2, 1], False, False, 0),  # use_dropout alone adds nothing to a two-layer network
    ([1, 2, 1], False, True, 1),
    ([1, 2, 2, 1], False, False, 1),
    ([1, 2, 2, 1], False, True, 2),
    ([1, 2, 1], True, False, 1),  # with layer norm the first Linear is never the last but one
    ([1, 2, 1], True, True, 2),  # ... and the last Linear is: dropout after the output too
])
def test_where_comfyui_puts_dropout(structure, layer_norm, last_layer_dropout, expected):
    data = {**to_a1111(network(layer_structure=structure, layer_norm=layer_norm)),
            "use_dropout": True, "last_layer_dropout": last_layer_dropout}
    assert comfyui_dropouts(data) == expected
    assert verdicts(where_dict_loads(data))[COMFYUI] == ("yes" if expected == 0 else "differently")


def test_per_site_and_low_rank_networks_have_no_pt(tmp_path, capsys, monkeypatch):
    per_site = Hypernetwork(HypernetworkConfig(per_site=True), ["a.attn"], widths={"a.attn": 8})
    low_rank = Hypernetwork(HypernetworkConfig(form="lowrank", rank=2), [8])
    for hn, kind in [(per_site, "per-site"), (low_rank, "'lowrank'")]:
        report = where_it_loads(hn)
        assert verdicts(report) == {WEB_UI: "no", COMFYUI: "no"} and kind in report[WEB_UI][0].text
    hnkit.save(low_rank, tmp_path / "low.safetensors")
    rows = inspected(tmp_path / "low.safetensors", capsys, monkeypatch)
    assert rows["loads in"].startswith("as a .pt") and rows[COMFYUI].startswith("no: a 'lowrank' network")


# -- files written by older programs -----------------------------------------------------------------
def old_file(path, activation, **changes):
    """A .pt as an older program wrote it: hnkit's dict with ``changes`` (``...``: the key left out)."""
    data = to_a1111(network(activation=activation))
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    torch.save(data, path)
    return path


def test_an_old_file_without_activate_output(tmp_path, capsys, monkeypatch):
    # The web UI (and hnkit) read it as True, ComfyUI as False: the last activation goes missing there.
    pt = old_file(tmp_path / "old.pt", "relu", activate_output=...)
    rows = inspected(pt, capsys, monkeypatch)
    assert rows[WEB_UI] == "yes" and rows[COMFYUI].startswith("differently: the file has no activate_output")
    assert main(["convert", str(pt), str(tmp_path / "new.pt")]) == 0  # written with activate_output: True
    assert capsys.readouterr().err == ""
    assert verdicts(where_dict_loads(torch.load(tmp_path / "new.pt", weights_only=True))) == {
        WEB_UI: "yes", COMFYUI: "yes"}
    data = to_a1111(network(activation="relu", layer_norm=True, activate_output=True))
    del data["activate_output"]  # with layer norm ComfyUI puts the last activation in anyway: they agree
    assert verdicts(where_dict_loads(data)) == {WEB_UI: "yes", COMFYUI: "yes"}


def test_an_old_file_with_activation_none(tmp_path, capsys, monkeypatch):
    pt = old_file(tmp_path / "old.pt", None, activation_func=None)  # older hnkit wrote None
    rows = inspected(pt, capsys, monkeypatch)
    assert rows[WEB_UI] == "yes" and rows[COMFYUI].startswith("no: activation_func is None")
    assert main(["convert", str(pt), str(tmp_path / "new.pt")]) == 0
    assert capsys.readouterr().err == ""
    assert torch.load(tmp_path / "new.pt", weights_only=True)["activation_func"] == "linear"
    missing = old_file(tmp_path / "missing.pt", None, activation_func=...)
    assert inspected(missing, capsys, monkeypatch)[COMFYUI] == "yes"  # no key at all is linear there


# -- the command line ------------------------------------------------------------------------------
def test_convert_warns_once_in_one_line(tmp_path, capsys, monkeypatch):
    hnkit.save(network(activation="gelu", layer_norm=True), tmp_path / "ink.safetensors")
    rows = inspected(tmp_path / "ink.safetensors", capsys, monkeypatch)
    assert rows == {"loads in": "as a .pt (hnkit convert ink.safetensors ink.pt)", WEB_UI: "yes",
                    COMFYUI: rows[COMFYUI]} and rows[COMFYUI].startswith("no: it knows only")
    assert main(["convert", str(tmp_path / "ink.safetensors"), str(tmp_path / "ink.pt")]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {tmp_path / 'ink.pt'}\n"
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"hnkit: warning: {tmp_path / 'ink.pt'}: ")
    assert "ComfyUI will not load it" in captured.err and "gelu" in captured.err
    assert main(["convert", str(tmp_path / "ink.pt"), str(tmp_path / "back.safetensors")]) == 0
    assert capsys.readouterr().err == ""  # only a .pt is for the web UI and ComfyUI
