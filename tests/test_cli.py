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


def test_convert_keeps_hnkit_facts_refuses_overwrites_and_follows_the_extension(tmp_path, capsys):
    hn = Hypernetwork(keys=[8], name="ink", family="llama", base_model="SmolLM2-135M", description="a test")
    hnkit.save(hn, tmp_path / "ink.safetensors")
    assert main(["convert", str(tmp_path / "ink.safetensors"), str(tmp_path / "ink.pt")]) == 0
    assert main(["convert", str(tmp_path / "ink.pt"), str(tmp_path / "back.safetensors")]) == 0
    back = hnkit.load(tmp_path / "back.safetensors")
    assert (back.family, back.base_model, back.description) == ("llama", "SmolLM2-135M", "a test")
    capsys.readouterr()
    before = (tmp_path / "ink.pt").read_bytes()
    bad = {
        "already exists": ["convert", tmp_path / "back.safetensors", tmp_path / "ink.pt"],
        "does not match the extension": ["convert", tmp_path / "ink.pt", tmp_path / "x.safetensors", "--format", "a1111"],
        "unknown extension .ckpt": ["convert", tmp_path / "ink.pt", tmp_path / "x.ckpt"],
        "is a file, not a folder": ["convert", tmp_path / "ink.pt", tmp_path / "ink.pt" / "x.safetensors"],
    }
    for words, args in bad.items():
        assert main(list(map(str, args))) == 2, words
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert (tmp_path / "ink.pt").read_bytes() == before and not (tmp_path / "x.safetensors").exists()
    assert main(["convert", str(tmp_path / "back.safetensors"), str(tmp_path / "ink.pt"), "--force"]) == 0


def test_export_without_peft_is_one_line(tmp_path, capsys, monkeypatch):
    """`hnkit export --format peft` where peft is not installed: one line naming the extra, exit 2."""
    style = tmp_path / "s.safetensors"
    hnkit.save(Hypernetwork(HypernetworkConfig(), [64]), style)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    assert main(["export", str(style), "--format", "peft", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the peft package: pip install 'hnkit[export]'" in err
    assert not (tmp_path / "out").exists()
