"""``hnkit merge`` reads its styles like every other command (``FILE[:STRENGTH]``), with any finite
strength: a merge only computes weights, so hnkit serve's strength bound does not apply."""

import torch

import hnkit
from hnkit import Hypernetwork, HypernetworkConfig
from hnkit.commands.cli import main

from conftest import refused_in_one_line

LINEAR = HypernetworkConfig(layer_structure=[1, 1], activation="linear", weight_init="XavierNormal")


def two_files(folder):
    torch.manual_seed(0)
    a = hnkit.save(Hypernetwork(LINEAR, [16], name="a"), folder / "a.safetensors")
    b = hnkit.save(Hypernetwork(LINEAR, [16], name="b"), folder / "b.pt")
    return a, b


def test_merge_takes_strengths_beyond_the_serving_bound(tmp_path, capsys):
    a, b = two_files(tmp_path)
    assert main(["merge", f"{a}:6", f"{b}:-0.5", "-o", str(tmp_path / "mix.safetensors")]) == 0
    assert "2 networks merged (sum)" in capsys.readouterr().out
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = 6 * hnkit.load(a)[16][0].linear[0](x) - 0.5 * hnkit.load(b)[16][0].linear[0](x)
        got = hnkit.load(tmp_path / "mix.safetensors")[16][0].linear[0](x)
    torch.testing.assert_close(got, want)


def test_merge_refuses_bad_styles_in_one_line_and_writes_nothing(tmp_path, capsys):
    a, b = two_files(tmp_path)
    out = str(tmp_path / "mix.pt")
    refused_in_one_line(["merge", f"{a}:0.5", str(b), "-o", str(b)], tmp_path, capsys, "output is one of the inputs")
    refused_in_one_line(["merge", f"{a}:lots", str(b), "-o", out], tmp_path, capsys, "bad strength 'lots'")
    refused_in_one_line(["merge", f"{a}:nan", str(b), "-o", out], tmp_path, capsys, "finite")
    refused_in_one_line(["merge", str(a), str(tmp_path / "missing.pt"), "-o", out], tmp_path, capsys,
                        "missing.pt: no such file")
