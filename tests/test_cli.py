"""The command line: inspect and convert, and one-line errors with exit code 2."""

import subprocess
import sys

import torch

import hnkit
from hnkit import Hypernetwork, HypernetworkConfig
from hnkit.commands.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "hnkit", *map(str, args)], capture_output=True, text=True)


def test_convert_both_ways_is_lossless(tmp_path):
    torch.manual_seed(0)
    hn = Hypernetwork(HypernetworkConfig([1, 2, 1], "relu", layer_norm=True), [768, 320], name="ink", step=5)
    hnkit.save(hn, tmp_path / "ink.pt")
    assert main(["convert", str(tmp_path / "ink.pt"), str(tmp_path / "ink.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "ink.safetensors"), str(tmp_path / "back.pt")]) == 0
    a = torch.load(tmp_path / "ink.pt", weights_only=True)
    b = torch.load(tmp_path / "back.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(key, int):
            for sa, sb in zip(a[key], b[key]):
                assert all(torch.equal(sa[n], sb[n]) for n in sa) and list(sa) == list(sb)
        else:
            assert a[key] == b[key]


def test_inspect_prints_config(tmp_path, capsys):
    hnkit.save(Hypernetwork(HypernetworkConfig(activation="swish"), [640], name="x", step=3), tmp_path / "x.pt")
    assert main(["inspect", str(tmp_path / "x.pt")]) == 0
    out = capsys.readouterr().out
    assert "swish" in out and "640" in out and "3,280,640" in out  # 2 x (640*1280+1280 + 1280*640+640)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    r = run("inspect", tmp_path / "bad.pt")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "bad.pt" in r.stderr and "Traceback" not in r.stderr
    hnkit.save(Hypernetwork(keys=[8]), tmp_path / "a.pt")
    r = run("convert", tmp_path / "a.pt", tmp_path / "a.pt")
    assert r.returncode == 2 and "output is the input" in r.stderr
