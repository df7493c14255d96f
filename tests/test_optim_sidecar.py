"""The web UI's optimizer sidecar, ``x.pt.optim``: read safely, written back with the new hash."""

import hashlib
import warnings

import pytest
import torch

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig
from hnkit.commands.cli import main


class NotData:
    """Something a weights_only unpickler must refuse to build."""


def short_hash(path):
    """The web UI's hypernetwork hash: 10 hex digits of the file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def trained_optimizer(hn):
    opt = torch.optim.AdamW(hn.parameters(), lr=1e-3)
    for p in hn.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def web_ui_files(tmp_path, name="ink"):
    """A .pt and the sidecar the web UI writes beside it."""
    torch.manual_seed(0)
    hn = Hypernetwork(HypernetworkConfig([1, 2, 1], "relu"), [768, 320], name=name)
    pt = tmp_path / f"{name}.pt"
    hnkit.save(hn, pt)
    opt = trained_optimizer(hn)
    torch.save({"hash": short_hash(pt), "optimizer_name": "AdamW", "optimizer_state_dict": opt.state_dict()},
               tmp_path / f"{name}.pt.optim")
    return pt, opt


def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key, value in a["state"][i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][i][key]))


def test_sidecar_is_read_and_written_back_by_convert(tmp_path, capsys):
    pt, opt = web_ui_files(tmp_path)
    hn = hnkit.load(pt)
    assert hn.optimizer_state["optimizer_name"] == "AdamW"
    assert_same_state(hn.optimizer_state["optimizer_state_dict"], opt.state_dict())

    assert main(["convert", str(pt), str(tmp_path / "copy.pt")]) == 0
    assert "copy.pt.optim" in capsys.readouterr().out
    written = torch.load(tmp_path / "copy.pt.optim", weights_only=True)
    assert set(written) == {"hash", "optimizer_name", "optimizer_state_dict"}
    assert written["hash"] == short_hash(tmp_path / "copy.pt")  # what the web UI checks
    assert_same_state(written["optimizer_state_dict"], opt.state_dict())
    # ... and the state resumes an optimizer over the loaded network.
    again = hnkit.load(tmp_path / "copy.pt")
    fresh = torch.optim.AdamW(again.parameters(), lr=1e-3)
    fresh.load_state_dict(again.optimizer_state["optimizer_state_dict"])

    assert main(["convert", str(pt), str(tmp_path / "ink.safetensors")]) == 0
    assert "not carried" in capsys.readouterr().out
    assert not (tmp_path / "ink.safetensors.optim").exists()


def test_save_writes_the_state_of_a_training_run(tmp_path):
    torch.manual_seed(0)
    hn = Hypernetwork(keys=[64])
    opt = trained_optimizer(hn)
    hn.optimizer_state = {"optimizer_name": "AdamW", "optimizer_state_dict": opt.state_dict()}
    hnkit.save(hn, tmp_path / "run.pt")
    sidecar = torch.load(tmp_path / "run.pt.optim", weights_only=True)
    assert sidecar["hash"] == short_hash(tmp_path / "run.pt")
    hnkit.save(hn, tmp_path / "run.safetensors")  # the native format keeps training state elsewhere
    assert not (tmp_path / "run.safetensors.optim").exists()
    hn.optimizer_state = {"optimizer_name": "AdamW"}
    with pytest.raises(HnkitError, match="optimizer_state_dict"):
        hnkit.save(hn, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()  # checked before anything is written


def test_a_stale_sidecar_is_ignored_with_a_warning(tmp_path):
    pt, opt = web_ui_files(tmp_path)
    torch.save({"hash": "0123456789", "optimizer_name": "AdamW", "optimizer_state_dict": opt.state_dict()},
               tmp_path / "ink.pt.optim")
    with pytest.warns(UserWarning, match=r"ink.pt.optim: .*another version of ink.pt"):
        assert hnkit.load(pt).optimizer_state is None


def test_the_older_web_ui_hash_is_accepted(tmp_path):
    torch.manual_seed(0)
    big = Hypernetwork(keys=[1024])  # > 1 MiB, so the old hash reads real bytes
    pt = tmp_path / "old.pt"
    hnkit.save(big, pt)
    old_hash = hashlib.sha256(pt.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    torch.save({"hash": old_hash, "optimizer_state_dict": {"state": {}, "param_groups": []}}, tmp_path / "old.pt.optim")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = hnkit.load(pt).optimizer_state
    assert state["hash"] == old_hash and state["optimizer_name"] == "AdamW"  # the web UI's default name


@pytest.mark.parametrize("content, message", [
    (b"\x80\x04garbage", "refused optimizer state: .*corrupt: Unsupported operand"),
    ("truncated", "corrupt or truncated optimizer state"),
    ("not a dict", "not an optimizer state file"),
    ({"optimizer_state_dict": NotData()}, "refused optimizer state"),
])
def test_a_damaged_sidecar_is_a_one_line_error_naming_it(tmp_path, capsys, content, message):
    pt, _ = web_ui_files(tmp_path)
    sidecar = tmp_path / "ink.pt.optim"
    if content == "truncated":
        sidecar.write_bytes(sidecar.read_bytes()[:300])
    elif isinstance(content, bytes):
        sidecar.write_bytes(content)
    else:
        torch.save(content, sidecar)
    with pytest.raises(HnkitError, match=message) as err:
        hnkit.load(pt)
    assert str(err.value).startswith(f"{sidecar}: ") and "\n" not in str(err.value)
    assert main(["inspect", str(pt)]) == 2
    err = capsys.readouterr().err
    assert "ink.pt.optim" in err and err.count("\n") == 1


def test_inspect_shows_the_optimizer_state(tmp_path, capsys):
    pt, _ = web_ui_files(tmp_path)
    assert main(["inspect", str(pt)]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "AdamW" in out
