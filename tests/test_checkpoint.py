"""The native .safetensors and the SD web UI's .pt: exact round trips, legacy files, safe loading."""

import collections
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig
from hnkit.checkpoint import to_a1111

MIXES = [
    HypernetworkConfig(),
    HypernetworkConfig([1, 2, 1], "relu", layer_norm=True, dropout_structure=[0, 0.3, 0], weight_init="XavierNormal"),
    HypernetworkConfig([1, 1.5, 2, 1], "swish", use_dropout=True, last_layer_dropout=True, activate_output=True,
                       weight_init="KaimingUniform"),
    HypernetworkConfig([1, 2, 1], "gelu", layer_norm=True, activate_output=True),
]


def assert_same_weights(a: Hypernetwork, b: Hypernetwork):
    assert a.keys() == b.keys()
    for key in a.keys():
        for ma, mb in zip(a[key], b[key]):
            sa, sb = ma.state_dict(), mb.state_dict()
            assert list(sa) == list(sb)
            assert all(torch.equal(sa[n], sb[n]) and sa[n].dtype == sb[n].dtype for n in sa)


def web_ui_dict(hn):
    """What the web UI writes, built by hand from the spec (not through hnkit's writer)."""
    c = hn.config
    d = {w: (hn[w][0].state_dict(), hn[w][1].state_dict()) for w in hn.keys()}
    # the web UI's create tab names a linear network "linear" (never None)
    d.update(step=hn.step, name=hn.name, layer_structure=c.layer_structure, activation_func=c.activation or "linear",
             is_layer_norm=c.layer_norm, weight_initialization=c.weight_init, sd_checkpoint="abc123",
             sd_checkpoint_name="model-v1", activate_output=c.activate_output, use_dropout=c.use_dropout,
             dropout_structure=c.dropout_structure, last_layer_dropout=c.dropout_structure[-2] != 0,
             optional_info="made by hand")
    return d


@pytest.mark.parametrize("config", MIXES)
def test_safetensors_round_trip_is_exact(config, tmp_path):
    torch.manual_seed(0)
    hn = Hypernetwork(config, [768, 320, 640], name="style", step=42, family="unet", base_model="sd15",
                      description="a test", extra={"sd_checkpoint": "abc"})
    path = hnkit.save(hn, tmp_path / "style.safetensors")
    back = hnkit.load(path)
    assert_same_weights(hn, back)
    assert back.config == hn.config
    for attr in ("name", "step", "family", "base_model", "base_model_hash", "description", "extra"):
        assert getattr(back, attr) == getattr(hn, attr)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["hnkit"])
        assert "768.k.linear.0.weight" in f.keys()
    assert meta["format_version"] == 1 and meta["keys"] == [768, 320, 640] and meta["step"] == 42


def test_per_site_safetensors_round_trip(tmp_path):
    keys = ["layers.0.self_attn", "layers.1.self_attn"]
    hn = Hypernetwork(HypernetworkConfig(per_site=True), keys, widths=dict.fromkeys(keys, 16))
    back = hnkit.load(hnkit.save(hn, tmp_path / "sites.safetensors"))
    assert_same_weights(hn, back)
    assert back.keyed_by == "site" and back.width_of(keys[1]) == 16
    with pytest.raises(HnkitError, match="per-site"):
        hnkit.save(hn, tmp_path / "sites.pt")
    assert not (tmp_path / "sites.pt").exists()


@pytest.mark.parametrize("config", MIXES)
def test_web_ui_pt_round_trip_is_exact(config, tmp_path):
    torch.manual_seed(0)
    hn = hnkit.load(_save_pt(web_ui_dict(Hypernetwork(config, [768, 320], name="anime", step=7)), tmp_path / "a.pt"))
    assert hn.config.layer_structure == config.layer_structure
    assert hn.config.activation == (config.activation or "linear")
    assert hn.extra == {"sd_checkpoint": "abc123", "sd_checkpoint_name": "model-v1", "optional_info": "made by hand"}
    hnkit.save(hn, tmp_path / "b.pt")
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert _plain(a) == _plain(b)
    # and through the native format and back to .pt: nothing lost
    hnkit.save(hnkit.load(hnkit.save(hn, tmp_path / "c.safetensors")), tmp_path / "d.pt")
    assert _plain(torch.load(tmp_path / "d.pt", weights_only=True)) == _plain(a)


def test_linear_network_is_written_as_linear_for_comfyui(tmp_path):
    """ComfyUI refuses ``activation_func: None`` ("Unsupported Hypernetwork format"); the web UI writes "linear"."""
    hn = Hypernetwork(HypernetworkConfig(), [768, 320])
    assert hn.config.activation is None
    raw = torch.load(hnkit.save(hn, tmp_path / "lin.pt"), weights_only=True)
    assert raw["activation_func"] == "linear"
    # through the native format too (hnkit convert)
    converted = hnkit.save(hnkit.load(hnkit.save(hn, tmp_path / "lin.safetensors")), tmp_path / "c.pt")
    raw = torch.load(converted, weights_only=True)
    assert raw["activation_func"] == "linear"


def test_a_file_with_activation_none_reads_as_linear_and_is_written_back_as_linear(tmp_path):
    """Exact round trip, one exception: a file that says None (older hnkit, hand-made files) is
    written back with "linear", which means the same to the web UI and is what ComfyUI reads."""
    torch.manual_seed(0)
    a = web_ui_dict(Hypernetwork(HypernetworkConfig(), [768, 320], name="old", step=3))
    a["activation_func"] = None
    hn = hnkit.load(_save_pt(a, tmp_path / "a.pt"))
    assert hn.config.is_linear
    b = torch.load(hnkit.save(hn, tmp_path / "b.pt"), weights_only=True)
    assert b["activation_func"] == "linear"
    assert _plain({**b, "activation_func": None}) == _plain(a)  # nothing else changed
    x = torch.randn(2, 5, 768)
    assert torch.equal(hn[768][0](x), hnkit.load(tmp_path / "b.pt")[768][0](x))


def _save_pt(data, path):
    torch.save(data, path)
    return path


def _plain(d):
    """A comparable form of a .pt dict: tensors as (dtype, shape, bytes)."""
    if isinstance(d, torch.Tensor):
        return (str(d.dtype), tuple(d.shape), d.numpy().tobytes())
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return type(d)(_plain(v) for v in d)
    return d


def test_metadata_defaults_when_missing(tmp_path):
    torch.manual_seed(0)
    full = Hypernetwork(HypernetworkConfig([1, 2, 1], "relu", activate_output=True), [64])
    data = {64: (full[64][0].state_dict(), full[64][1].state_dict()), "activation_func": "relu"}
    hn = hnkit.load(_save_pt(data, tmp_path / "old_style.pt"))
    c = hn.config
    assert (hn.name, hn.step) == ("old_style", 0)
    assert c.layer_structure == [1, 2, 1] and not c.layer_norm and c.weight_init == "Normal"
    assert c.activate_output is True  # files older than the option keep an activated last layer
    assert [type(m).__name__ for m in hn[64][0].linear] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert not c.use_dropout and c.dropout_structure == [0, 0, 0]
    assert hn.extra == {"sd_checkpoint": None, "sd_checkpoint_name": None, "optional_info": None}


def test_legacy_dropout_placement_changes_key_names(tmp_path):
    # use_dropout without dropout_structure: [0, 0.3, 0, 0] for [1, 2, 2, 1], Dropout after the first step.
    ref = Hypernetwork(HypernetworkConfig([1, 2, 2, 1], "relu", dropout_structure=[0, 0.3, 0, 0]), [8])
    sd = ref[8][0].state_dict()
    assert "linear.3.weight" in sd  # Linear, ReLU, Dropout, Linear, ...
    data = {8: (sd, ref[8][1].state_dict()), "layer_structure": [1, 2, 2, 1], "activation_func": "relu",
            "use_dropout": True, "activate_output": False}
    hn = hnkit.load(_save_pt(data, tmp_path / "legacy.pt"))
    assert hn.config.dropout_structure == [0, 0.3, 0, 0] and hn.config.use_dropout
    assert_same_weights(ref, hn)


def test_oldest_files_linear1_linear2(tmp_path):
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    sd = collections.OrderedDict([("linear1.weight", w1), ("linear1.bias", b1),
                                  ("linear2.weight", w2), ("linear2.bias", b2)])
    hn = hnkit.load(_save_pt({8: (sd, sd)}, tmp_path / "ancient.pt"))
    assert hn.config.layer_structure == [1, 2, 1] and hn.config.is_linear and hn.name == "ancient"
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(hn[8][0](x), x + (x @ w1.T + b1) @ w2.T + b2)
    hnkit.save(hn, tmp_path / "renamed.pt")
    assert torch.equal(torch.load(tmp_path / "renamed.pt", weights_only=True)[8][0]["linear.1.weight"], w2)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    hn = Hypernetwork(keys=[8])
    data = to_a1111(hn)
    data["optional_info"] = _Evil(marker)
    torch.save(data, path)
    with pytest.raises(HnkitError) as err:
        hnkit.load(path)
    msg = str(err.value)
    assert str(path) in msg and "refused" in msg and "GLOBAL posix.mkdir" in msg and "\n" not in msg
    assert not os.path.exists(marker)
    # a plain pickle file (not a torch zip) as well
    with open(tmp_path / "evil2.pt", "wb") as f:
        pickle.dump(_Evil(marker), f, protocol=2)
    with pytest.raises(HnkitError, match="evil2.pt"):
        hnkit.load(tmp_path / "evil2.pt")
    assert not os.path.exists(marker)


def _one_line_error(path, match):
    with pytest.raises(HnkitError) as err:
        hnkit.load(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert match in msg, msg


def test_bad_files_give_one_clear_error(tmp_path):
    hn = Hypernetwork(keys=[8])
    good_st = hnkit.save(hn, tmp_path / "good.safetensors").read_bytes()
    good_pt = hnkit.save(hn, tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good_st[: len(good_st) // 2])
    (tmp_path / "trunc.pt").write_bytes(good_pt[: len(good_pt) // 2])
    (tmp_path / "noise.pt").write_bytes(os.urandom(2000))
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(2000))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()
    _one_line_error(tmp_path / "trunc.safetensors", "corrupt or truncated")
    _one_line_error(tmp_path / "trunc.pt", "corrupt or truncated")
    _one_line_error(tmp_path / "noise.pt", "corrupt")
    _one_line_error(tmp_path / "noise.safetensors", "corrupt")
    _one_line_error(tmp_path / "empty.pt", "empty")
    _one_line_error(tmp_path / "folder.pt", "is a directory")
    _one_line_error(tmp_path / "missing.pt", "no such file")
    torch.save({"state_dict": {}}, tmp_path / "model.ckpt")
    _one_line_error(tmp_path / "model.ckpt", "not a hypernetwork file")
    data = to_a1111(hn)
    data["activation_func"] = "swoosh"
    _one_line_error(_save_pt(data, tmp_path / "act.pt"), "unknown activation 'swoosh'")
    data = to_a1111(hn)
    data["layer_structure"] = [1, 3, 1]  # weights were made for [1, 2, 1]
    _one_line_error(_save_pt(data, tmp_path / "shape.pt"), "has shape")


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keep.pt"
    hnkit.save(Hypernetwork(keys=[8], name="first"), path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        hnkit.save(Hypernetwork(keys=[8], name="second"), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.pt"]  # no temporary file left behind


def _st_with_meta(path, hn, edit):
    """hnkit's .safetensors of ``hn`` with its metadata passed through ``edit``."""
    from safetensors.torch import load_file, save_file

    hnkit.save(hn, path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["hnkit"])
    save_file(load_file(str(path)), str(path), metadata={"hnkit": json.dumps(edit(meta))})
    return path


def test_hostile_descriptions_are_refused_before_memory_is_spent(tmp_path):
    import resource

    hn = Hypernetwork(keys=[8])
    # A [1, 64, 1] network at width 2048 declares 1 GB per layer; its tensors are a few hundred bytes.
    data = to_a1111(hn)
    data[2048] = data.pop(8)
    data["layer_structure"] = [1, 64, 1]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _one_line_error(_save_pt(data, tmp_path / "huge.pt"), "has shape")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: under 100 MB
    cases = {
        "deep": dict(layer_structure=[1] + [2] * 40 + [1]),
        "wide": dict(layer_structure=[1, 10 ** 6, 1]),
        "dropout5": dict(dropout_structure=5),
        "negative": {-8: to_a1111(hn)[8]},
    }
    for name, change in cases.items():
        data = to_a1111(hn)
        if name == "negative":
            del data[8]
        data.update(change)
        _one_line_error(_save_pt(data, tmp_path / f"{name}.pt"), "")
    for name, edit in {"list": lambda m: [m], "keys": lambda m: {**m, "keys": "8"},
                       "fewer": lambda m: {**m, "keys": []}}.items():
        _one_line_error(_st_with_meta(tmp_path / f"{name}.safetensors", hn, edit), "")
    per_site = Hypernetwork(HypernetworkConfig(per_site=True), ["h.0.attn"], widths={"h.0.attn": 8})
    for name, width in {"huge": 10 ** 9, "zero": 0, "text": "8"}.items():
        path = _st_with_meta(tmp_path / f"site-{name}.safetensors", per_site, lambda m: {**m, "widths": [width]})
        _one_line_error(path, "input width")


def test_weights_that_are_not_finite_floats_are_refused(tmp_path):
    hn = Hypernetwork(keys=[8])
    for name, tensor in {"nan": torch.full((16, 8), float("nan")), "inf": torch.full((16, 8), float("inf")),
                         "int": torch.ones(16, 8, dtype=torch.int64), "bool": torch.ones(16, 8, dtype=torch.bool),
                         "complex": torch.ones(16, 8, dtype=torch.complex64)}.items():
        data = to_a1111(hn)
        data[8][0]["linear.0.weight"] = tensor
        _one_line_error(_save_pt(data, tmp_path / f"{name}.pt"), "NaN or infinite" if name in ("nan", "inf") else "floating point")
    for dtype in (torch.float16, torch.bfloat16):  # half-precision files load as before
        data = to_a1111(hn)
        data[8] = tuple({k: v.to(dtype) for k, v in sd.items()} for sd in data[8])
        hnkit.load(_save_pt(data, tmp_path / f"{dtype}.pt"))
