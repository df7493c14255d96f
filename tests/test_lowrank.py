"""The low-rank module form (``x + s * (B (A x) + c)``), tested like the MLP, and the form seam."""

import json
import resource

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig, Stack
from hnkit.forms import FORMS, LowRankModule
from hnkit.module import ACTIVATIONS, HypernetworkModule, is_elementwise

from conftest import load_refused, refused_in_one_line

LOWRANK = HypernetworkConfig(form="lowrank", rank=4)
LINEAR = HypernetworkConfig(layer_structure=[1, 2, 1], weight_init="XavierNormal")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def trained(model, config=LOWRANK, seed=0, name="lowrank"):
    """A low-rank network whose B and c are no longer zero, as after training."""
    torch.manual_seed(seed)
    hn = Hypernetwork.for_model(model, config, name=name).eval()
    with torch.no_grad():
        for n, p in hn.named_parameters():
            if n.endswith(("up.weight", "up.bias")):
                p.normal_(0.0, 0.3)
    return hn


def test_the_module_starts_as_the_identity_and_computes_its_formula():
    m = LowRankModule(8, 3)
    assert m.down.weight.shape == (3, 8) and m.up.weight.shape == (8, 3) and m.up.bias.shape == (8,)
    assert m.down.weight.abs().sum() > 0 and not m.up.weight.any() and not m.up.bias.any()
    x = torch.randn(2, 5, 8)
    assert torch.equal(m(x), x) and torch.equal(m(x, 0.7), x)  # B = 0, c = 0: the identity, bit for bit
    with torch.no_grad():
        m.up.weight.normal_()
        m.up.bias.normal_()
    a, b, c = m.down.weight, m.up.weight, m.up.bias
    torch.testing.assert_close(m(x, 0.7), x + 0.7 * (x @ a.T @ b.T + c))
    M, c2 = m.affine()
    torch.testing.assert_close(m(x, 0.7), x + 0.7 * (x @ M.T + c2))
    assert m.is_affine and not m.has_dropout and not m.is_stack and m.dtype == torch.float32
    assert sorted(m.state_dict()) == ["down.weight", "up.bias", "up.weight"]
    assert FORMS["lowrank"] is LowRankModule and FORMS["mlp"] is HypernetworkModule


def test_stack_weights_are_the_two_layer_form_of_either_module():
    x = torch.randn(3, 8)
    for m in (HypernetworkModule(8, [1, 2, 1], "gelu", dropout_structure=[0, 0.3, 0]).eval(), LowRankModule(8, 3)):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        w1, b1, w2, b2 = m.stack_weights()
        h = torch.nn.functional.linear(x, w1, b1)
        h = h if m.stack_activation is None else torch.nn.functional.gelu(h)
        torch.testing.assert_close(torch.nn.functional.linear(h, w2, b2), m.residual(x))
    for m in (HypernetworkModule(8, [1, 2, 2, 1], "relu"), HypernetworkModule(8, [1, 2, 1], "relu", layer_norm=True),
              HypernetworkModule(8, [1, 2, 1], "relu", activate_output=True)):
        with pytest.raises(HnkitError, match="only two-layer modules"):
            m.stack_weights()


def test_break_even_pays_only_above_half_the_width():
    assert LowRankModule(64, 4).break_even_rows() is None  # already cheaper than a d x d product
    assert LowRankModule(64, 32).break_even_rows() is None
    assert LowRankModule(64, 48).break_even_rows() == 64 * 48 * 64 // (2 * 48 * 64 - 64 * 64) + 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_identity_strength_zero_and_remove_are_bit_identical(family, load_tiny, ids):
    model = load_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, ids)
    fresh = Hypernetwork.for_model(model, LOWRANK)
    with hnkit.attach(model, fresh):  # zero-initialised B and c: the bare model at strength 1
        assert torch.equal(logits(model, ids), base)
    hn = trained(model)
    with hnkit.attach(model, hn, strength=0.0) as handle:
        assert torch.equal(logits(model, ids), base)
        handle.strength = 1.0
        assert (logits(model, ids) - base).abs().max() > 1e-3
    assert torch.equal(logits(model, ids), base)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_gradients_reach_only_the_hypernetwork(load_tiny, ids):
    model = load_tiny("llama")
    hn = trained(model)
    with hnkit.attach(model, hn):
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hn.parameters())


def test_a_low_rank_network_takes_the_plain_kernel_unless_multiplying_out_pays(load_tiny, ids):
    from hnkit.kernels import Chain, Collapsed

    model = load_tiny("llama")  # K/V inputs of width 32
    for rank, kernel in [(4, Chain), (24, Collapsed)]:
        hn = trained(model, HypernetworkConfig(form="lowrank", rank=rank))
        with hnkit.attach(model, hn, strength=0.7, fast=False):
            plain = logits(model, ids)
        with hnkit.attach(model, hn, strength=0.7) as handle:
            assert [type(k) for k in handle.kernels] == [kernel]
            torch.testing.assert_close(logits(model, ids), plain, rtol=1e-5, atol=1e-5)


def test_per_row_strengths(load_tiny, ids):
    model = load_tiny("gpt2")
    hn = trained(model)
    base = logits(model, ids)
    with hnkit.attach(model, hn, strength=0.8):
        alone = logits(model, ids)
    with hnkit.attach(model, hn, strength=[0.0, 0.8]):
        mixed = logits(model, ids)
    assert torch.equal(mixed[0], base[0])  # a row at 0 is the bare model, bit for bit
    torch.testing.assert_close(mixed[1], alone[1], rtol=1e-5, atol=1e-5)


def test_save_and_load_round_trip_exactly(load_tiny, ids, tmp_path):
    model = load_tiny("gpt2")
    hn = trained(model, HypernetworkConfig(form="lowrank", rank=3, per_site=True))
    path = hnkit.save(hn, tmp_path / "lr.safetensors")
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["hnkit"])
    key = hn.keys()[0]
    assert {f"{key}.k.down.weight", f"{key}.k.up.weight", f"{key}.v.up.bias"} <= names
    assert meta["config"]["form"] == "lowrank" and meta["config"]["rank"] == 3
    back = hnkit.load(path)
    assert back.config == hn.config and back.keys() == hn.keys()
    assert isinstance(back[key][0], LowRankModule)
    sd, sd_back = hn.state_dict(), back.state_dict()
    assert list(sd) == list(sd_back) and all(torch.equal(sd[n], sd_back[n]) for n in sd)
    with hnkit.attach(model, hn):
        expected = logits(model, ids)
    with hnkit.attach(model, back):
        assert torch.equal(logits(model, ids), expected)
    assert "form='lowrank'" in repr(back) and "rank=3" in repr(back)


def test_an_mlp_file_does_not_mention_the_form(tmp_path):
    path = hnkit.save(Hypernetwork(LINEAR, [16]), tmp_path / "mlp.safetensors")
    with safe_open(path, framework="pt") as f:
        config = json.loads(f.metadata()["hnkit"])["config"]
    assert "form" not in config and "rank" not in config  # files older hnkit reads as before
    assert hnkit.load(path).config.form == "mlp"


def test_the_web_ui_pt_is_refused_in_one_line(load_tiny, tmp_path, capsys):
    model = load_tiny("gpt2")
    hn = trained(model)
    with pytest.raises(HnkitError) as err:
        hnkit.save(hn, tmp_path / "lr.pt")
    assert "\n" not in str(err.value) and "lr.safetensors" in str(err.value)
    assert not (tmp_path / "lr.pt").exists()
    hnkit.save(hn, tmp_path / "lr.safetensors")
    capsys.readouterr()  # the model's loading progress
    refused_in_one_line(["convert", str(tmp_path / "lr.safetensors"), str(tmp_path / "out.pt")], tmp_path,
                        capsys, "cannot be written as a web UI .pt")


@pytest.mark.parametrize("options,says", [
    (dict(form="lowrank"), "needs a rank"),
    (dict(form="lowrank", rank=0), "rank 0 is not an integer"),
    (dict(form="lowrank", rank=2.5), "rank 2.5 is not an integer"),
    (dict(form="lowrank", rank=True), "rank True is not an integer"),
    (dict(form="lowrank", rank=10 ** 9), "from 1 to 65536"),
    (dict(rank=4), "rank is an option of form 'lowrank' only"),
    (dict(form="lora", rank=4), "unknown module form 'lora'; known: mlp, lowrank"),
])
def test_a_bad_form_or_rank_is_one_line(options, says):
    with pytest.raises(HnkitError) as err:
        HypernetworkConfig(**options)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_rank_above_the_width_is_one_line(load_tiny):
    with pytest.raises(HnkitError, match=r"^rank 64 is larger than the input width 32; [^\n]*$"):
        Hypernetwork.for_model(load_tiny("gpt2"), HypernetworkConfig(form="lowrank", rank=64))


def _rewritten(source, target, config=None, tensors=None):
    """``source`` written again with its metadata's config and some tensors replaced."""
    with safe_open(source, framework="pt") as f:
        meta = json.loads(f.metadata()["hnkit"])
        data = {n: f.get_tensor(n) for n in f.keys()}
    meta["config"].update(config or {})
    data.update(tensors or {})
    save_file(data, target, metadata={"hnkit": json.dumps(meta)})
    return target


def test_hostile_low_rank_files_are_refused_before_anything_is_built(tmp_path):
    good = hnkit.save(Hypernetwork(LOWRANK, [32]), tmp_path / "good.safetensors")
    huge = hnkit.save(Hypernetwork(HypernetworkConfig(form="lowrank", rank=1), [60_000]), tmp_path / "h.safetensors")
    cases = [
        (_rewritten(good, tmp_path / "rank0.safetensors", {"rank": 0}), "rank 0 is not an integer"),
        (_rewritten(good, tmp_path / "big.safetensors", {"rank": 10 ** 12}), "from 1 to 65536"),
        (_rewritten(good, tmp_path / "wide.safetensors", {"rank": 33}), "larger than the input width 32"),
        (_rewritten(good, tmp_path / "other.safetensors", {"rank": 8}),
         "down.weight has shape (4, 32), expected (8, 32)"),
        (_rewritten(good, tmp_path / "mlp.safetensors", {"form": "mlp", "rank": None}), "do not match the layer"),
        # declares rank 60,000 at width 60,000 (a 14 GB pair) and holds rank-1 tensors: checked on the meta device
        (_rewritten(huge, tmp_path / "declared.safetensors", {"rank": 60_000}), "expected (60000, 60000)"),
    ]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path, says in cases:
        load_refused(path, says)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024 < 100  # MB: nothing was built


def test_fused_equals_attached_and_unfuse_restores(load_tiny, ids):
    model = load_tiny("llama")
    base = logits(model, ids)
    lowrank, linear = trained(model), Hypernetwork.for_model(model, LINEAR)
    assert lowrank.config.is_linear
    styles = [(lowrank, 0.7), (linear, -0.4)]
    with hnkit.attach(model, styles):
        attached = logits(model, ids)
    with hnkit.fuse(model, styles):
        fused = logits(model, ids)
    assert (attached - base).abs().max() > 1e-2
    torch.testing.assert_close(fused, attached, rtol=0, atol=1e-5)
    assert torch.equal(logits(model, ids), base)


def test_merge_folds_low_rank_networks_and_refuses_them_beside_non_linear_ones(load_tiny, ids):
    model = load_tiny("gpt2")
    a, b = trained(model, seed=0, name="a"), trained(model, HypernetworkConfig(form="lowrank", rank=2), 1, "b")
    styles = [(a, 0.6), (b, -0.5), (Hypernetwork.for_model(model, LINEAR), 0.3)]
    with hnkit.attach(model, styles, blend="sum"):
        expected = logits(model, ids)
    merged = hnkit.merge(styles)
    assert merged.config.form == "mlp" and merged.config.layer_structure == [1, 1]
    with hnkit.attach(model, merged):
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    relu = Hypernetwork.for_model(model, HypernetworkConfig(activation="relu"))
    with pytest.raises(HnkitError, match="form 'lowrank'"):
        hnkit.merge([(a, 1.0), (relu, 1.0)])


def test_stack_equals_the_sum_of_attached_members(load_tiny, ids):
    model = load_tiny("llama")
    nets = [trained(model, seed=i, name=f"s{i}") for i in range(3)]
    for hn in nets:  # non-zero A too, so that every stacked tensor carries its member's
        with torch.no_grad():
            for k in hn.keys():
                for m in hn[k]:
                    m.down.weight.normal_(0, 0.3)
    ids = torch.cat([ids, ids])
    bare = logits(model, ids)
    columns = [[0.0, 0.7, 0.0, -0.5], [0.0, 0.0, 1.5, 1.0], [0.0, 0.3, 0.0, 0.0]]
    with hnkit.attach(model, list(zip(nets, columns)), blend="sum"):
        plain = logits(model, ids)
    stack = Stack(nets)
    k = stack.pair_for(type("Site", (), {"width": 32, "key": None})())[0]
    assert k.w1.shape == (3, 4, 32) and k.w2.shape == (3, 4, 32) and not k.b1.any() and k.activation is None
    with hnkit.attach(model, stack, dict(zip(stack.names, columns)), blend="sum"):
        stacked = logits(model, ids)
    assert torch.equal(stacked[0], bare[0])
    torch.testing.assert_close(stacked, plain, rtol=1e-5, atol=1e-5)
    mlp = Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 0.125, 1]), name="mlp")
    with pytest.raises(HnkitError, match="forms"):  # H = 4 both, but another form
        Stack([nets[0], mlp])
    with pytest.raises(HnkitError, match="forms"):
        Stack([nets[0], trained(model, HypernetworkConfig(form="lowrank", rank=2), name="r2")])


def test_stack_and_merge_share_one_element_wise_rule():
    """For every activation a module can be built with, stacking and merging side by side accept it
    exactly when ``is_elementwise`` does: one rule (prelu, softmax, rrelu: refused by both)."""
    seen = {}
    for name in sorted(ACTIVATIONS):
        config = HypernetworkConfig(layer_structure=[1, 2, 1], activation=name)
        try:
            a, b = Hypernetwork(config, [8], name="a"), Hypernetwork(config, [8], name="b")
        except HnkitError:  # e.g. threshold needs arguments: no module can have it
            continue
        outcomes = []
        for attempt in (lambda: Stack([a, b]), lambda: hnkit.merge([(a, 1.0), (b, 1.0)])):
            try:
                attempt()
                outcomes.append(True)
            except HnkitError:
                outcomes.append(False)
        seen[name] = outcomes
        assert outcomes == [is_elementwise(name)] * 2, (name, outcomes)
    assert seen["gelu"] == [True, True] and seen["prelu"] == seen["softmax"] == seen["rrelu"] == [False, False]


def test_train_text_trains_a_low_rank_network(tiny_lm, tmp_path, capsys):
    from hnkit.commands.cli import main

    common = ["train-text", "--model", str(tiny_lm["model"]), "--data", str(tiny_lm["corpus"]), "--batch-size", "2",
              "--block-size", "16", "--max-steps", "2", "--lr", "1e-2", "--preserve-weight", "0"]
    out = tmp_path / "run"
    assert main([*common, "--output", str(out), "--form", "lowrank", "--rank", "2"]) == 0
    hn = hnkit.load(out / "hypernetwork.safetensors")
    assert hn.config.form == "lowrank" and hn.config.rank == 2 and hn.config.activation is None
    k = hn[hn.keys()[0]][0]
    assert isinstance(k, LowRankModule) and k.up.weight.abs().sum() > 0  # B left zero: it trained
    capsys.readouterr()
    for extra, says in [(["--rank", "2"], "--form mlp --rank 2: rank is an option of form 'lowrank' only"),
                        (["--form", "lowrank"], "--form lowrank --rank None: form 'lowrank' needs a rank")]:
        refused_in_one_line([*common, "--output", str(tmp_path / "bad"), *extra], tmp_path, capsys, says)


def test_module_config_of_a_low_rank_run():
    from hnkit.commands.options import module_config

    mlp_defaults = {"layer_structure": [1, 0.125, 1], "activation": "relu", "zero_init_last": True}
    config = module_config({**mlp_defaults, "form": "lowrank", "rank": 2, "per_site": True})
    assert (config.form, config.rank, config.per_site, config.activation) == ("lowrank", 2, True, None)
    assert module_config(mlp_defaults).form == "mlp"  # options without form and rank: the MLP
    with pytest.raises(HnkitError, match=r"^--save-pt: a 'lowrank' hypernetwork cannot be written as a web UI"):
        module_config({"form": "lowrank", "rank": 2, "save_pt": True})  # refused before training, not after


def test_inspect_shows_form_and_rank_of_a_low_rank_file(tmp_path, capsys):
    from hnkit.commands.cli import main

    hn = hnkit.Hypernetwork(hnkit.HypernetworkConfig(form="lowrank", rank=3), keys=[16])
    hnkit.save(hn, tmp_path / "lr.safetensors")
    assert main(["inspect", str(tmp_path / "lr.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "lowrank" in out and "rank" in out and "3" in out
    assert "layer structure" not in out  # the MLP's rows say nothing of a low-rank network
