"""The adapter core on every supported family: identity, gradients, cache, checkpointing, exactness."""

import copy

import pytest
import torch

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig
from hnkit.models import enable_gradient_checkpointing
from hnkit.targets import find_sites

from conftest import FAMILIES, grads_of, unpacked_run, with_biases

# A hypernetwork strong enough to change the model visibly.
STRONG = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_and_remove_are_bit_identical(family, load_tiny, ids):
    model = load_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, ids)
    hn = Hypernetwork.for_model(model, STRONG)
    with hnkit.attach(model, hn, strength=0.0) as handle:
        assert torch.equal(logits(model, ids), base)
        assert list(model.state_dict()) == list(before)  # never registered inside the model
        handle.strength = 1.0
        assert not torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), base)
    handle = hnkit.attach(model, hn, strength=0.8)
    handle.remove()
    assert torch.equal(logits(model, ids), base)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # flags given back


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_hypernetwork(family, load_tiny, ids):
    model = load_tiny(family)
    hn = Hypernetwork.for_model(model, STRONG)
    with hnkit.attach(model, hn):
        out = model(ids, labels=ids)
        out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in hn.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_same_tokens_with_and_without_kv_cache(family, load_tiny, ids):
    model = load_tiny(family)
    hn = Hypernetwork.for_model(model, STRONG)
    prompt = ids[:1, :5]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    base = model.generate(prompt, **kw)
    with hnkit.attach(model, hn, strength=1.0):
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b, c in zip(cached.scores, uncached.scores, base.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the hypernetwork acts on every step
        assert not torch.allclose(a, c, atol=1e-4)  # ... and it does act
    assert torch.equal(model.generate(prompt, **kw).sequences, base.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family, load_tiny, ids):
    # Dropout inside the hypernetwork: its hook runs again in backward and must see the same mask.
    config = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", dropout_structure=[0, 0.3, 0])
    torch.manual_seed(0)
    hn = Hypernetwork.for_model(load_tiny(family), config).train()
    grads = []
    for checkpointing in (False, True):
        model = load_tiny(family).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        hn.zero_grad()
        with hnkit.attach(model, hn):
            torch.manual_seed(1)
            model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in hn.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def _fold_into_weights(model, family, hn, strength):
    """Reference: a [1, 1] linear hypernetwork is an affine map x -> (I + sA) x + s a, which can be
    folded into the K and V weights by hand. Writing that fold per family checks that K gets the k
    module and V the v module, whatever the layout of the projection."""
    ref = copy.deepcopy(model)
    for site in find_sites(ref)[1]:
        attn = ref.get_submodule(_full_name(ref, site.key))
        for which in (0, 1):
            lin = hn[site.width][which].linear[0]
            m = torch.eye(site.width) + strength * lin.weight  # x' = m x + c
            c = strength * lin.bias
            if family == "gpt2":  # Conv1D: out = x @ W + b, W is (in, 3d)
                w, b = attn.c_attn.weight, attn.c_attn.bias
                d = w.shape[0]
                cols = slice((1 + which) * d, (2 + which) * d)
                b.data[cols] += c @ w.data[:, cols]
                w.data[:, cols] = m.T @ w.data[:, cols]
            elif family == "gpt_neox":  # Linear (3d, in), per-head [q | k | v] rows
                lin_qkv = attn.query_key_value
                heads = ref.config.num_attention_heads
                w = lin_qkv.weight.data.view(heads, 3, -1, site.width)
                b = lin_qkv.bias.data.view(heads, 3, -1)
                b[:, 1 + which] += w[:, 1 + which] @ c
                w[:, 1 + which] = w[:, 1 + which] @ m
            else:
                proj = attn.k_proj if which == 0 else attn.v_proj
                if proj.bias is not None:
                    proj.bias.data += proj.weight.data @ c
                else:
                    proj.bias = torch.nn.Parameter(proj.weight.data @ c)
                proj.weight.data = proj.weight.data @ m
    return ref


def _full_name(model, key):
    return next(n for n, _ in model.named_modules() if n == key or n.endswith("." + key))


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_a_hand_folded_reference(family, load_tiny, ids):
    model = load_tiny(family)
    torch.manual_seed(3)
    hn = Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 1], weight_init="XavierNormal"))
    for k, v in (hn[key] for key in hn.keys()):  # K and V modules must differ for the check to bite
        assert not torch.equal(k.linear[0].weight, v.linear[0].weight)
    reference = logits(_fold_into_weights(model, family, hn, 0.7), ids)
    with hnkit.attach(model, hn, strength=0.7):
        got = logits(model, ids)
    assert not torch.allclose(got, logits(model, ids), atol=1e-3)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


def test_several_hypernetworks_are_chained_in_order(load_tiny, ids):
    model = load_tiny("llama")
    torch.manual_seed(0)
    a, b = (Hypernetwork.for_model(model, STRONG) for _ in range(2))
    k_proj = model.model.layers[0].self_attn.k_proj  # first layer: its input does not depend on the hypernetworks
    seen = []
    hook = k_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    logits(model, ids)
    with hnkit.attach(model, [(a, 0.5), (b, 2.0)]) as handle:
        logits(model, ids)
        assert handle.strengths == [0.5, 2.0]
        handle.set_strength(0.0, index=b)  # only a remains
        logits(model, ids)
        handle.set_strength(0.0, index=0)
        logits(model, ids)
    hook.remove()
    x = seen[0]
    with torch.no_grad():
        torch.testing.assert_close(seen[1], b[32][0](a[32][0](x, 0.5), 2.0), rtol=0, atol=0)
        torch.testing.assert_close(seen[2], a[32][0](x, 0.5), rtol=0, atol=0)
    assert torch.equal(seen[3], x)


def test_strength_changes_without_reattaching(load_tiny, ids):
    model = load_tiny("gpt2")
    hn = Hypernetwork.for_model(model, STRONG)
    with hnkit.attach(model, hn, 0.5):
        half = logits(model, ids)
    with hnkit.attach(model, hn, 1.0) as handle:
        handle.strength = 0.5
        assert torch.equal(logits(model, ids), half)


def test_zero_init_last_is_an_exact_identity(load_tiny, ids):
    model = load_tiny("llama")
    base = logits(model, ids)
    hn = Hypernetwork.for_model(model, HypernetworkConfig(activation="relu", layer_norm=True, zero_init_last=True))
    with hnkit.attach(model, hn, 1.0):
        assert torch.equal(logits(model, ids), base)


def test_per_site_hypernetwork_has_one_pair_per_layer(load_tiny, ids):
    model = load_tiny("llama")
    hn = Hypernetwork.for_model(model, HypernetworkConfig(per_site=True))
    assert hn.keys() == ["layers.0.self_attn", "layers.1.self_attn"]
    # The keys do not depend on the LM-head wrapper: the bare decoder has the same sites.
    assert [s.key for s in find_sites(model.model)[1]] == hn.keys()
    with hnkit.attach(model, hn):
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in hn.parameters())


def test_for_model_creates_exactly_the_model_widths(load_tiny):
    for family in FAMILIES:
        hn = Hypernetwork.for_model(load_tiny(family))
        assert hn.keys() == [32] and hn.family == family
        assert hn.base_model  # the folder it was loaded from


def test_unsupported_model_lists_the_families():
    with pytest.raises(HnkitError, match="supported families: .*gpt2.*llama"):
        hnkit.attach(torch.nn.Linear(4, 4), Hypernetwork(keys=[4]))


def test_widths_that_fit_no_site_are_an_error(load_tiny):
    model = load_tiny("gpt2")
    with pytest.raises(HnkitError, match=r"widths \[320, 768\].*widths \[32\]"):
        hnkit.attach(model, Hypernetwork(keys=[768, 320]))
    per_site = Hypernetwork(HypernetworkConfig(per_site=True), ["h.7.attn"], widths={"h.7.attn": 32})
    with pytest.raises(HnkitError, match="h.7.attn"):
        hnkit.attach(model, per_site)


def test_attaching_twice_is_refused(load_tiny):
    model = load_tiny("opt")
    hn = Hypernetwork.for_model(model)
    with hnkit.attach(model, hn):
        with pytest.raises(HnkitError, match="already has hypernetworks attached"):
            hnkit.attach(model, hn)
    hnkit.attach(model, hn).remove()  # fine again once removed



# --- the packed path (hnkit/packed.py) -----------------------------------------------------------

def count_packed_calls(monkeypatch) -> list:
    """The row counts of the packed calls: ``PackedPair.hidden`` (the input side and FoldedKV's fold)
    and ``FoldedKV._joint`` (K and V of narrow projections without gradients)."""
    from hnkit.packed import FoldedKV, PackedPair

    calls = []
    hidden, joint = PackedPair.hidden, FoldedKV._joint

    def counting_hidden(self, flat, w1t, b1):
        calls.append(flat.shape[0])
        return hidden(self, flat, w1t, b1)

    def counting_joint(self, x, which, s, weights):
        calls.append(x.numel() // x.shape[-1])
        return joint(self, x, which, s, weights)

    monkeypatch.setattr(PackedPair, "hidden", counting_hidden)
    monkeypatch.setattr(FoldedKV, "_joint", counting_joint)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ["relu", "linear"])
@pytest.mark.parametrize("per_site", [False, True], ids=["shared", "per_site"])
def test_packed_inference_path_matches_the_modules(family, activation, per_site, load_tiny, ids, monkeypatch):
    model = load_tiny(family)
    # Dropout in the structure: identity in eval mode, so the packed path still applies.
    config = HypernetworkConfig(layer_structure=[1, 0.5, 1], activation=activation, per_site=per_site,
                                dropout_structure=[0, 0.1, 0], weight_init="XavierNormal")
    hn = with_biases(Hypernetwork.for_model(model, config).eval())
    base = logits(model, ids)
    reference = unpacked_run(model, hn, 0.7, lambda: logits(model, ids), monkeypatch)
    calls = count_packed_calls(monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        packed = logits(model, ids)
        assert len(calls) == handle.num_sites  # K and V of a site in one call, once per forward
        torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(packed, base, atol=1e-3)  # the network does act
        hn.train()  # training mode with dropout: the modules' own forward, each draws its own mask
        del calls[:]
        logits(model, ids)
        assert not calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_packed_training_path_matches_the_modules(family, activation, load_tiny, ids, monkeypatch):
    """With gradients, the packed path gives the modules' outputs and every gradient (the padding
    and the constant column get none to give back)."""
    model = load_tiny(family)
    config = HypernetworkConfig(layer_structure=[1, 0.5, 1], activation=activation, per_site=True,
                                weight_init="XavierNormal")
    hn = with_biases(Hypernetwork.for_model(model, config).train())  # no dropout: packed in training too
    reference = unpacked_run(model, hn, 0.7, lambda: grads_of(model, hn, ids), monkeypatch)
    calls = count_packed_calls(monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        packed = grads_of(model, hn, ids)
    assert len(calls) == handle.num_sites
    assert all(g.abs().sum() > 0 for g in packed[1:])
    for got, want in zip(packed, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_packed_path_sees_weight_changes_and_strengths(load_tiny, ids, monkeypatch):
    model = load_tiny("llama")
    hn = Hypernetwork.for_model(model, STRONG).eval()

    def packed_and_reference(strength):
        with hnkit.attach(model, hn, strength=strength):
            got = logits(model, ids)
        return got, unpacked_run(model, hn, strength, lambda: logits(model, ids), monkeypatch)

    with hnkit.attach(model, hn, strength=0.5) as handle:
        logits(model, ids)  # builds the packed weights, kept while attached
        with torch.no_grad():  # an optimizer step would do this
            for p in hn.parameters():
                p.mul_(1.5)
        got = logits(model, ids)
        handle.strength = -0.8
        got_strength = logits(model, ids)
    torch.testing.assert_close(got, unpacked_run(model, hn, 0.5, lambda: logits(model, ids), monkeypatch),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_strength, unpacked_run(model, hn, -0.8, lambda: logits(model, ids), monkeypatch),
                               rtol=1e-5, atol=1e-5)
    hn.load_state_dict({k: torch.randn_like(v) * 0.05 for k, v in hn.state_dict().items()})
    torch.testing.assert_close(*packed_and_reference(0.5), rtol=1e-5, atol=1e-5)
    with hnkit.attach(model, hn, strength=0.5):
        logits(model, ids)  # packed weights kept from the Parameters above
        hn.load_state_dict({k: torch.randn_like(v) * 0.05 for k, v in hn.state_dict().items()}, assign=True)
        got = logits(model, ids)  # new Parameter objects: read again
    torch.testing.assert_close(got, unpacked_run(model, hn, 0.5, lambda: logits(model, ids), monkeypatch),
                               rtol=1e-5, atol=1e-5)
    hn.to(torch.float64)  # a move replaces the weights' storage
    torch.testing.assert_close(*packed_and_reference(0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="tanh"),
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", layer_norm=True),
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", activate_output=True),
    HypernetworkConfig(layer_structure=[1, 2, 2, 1], activation="relu"),
], ids=["tanh", "layer_norm", "activate_output", "deeper"])
def test_other_module_forms_keep_the_modules_own_forward(config, load_tiny, ids, monkeypatch):
    model = load_tiny("llama")
    hn = Hypernetwork.for_model(model, config).eval()
    reference = unpacked_run(model, hn, 0.7, lambda: logits(model, ids), monkeypatch)
    calls = count_packed_calls(monkeypatch)
    with hnkit.attach(model, hn, strength=0.7):
        assert torch.equal(logits(model, ids), reference)  # the same code, bit for bit
    assert not calls


def test_two_networks_keep_the_modules_own_forward(load_tiny, ids, monkeypatch):
    model = load_tiny("llama")
    a, b = (Hypernetwork.for_model(model, STRONG).eval() for _ in range(2))
    reference = unpacked_run(model, [(a, 0.5), (b, 0.5)], None, lambda: logits(model, ids), monkeypatch)
    calls = count_packed_calls(monkeypatch)
    with hnkit.attach(model, [(a, 0.5), (b, 0.5)]):
        assert torch.equal(logits(model, ids), reference)
    assert not calls


def test_packed_path_pairs_k_and_v_by_the_tensor_they_get():
    """The result kept for V is handed out only for the very tensor K got, whichever comes first."""
    from hnkit.attach import _Live, _SiteTransform
    from hnkit.module import HypernetworkModule

    torch.manual_seed(0)
    k_module, v_module = (HypernetworkModule(16, [1, 2, 1], "relu", weight_init="XavierNormal").eval()
                          for _ in range(2))
    transform = _SiteTransform([(0, (k_module, v_module))], _Live([0.5]))
    assert transform.packed is not None
    x, other = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    close = dict(rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        expect_k, expect_v = k_module(x, 0.5), v_module(x, 0.5)
        torch.testing.assert_close(transform(x, 1), expect_v, **close)  # V first, then K
        torch.testing.assert_close(transform(x, 0), expect_k, **close)
        transform(x, 0)
        torch.testing.assert_close(transform(other, 1), v_module(other, 0.5), **close)  # another tensor
        transform(x, 0)
        torch.testing.assert_close(transform(x, 0), expect_k, **close)  # K twice
    kx = transform(x, 0)  # with gradients: packed too, and V gets the kept result
    vx = transform(x, 1)
    assert kx.grad_fn is not None and vx.grad_fn is not None and transform._pending is None
    torch.testing.assert_close(vx.detach(), expect_v, **close)
    transform(x, 0)
    with torch.no_grad():
        vx = transform(x, 1)  # kept with gradients, asked for without: computed anew
    assert vx.grad_fn is None
    torch.testing.assert_close(vx, expect_v, **close)


KEPT_FORMS = [
    HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="relu", per_site=True),  # packed and folded
    HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="relu"),  # packed, shared by the layers
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear"),  # collapsed (PackedPair.collapses)
]


@pytest.mark.parametrize("config", KEPT_FORMS, ids=["per_site", "shared", "collapsed"])
def test_weights_kept_under_inference_mode_serve_later_passes(config, load_tiny, ids):
    """Weights kept during torch.inference_mode() are inference tensors: a training step after it
    and passes under no_grad or inference_mode again give the same values as a fresh attachment."""
    model = load_tiny("llama")
    hn = Hypernetwork.for_model(model, config)
    with hnkit.attach(model, hn, strength=0.7):
        with torch.inference_mode():
            first = model(ids).logits
        with torch.no_grad():
            assert torch.equal(model(ids).logits, first)
        model(ids, labels=ids).loss.backward()
        torch.optim.SGD(hn.parameters(), lr=0.5).step()
        with torch.inference_mode():
            after = model(ids).logits
    with torch.no_grad(), hnkit.attach(model, hn, strength=0.7):
        fresh = model(ids).logits
    assert torch.equal(after, fresh) and not torch.allclose(after, first)


@pytest.mark.parametrize("config", KEPT_FORMS, ids=["per_site", "shared", "collapsed"])
def test_kept_weights_follow_the_steps_of_a_fused_optimizer(config, load_tiny, ids):
    """A fused AdamW (the trainer's) writes the parameters without bumping their versions; passes
    without gradients between its steps (validation, samples) must still see the new weights."""
    model = load_tiny("llama")
    hn = with_biases(Hypernetwork.for_model(model, config))
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-2, fused=True)
    with hnkit.attach(model, hn, strength=0.7):
        first = logits(model, ids)  # keeps weights
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        after = logits(model, ids)
    with hnkit.attach(model, hn, strength=0.7):
        fresh = logits(model, ids)
    assert torch.equal(after, fresh) and not torch.allclose(after, first)


def test_a_linear_pair_shared_by_the_layers_collapses_without_gradients(load_tiny, ids, monkeypatch):
    """The web UI's [1, 2, 1] linear, shared by every layer: once a pass brings enough rows over all
    its sites, K's and V's inputs come from the kept [M_k; M_v] product, in the prompt pass and
    for each generated token, with the modules' values; a per-site network with few rows does not."""
    from hnkit.packed import PackedPair

    model = load_tiny("llama")
    hn = with_biases(Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 2, 1])).eval())
    rows = []
    call = PackedPair._collapsed_call
    monkeypatch.setattr(PackedPair, "_collapsed_call",
                        lambda self, x, s, checked: rows.append(x.numel() // x.shape[-1]) or call(self, x, s, checked))
    reference = unpacked_run(model, hn, 0.7, lambda: logits(model, ids), monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        got = logits(model, ids)
        assert rows == [ids.numel()] * handle.num_sites  # one call per site, K and V together
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        del rows[:]
        with torch.no_grad():
            out = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        assert rows == [4] * handle.num_sites + [1] * 4 * handle.num_sites  # the prompt, then one row a token
        del rows[:]
        model(ids, labels=ids).loss.backward()  # with gradients: the modules' own chain, not the kept product
        assert not rows
    want = unpacked_run(model, hn, 0.7, lambda: model.generate(
        ids[:1, :4], max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True),
        monkeypatch)
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(want.scores), rtol=1e-4, atol=1e-4)

    per_site = Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 2, 1], per_site=True)).eval()
    del rows[:]
    with hnkit.attach(model, per_site):
        with torch.no_grad():
            model(ids[:1, :4])  # 4 rows at one site each: below the product's break-even
    assert not rows
