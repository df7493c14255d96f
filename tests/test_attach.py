"""The adapter core on every supported family: identity, gradients, cache, checkpointing, exactness."""

import copy
import gc

import pytest
import torch

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig
from hnkit.models import enable_gradient_checkpointing
from hnkit.targets import find_sites

from conftest import FAMILIES, grads_of, plain_run, torch_hooks, with_biases

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
@pytest.mark.parametrize("config", [
    # Dropout inside the hypernetwork: its hook runs again in backward and must see the same mask.
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", dropout_structure=[0, 0.3, 0]),
    # The Collapsed kernel: its per-pass products are made at the root, read again in the recompute.
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear", weight_init="XavierNormal"),
], ids=["dropout", "collapsed"])
def test_gradient_checkpointing_gives_the_same_gradients(family, config, load_tiny, ids):
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
            elif family == "phi3":  # Linear (q + 2 kv, in) without a bias, rows [Q | K | V]
                qkv = attn.qkv_proj
                q = ref.config.num_attention_heads * attn.head_dim
                kv = ref.config.num_key_value_heads * attn.head_dim
                rows = slice(q + which * kv, q + (which + 1) * kv)
                if qkv.bias is None:
                    qkv.bias = torch.nn.Parameter(torch.zeros(qkv.weight.shape[0]))
                qkv.bias.data[rows] += qkv.weight.data[rows] @ c
                qkv.weight.data[rows] = qkv.weight.data[rows] @ m
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



# --- kernels (hnkit/kernels.py) and per-pass values (hnkit/passes.py) ------------------------------

def count_products(monkeypatch) -> list:
    """One entry per ``HypernetworkModule.affine`` call: the Collapsed kernel's per-pass products."""
    from hnkit.module import HypernetworkModule

    calls = []
    affine = HypernetworkModule.affine
    monkeypatch.setattr(HypernetworkModule, "affine", lambda self, dtype=None: calls.append(self) or affine(self, dtype))
    return calls


LINEAR = HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear", weight_init="XavierNormal")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_site", [False, True], ids=["shared", "per_site"])
def test_collapsed_kernel_matches_the_modules(family, per_site, load_tiny, ids, monkeypatch):
    """A linear [1, 2, 1] takes the Collapsed kernel: in a pass with enough rows, one product per
    module and pass, with the modules' values and gradients."""
    from hnkit.kernels import Collapsed

    model = load_tiny(family)
    config = HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear", per_site=per_site,
                                weight_init="XavierNormal")
    hn = with_biases(Hypernetwork.for_model(model, config).eval())
    base = logits(model, ids)
    reference = plain_run(model, hn, 0.7, lambda: logits(model, ids), monkeypatch)
    reference_grads = plain_run(model, hn, 0.7, lambda: grads_of(model, hn, ids), monkeypatch)
    products = count_products(monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        assert all(isinstance(k, Collapsed) for k in handle.kernels)
        got = logits(model, ids)
        assert len(products) == 2 * len(handle.kernels)  # K's and V's module, once per pass
        assert all(not k.pending for k in handle.kernels)  # dropped at the end of a pass without a graph
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, base, atol=1e-3)  # the network does act
        del products[:]
        got_grads = grads_of(model, hn, ids)
        assert len(products) == 2 * len(handle.kernels)
        assert all(not k.pending for k in handle.kernels)  # dropped once their gradient was computed
    assert all(g.abs().sum() > 0 for g in got_grads[1:])
    for got, want in zip(got_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fast_false_runs_the_plain_kernels(load_tiny, ids, monkeypatch):
    """``attach(..., fast=False)`` puts the modules' own forward (Chain) at every site, where the
    default still takes the Collapsed kernel: the same outputs, and no per-pass product is made."""
    from hnkit.kernels import Chain, Collapsed

    model = load_tiny("gpt2")
    hn = with_biases(Hypernetwork.for_model(model, LINEAR).eval())
    base = logits(model, ids)
    products = count_products(monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        assert handle.kernels and all(isinstance(k, Collapsed) for k in handle.kernels)
        fast = logits(model, ids)
    assert products and "plain" not in repr(handle)
    del products[:]
    with hnkit.attach(model, hn, strength=0.7, fast=False) as handle:
        assert handle.kernels and all(type(k) is Chain for k in handle.kernels)
        assert "plain kernels" in repr(handle)
        plain = logits(model, ids)
    assert not products  # the modules ran their layers: nothing multiplied out
    assert not torch.allclose(plain, base, atol=1e-3)  # the network does act
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(HnkitError, match="fast must be True or False"):
        hnkit.attach(model, hn, fast="plain")
    assert torch.equal(logits(model, ids), base)  # the refused attach left nothing behind


def test_collapsed_kernel_takes_the_modules_below_its_break_even(load_tiny, ids, monkeypatch):
    """Generating token by token (one row per site and pass) runs the modules; the prompt pass,
    with enough rows over all the sites that share the pair, takes the product. Same tokens and
    scores as the plain kernels."""
    model = load_tiny("llama")
    hn = with_biases(Hypernetwork.for_model(model, LINEAR).eval())
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    prompt = ids[:1, :12]
    want = plain_run(model, hn, 0.7, lambda: model.generate(prompt, **kw), monkeypatch)
    products = count_products(monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        (kernel,) = handle.kernels
        assert 12 * kernel.sites >= kernel.break_even > kernel.sites  # the prompt pays, a token does not
        with torch.no_grad():
            out = model.generate(prompt, **kw)
    assert len(products) == 2  # the prompt pass only
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(want.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [
    HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="relu"),
    HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="linear"),  # no wider than d x d: never pays
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear", dropout_structure=[0, 0.1, 0]),
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="tanh"),
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", layer_norm=True),
    HypernetworkConfig(layer_structure=[1, 2, 2, 1], activation="relu"),
], ids=["relu", "bottleneck_linear", "linear_dropout", "tanh", "layer_norm", "deeper"])
def test_other_module_forms_take_the_plain_kernel(config, load_tiny, ids, monkeypatch):
    from hnkit.kernels import Chain

    model = load_tiny("llama")
    hn = Hypernetwork.for_model(model, config).eval()
    reference = plain_run(model, hn, 0.7, lambda: logits(model, ids), monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        assert [type(k) for k in handle.kernels] == [Chain]
        assert torch.equal(logits(model, ids), reference)  # the same code, bit for bit


def test_two_networks_take_the_plain_kernels(load_tiny, ids, monkeypatch):
    from hnkit.kernels import Chain, Sum

    model = load_tiny("llama")
    a, b = (Hypernetwork.for_model(model, LINEAR).eval() for _ in range(2))
    for blend, kind in (("chain", Chain), ("sum", Sum)):
        with hnkit.attach(model, [(a, 0.5), (b, 0.5)], blend=blend) as handle:
            assert [type(k) for k in handle.kernels] == [kind]


FORMS = [
    HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="relu", per_site=True),
    HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="relu"),
    HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear"),  # Collapsed
]


def _write_with_fused_adamw(model, hn, ids):
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-2, fused=True)  # does not bump parameter versions
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _write_with_sgd(model, hn, ids):
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(hn.parameters(), lr=0.5).step()
    hn.zero_grad()


def _write_by_hand(model, hn, ids):
    for p in hn.parameters():
        p.data -= 0.05 * torch.randn_like(p)  # .data: PyTorch counts no version


def _load_new_parameters(model, hn, ids):
    hn.load_state_dict({k: torch.randn_like(v) * 0.05 for k, v in hn.state_dict().items()}, assign=True)


@pytest.mark.parametrize("config", FORMS, ids=["per_site", "shared", "collapsed"])
@pytest.mark.parametrize("write", [_write_with_fused_adamw, _write_with_sgd, _write_by_hand, _load_new_parameters],
                         ids=["fused_adamw", "sgd", "by_hand", "load_state_dict"])
def test_every_way_of_writing_the_weights_is_seen_by_the_next_call(config, write, load_tiny, ids):
    """No contract to follow: hnkit keeps nothing across passes, so the next pass (under no_grad,
    inference_mode, or a submodule called on its own) computes with the weights as they are."""
    model = load_tiny("llama")
    hn = with_biases(Hypernetwork.for_model(model, config))
    with hnkit.attach(model, hn, strength=0.7):
        with torch.inference_mode():
            first = model(ids).logits
        write(model, hn, ids)
        after = logits(model, ids)
        with torch.no_grad():
            inner = model.model(ids).last_hidden_state  # not the root: no per-pass values
    with hnkit.attach(model, hn, strength=0.7):
        fresh = logits(model, ids)
        with torch.no_grad():
            fresh_inner = model.model(ids).last_hidden_state
    assert torch.equal(after, fresh) and not torch.allclose(after, first)
    assert torch.equal(inner, fresh_inner)


def test_attach_changes_nothing_it_was_not_handed(load_tiny, ids):
    """No process-wide hooks, no patched methods, no state in an unrelated model or optimizer."""
    model, other = load_tiny("llama"), load_tiny("llama")
    other_params = {k: v.clone() for k, v in other.state_dict().items()}
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3, fused=True)
    hooks_before = torch_hooks(), torch_hooks(model), torch_hooks(other, other_opt)
    methods = dict(vars(type(model)))
    hn = Hypernetwork.for_model(model, LINEAR)
    with hnkit.attach(model, hn, schedule=hnkit.fade_in(2)):
        with torch.no_grad():
            model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        assert "generate" not in vars(model) and "forward" not in vars(model)
        assert torch_hooks(model) > hooks_before[1]  # its own hooks, on the model it was handed
        other(ids, labels=ids).loss.backward()
        other_opt.step()
        assert torch_hooks() == hooks_before[0] and torch_hooks(other, other_opt) == hooks_before[2]
    assert (torch_hooks(), torch_hooks(model), torch_hooks(other, other_opt)) == hooks_before  # all removed
    assert dict(vars(type(model))) == methods
    assert all(p.requires_grad for p in other.parameters())
    assert any(not torch.equal(v, other_params[k]) for k, v in other.state_dict().items())  # its own step only


def live_tensors() -> list:
    """Every tensor object alive in the process, after a garbage collection. Picked by type: some
    lazy module proxies warn when isinstance asks for their class."""
    gc.collect()
    return [obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor)]


def run_inference(model, ids) -> None:
    with torch.no_grad():
        model(ids)
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("config", FORMS, ids=["per_site", "shared", "collapsed"])
def test_an_attachment_keeps_no_copy_of_any_weights(config, load_tiny, ids):
    """Attaching leaves no new tensor alive (nothing derived from the base model's K/V weights), and
    neither does a pass or its backward (nothing from the hypernetwork's once a pass is over)."""
    model = load_tiny("llama")
    hn = Hypernetwork.for_model(model, config)
    run_inference(model, ids)  # what the model makes once for itself, before counting
    before = live_tensors()  # kept alive, so no id of these is reused by a new tensor
    known = {id(t) for t in before}

    def new_tensors() -> list:
        return [(type(t).__name__, tuple(t.shape)) for t in live_tensors() if id(t) not in known]

    with hnkit.attach(model, hn):
        assert new_tensors() == []
        run_inference(model, ids)
        assert new_tensors() == []
        model(ids, labels=ids).loss.backward()
        hn.zero_grad(set_to_none=True)  # the gradients are the user's to keep
        assert new_tensors() == []


def test_half_precision_base_with_the_collapsed_kernel(load_tiny, ids, monkeypatch):
    """A bfloat16 base with the fp32 network: the products stay fp32, K's and V's inputs go back in
    the base's dtype."""
    model = load_tiny("llama").to(torch.bfloat16)
    hn = with_biases(Hypernetwork.for_model(model, LINEAR).eval())
    reference = plain_run(model, hn, 0.7, lambda: logits(model, ids), monkeypatch)
    products = count_products(monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        with torch.no_grad():
            handle.kernels[0].pair[0].affine()  # what the pass computes: in the modules' fp32
        got = logits(model, ids)
    assert products and handle.kernels[0].pair[0].affine()[0].dtype == torch.float32
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference.float(), rtol=0.05, atol=0.05)


def test_per_pass_values_are_freed_after_backward(load_tiny, ids, monkeypatch):
    """The products a pass multiplies out (``HypernetworkModule.affine``) are held for its backward,
    and no longer: the hook that holds them must not keep them alive (autograd holds hooks in C++,
    out of reach of Python's cycle collector)."""
    import weakref

    from hnkit.module import HypernetworkModule

    made = []
    affine = HypernetworkModule.affine

    def recorded(self, dtype=None):
        m, c = affine(self, dtype)
        made.extend([weakref.ref(m), weakref.ref(c)])
        return m, c

    monkeypatch.setattr(HypernetworkModule, "affine", recorded)
    model = load_tiny("llama")
    hn = Hypernetwork.for_model(model, LINEAR)
    with hnkit.attach(model, hn):
        for _ in range(3):
            out = model(ids, labels=ids)
            gc.collect()
            assert len(made) == 4 and all(ref() is not None for ref in made)  # K's and V's (M, c), held
            out.loss.backward()
            del out
            gc.collect()
            assert all(ref() is None for ref in made)  # freed once the backward is done
            made.clear()


@pytest.mark.parametrize("sequence", ["grad_then_no_grad", "two_grad_passes"])
def test_several_passes_before_one_backward_under_checkpointing(sequence, load_tiny, ids):
    """Per-pass values of a pass with gradients stay readable for its backward's recomputation when
    other passes ran in between: a no-grad pass (validation) or a second pass with gradients (a
    second loss term)."""
    torch.manual_seed(0)
    hn = with_biases(Hypernetwork.for_model(load_tiny("llama"), LINEAR))
    grads = []
    for checkpointing in (False, True):
        model = load_tiny("llama").train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        hn.zero_grad()
        with hnkit.attach(model, hn):
            loss = model(ids, labels=ids, use_cache=False).loss
            if sequence == "grad_then_no_grad":
                with torch.no_grad():
                    model(ids[:1, :3], use_cache=False)  # few rows: this pass takes no product
                    model(ids, use_cache=False)
            else:
                loss = loss + model(ids.flip(0), labels=ids.flip(0), use_cache=False).loss
            loss.backward()
        grads.append([p.grad.clone() for p in hn.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
