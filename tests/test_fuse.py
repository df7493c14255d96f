"""Fusing linear hypernetworks into the K/V weights, and merging several into one file."""

import pytest
import torch

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig
from hnkit.commands.cli import main

from conftest import FAMILIES, torch_hooks

LINEAR = HypernetworkConfig(layer_structure=[1, 2, 1], weight_init="XavierNormal")
DEEP_LINEAR = HypernetworkConfig(layer_structure=[1, 0.5, 0.25, 1], weight_init="XavierNormal")
RELU = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def net(model, config, name="hypernetwork", **kwargs):
    """A network for ``model`` with non-zero biases too (the inits leave them at 0), so that every
    bias term of a fold or merge is exercised."""
    hn = Hypernetwork.for_model(model, config, name=name, **kwargs)
    with torch.no_grad():
        for n, p in hn.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.1)
    return hn


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_attached_and_unfuse_restores_bit_exactly(family, load_tiny, ids):
    model = load_tiny(family)
    torch.manual_seed(0)
    a, b = net(model, LINEAR), net(model, DEEP_LINEAR)
    before = dict(model.named_parameters())
    base = logits(model, ids)
    styles = [(a, 0.7), (b, -0.4)]
    with hnkit.attach(model, styles):
        attached = logits(model, ids)
    with hnkit.fuse(model, styles) as fusion:
        assert fusion.fused and torch_hooks(model) == 0  # weights only, no hooks
        fused = logits(model, ids)
        if family in ("llama", "gptj", "gpt_neo", "qwen3", "gemma", "gemma2"):  # bias-less K/V projections
            assert any(n.endswith("k_proj.bias") for n, _ in model.named_parameters())  # get one while fused
        if family == "phi3":  # so does a bias-less fused QKV projection
            assert any(n.endswith("qkv_proj.bias") for n, _ in model.named_parameters())
    assert (attached - base).abs().max() > 1e-2  # the networks act
    torch.testing.assert_close(fused, attached, rtol=0, atol=1e-5)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # same objects
    assert torch.equal(logits(model, ids), base)


def test_fuse_sum_blend_and_layer_factors(load_tiny, ids):
    model = load_tiny("gpt2")
    torch.manual_seed(1)
    a, b = net(model, LINEAR), net(model, DEEP_LINEAR)
    styles = [(a, 1.2), (b, 0.5)]
    with hnkit.attach(model, styles, blend="sum", layers=[0.0, 1.5]):
        attached = logits(model, ids)
    w0, w1 = (model.transformer.h[i].attn.c_attn.weight for i in (0, 1))
    with hnkit.fuse(model, styles, blend="sum", layers=[0.0, 1.5]):
        fused = logits(model, ids)
        assert model.transformer.h[0].attn.c_attn.weight is w0  # factor 0: layer 0 left alone
        assert model.transformer.h[1].attn.c_attn.weight is not w1
    torch.testing.assert_close(fused, attached, rtol=0, atol=1e-5)


def test_fuse_refuses_what_it_cannot_do(load_tiny):
    model = load_tiny("llama")
    relu = net(model, RELU, name="inky")
    with pytest.raises(HnkitError, match="'inky' cannot be fused.*activation 'relu'"):
        hnkit.fuse(model, relu)
    norm = net(model, HypernetworkConfig(layer_norm=True))
    with pytest.raises(HnkitError, match="layer norm"):
        hnkit.fuse(model, norm)
    linear = net(model, LINEAR)
    with hnkit.attach(model, linear):
        with pytest.raises(HnkitError, match="attached"):
            hnkit.fuse(model, linear)
    with hnkit.fuse(model, linear):
        with pytest.raises(HnkitError, match="fused into its weights"):
            hnkit.attach(model, linear)
        with pytest.raises(HnkitError, match="already has a hypernetwork fused"):
            hnkit.fuse(model, linear)
    hnkit.fuse(model, linear)
    hnkit.unfuse(model)
    with pytest.raises(HnkitError, match="no fused hypernetwork"):
        hnkit.unfuse(model)
    with pytest.raises(HnkitError, match="widths"):
        hnkit.fuse(model, Hypernetwork(HypernetworkConfig(), [48]))


# -- merge -------------------------------------------------------------------------------------


def assert_merge_matches_sum(model, ids, styles, tmp_path, suffixes=(".safetensors", ".pt")):
    with hnkit.attach(model, styles, blend="sum"):
        expected = logits(model, ids)
    merged = hnkit.merge(styles)
    for suffix in suffixes:
        hnkit.save(merged, tmp_path / f"mix{suffix}")
        with hnkit.attach(model, hnkit.load(tmp_path / f"mix{suffix}")):
            torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-6)
    assert (expected - logits(model, ids)).abs().max() > 1e-3  # the blend acts
    return merged


def test_merge_side_by_side_reproduces_the_sum_blend(load_tiny, ids, tmp_path):
    model = load_tiny("llama")
    torch.manual_seed(0)
    a = net(model, RELU, name="a")
    b = net(model, HypernetworkConfig([1, 0.5, 1], "relu", weight_init="XavierNormal"), name="b")
    merged = assert_merge_matches_sum(model, ids, [(a, 0.6), (b, -0.4)], tmp_path)
    assert merged.config.layer_structure == [1, 2.5, 1] and merged.config.activation == "relu"
    assert merged[32][0].linear[0].weight.shape == (80, 32)
    assert "a*0.6 + b*-0.4" in merged.description


def test_merge_per_site_networks(load_tiny, ids, tmp_path):
    model = load_tiny("gpt_neox")
    torch.manual_seed(0)
    config = HypernetworkConfig([1, 0.25, 0.25, 1], "tanh", weight_init="XavierNormal", per_site=True)
    a = net(model, config)
    b = Hypernetwork(config, ["layers.1.attention"], widths={"layers.1.attention": 32})  # b skips layer 0
    merged = assert_merge_matches_sum(model, ids, [(a, 1.0), (b, 0.5)], tmp_path, suffixes=(".safetensors",))
    assert merged.config.per_site and merged.config.layer_structure == [1, 0.5, 0.5, 1]
    assert merged.keys() == ["layers.0.attention", "layers.1.attention"]


def test_merge_folds_linear_networks(load_tiny, ids, tmp_path):
    model = load_tiny("gpt2")
    torch.manual_seed(0)
    a, b = net(model, LINEAR), net(model, DEEP_LINEAR)
    merged = assert_merge_matches_sum(model, ids, [(a, 0.6), (b, 0.4)], tmp_path)
    assert merged.config.layer_structure == [1, 1]  # different depths: one square affine layer
    with hnkit.attach(model, [(a, 0.6), (b, 0.4)], blend="chain"):
        chained = logits(model, ids)
    with hnkit.attach(model, hnkit.merge([(a, 0.6), (b, 0.4)], blend="chain")):
        torch.testing.assert_close(logits(model, ids), chained, rtol=0, atol=1e-6)


def test_merge_refuses_what_has_no_exact_form(load_tiny):
    model = load_tiny("llama")
    relu, norm = net(model, RELU), net(model, HypernetworkConfig(layer_norm=True))
    tanh = net(model, HypernetworkConfig([1, 2, 1], "tanh"))
    deep = net(model, HypernetworkConfig([1, 2, 2, 1], "relu"))
    activated = net(model, HypernetworkConfig([1, 2, 1], "relu", activate_output=True))
    per_site = net(model, HypernetworkConfig(per_site=True))
    cases = [([(relu, 1), (norm, 1)], "sum", "layer norm"),
             ([(relu, 1), (tanh, 1)], "sum", "different activations"),
             ([(relu, 1), (deep, 1)], "sum", "different depths"),
             ([(relu, 1), (activated, 1)], "sum", "activate_output"),
             ([(relu, 1), (relu, 1)], "chain", "non-linear"),
             ([(relu, 1), (per_site, 1)], "sum", "per-site")]
    for styles, blend, message in cases:
        with pytest.raises(HnkitError, match=message):
            hnkit.merge(styles, blend=blend)


def test_merge_command(load_tiny, tmp_path, capsys):
    model = load_tiny("opt")
    torch.manual_seed(0)
    hnkit.save(net(model, RELU, name="a"), tmp_path / "a.safetensors")
    hnkit.save(net(model, RELU, name="b"), tmp_path / "b.pt")
    assert main(["merge", f"{tmp_path}/a.safetensors:0.6", f"{tmp_path}/b.pt:0.4", "-o", f"{tmp_path}/mix.pt"]) == 0
    assert "wrote" in capsys.readouterr().out
    mix = hnkit.load(tmp_path / "mix.pt")
    assert mix.name == "mix" and mix.config.layer_structure == [1, 4, 1]
    hnkit.save(net(model, HypernetworkConfig(layer_norm=True), name="n"), tmp_path / "n.pt")
    assert main(["merge", f"{tmp_path}/a.safetensors", f"{tmp_path}/n.pt", "-o", f"{tmp_path}/bad.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer norm" in err and not (tmp_path / "bad.pt").exists()
