"""FoldedKV: per-site networks on narrow (grouped-query) K/V projections. Without gradients K and V
come from two joint products; with gradients the network adds to the projection's output from
FoldedKV.fold_rows rows on and feeds its input below that. Every way the values are the modules'
own, and so are the gradients."""

import pytest
import torch

import hnkit
from hnkit import Hypernetwork, HypernetworkConfig
from hnkit.models import enable_gradient_checkpointing
from hnkit.packed import FoldedKV
from hnkit.targets.base import KVProjection

from conftest import VOCAB, grads_of, unpacked_run, with_biases

GQA = ["llama", "mistral", "qwen2"]  # tiny configs: hidden 32, K/V 16 wide
ROWS = FoldedKV.fold_rows(32, 16)  # 22


def per_site(model, activation="relu"):
    config = HypernetworkConfig(layer_structure=[1, 0.5, 1], activation=activation, per_site=True,
                                weight_init="XavierNormal")
    return with_biases(Hypernetwork.for_model(model, config))


def tokens(rows_per_sequence: int, sequences: int = 2):
    return torch.randint(3, VOCAB, (sequences, rows_per_sequence), generator=torch.Generator().manual_seed(0))


def count_calls(monkeypatch, method: str) -> list:
    """One entry (its rows) per forward of a site that took ``FoldedKV.<method>``:
    ``_folded`` (the output side with the fold) or ``_joint`` (K and V without gradients). Each
    computes for K and V at once, so one call per site and pass."""
    calls = []
    original = getattr(FoldedKV, method)

    def counting(self, x, *args):
        calls.append(x.numel() // x.shape[-1])
        return original(self, x, *args)

    monkeypatch.setattr(FoldedKV, method, counting)
    return calls


def count_folds(monkeypatch) -> list:
    return count_calls(monkeypatch, "_folded")


def test_fold_rows_is_the_break_even():
    assert FoldedKV.fold_rows(576, 192) == 192  # SmolLM2: 2 * 576 * 192 / (3 * 384)
    assert ROWS == 22


def test_stand_ins_only_while_attached_with_the_same_parameters(load_tiny):
    model = load_tiny("llama")
    attn = model.model.layers[0].self_attn
    k_proj, weight = attn.k_proj, attn.k_proj.weight
    keys = list(model.state_dict())
    with hnkit.attach(model, per_site(model)):
        assert isinstance(attn.k_proj, KVProjection) and isinstance(attn.v_proj, KVProjection)
        assert attn.k_proj.weight is weight and list(model.state_dict()) == keys
        assert not weight.requires_grad  # frozen while attached, as everywhere
    assert attn.k_proj is k_proj and weight.requires_grad
    # A network shared by every layer keeps the pre-hooks: its folded weights would be one per layer.
    shared = Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="relu"))
    with hnkit.attach(model, shared):
        assert attn.k_proj is k_proj and attn.k_proj._forward_pre_hooks


@pytest.mark.parametrize("family", GQA)
@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_output_side_matches_the_modules_with_gradients(family, activation, load_tiny, monkeypatch):
    model = load_tiny(family).train()
    hn = per_site(model, activation).train()
    ids = tokens(ROWS)  # 2 * 22 rows: folded
    reference = unpacked_run(model, hn, 0.7, lambda: grads_of(model, hn, ids), monkeypatch)
    folds = count_folds(monkeypatch)
    with hnkit.attach(model, hn, strength=0.7) as handle:
        got = grads_of(model, hn, ids)
    assert folds == [2 * ROWS] * handle.num_sites  # one per site (V takes what K computed)
    assert all(g.abs().sum() > 0 for g in got[1:])
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", GQA)
def test_joint_kernel_matches_the_modules_without_gradients(family, load_tiny, monkeypatch):
    """Without gradients K and V come from the joint products at any number of rows."""
    model = load_tiny(family)
    hn = per_site(model).eval()
    ids = tokens(ROWS)
    with torch.no_grad():
        base = model(ids).logits
        reference = unpacked_run(model, hn, 0.7, lambda: model(ids).logits, monkeypatch)
        folds, joints = count_folds(monkeypatch), count_calls(monkeypatch, "_joint")
        with hnkit.attach(model, hn, strength=0.7):
            got = model(ids).logits
            few = model(ids[:1, :1]).logits  # one row, as a generated token
    assert not folds and joints == [2 * ROWS] * 2 + [1] * 2  # the two sites, in each call
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(few, reference[:1, :1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


def test_joint_kernel_follows_the_projections_bias(load_tiny, monkeypatch):
    """Qwen2's K/V projections have biases, which the joint product carries: a change to one shows."""
    model, twin = load_tiny("qwen2"), load_tiny("qwen2")
    hn = per_site(model).eval()
    ids = tokens(3)
    with torch.no_grad(), hnkit.attach(model, hn, strength=0.7):
        model(ids)
        for m in (model, twin):
            m.model.layers[0].self_attn.v_proj.bias.add_(0.5)
        got = model(ids).logits
        torch.testing.assert_close(got, unpacked_run(twin, hn, 0.7, lambda: twin(ids).logits, monkeypatch),
                                   rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_runs_the_fold_again(load_tiny):
    grads = []
    for checkpointing in (False, True):
        model = load_tiny("llama").train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        torch.manual_seed(0)
        hn = per_site(model).train()
        with hnkit.attach(model, hn):
            model(tokens(ROWS), labels=tokens(ROWS), use_cache=False).loss.backward()
        grads.append([p.grad for p in hn.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_dropout_in_training_takes_the_modules_own_forward(load_tiny, monkeypatch):
    model = load_tiny("llama").train()
    config = HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="relu", per_site=True,
                                dropout_structure=[0, 0.5, 0])
    hn = Hypernetwork.for_model(model, config).train()
    folds = count_folds(monkeypatch)
    with hnkit.attach(model, hn):
        torch.manual_seed(1)
        a = model(tokens(ROWS), use_cache=False).logits
        torch.manual_seed(1)
        b = model(tokens(ROWS), use_cache=False).logits
        torch.manual_seed(2)
        c = model(tokens(ROWS), use_cache=False).logits
    assert not folds
    assert torch.equal(a, b) and not torch.equal(a, c)  # the masks are drawn, from torch's generator


def test_kept_weights_follow_the_parameters(load_tiny, monkeypatch):
    """Without gradients the folded weights are kept, and checked at the start of every pass that
    starts a sequence: an optimizer-like change to the network or to the base's K weight shows in
    the next pass, and a submodule called on its own checks for itself."""
    model, twin = load_tiny("llama"), load_tiny("llama")  # the twin gives the modules' own values
    hn = per_site(model).eval()
    ids = tokens(ROWS)
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad(), hnkit.attach(model, hn, strength=0.7):
        before = model(ids).logits  # keeps folded weights
        for p in hn.parameters():
            p.mul_(1.5)
        got = model(ids).logits
        torch.testing.assert_close(got, unpacked_run(twin, hn, 0.7, lambda: twin(ids).logits, monkeypatch), **close)
        assert not torch.allclose(got, before, atol=1e-4)
        for m in (model, twin):  # through the stand-in: the base's own Parameter
            m.model.layers[1].self_attn.k_proj.weight.mul_(0.5)
        got = model(ids).logits
        torch.testing.assert_close(got, unpacked_run(twin, hn, 0.7, lambda: twin(ids).logits, monkeypatch), **close)
        for p in hn.parameters():
            p.mul_(0.8)
        hidden = model.model(ids).last_hidden_state  # the inner model alone: no pass of the outer one
        torch.testing.assert_close(
            hidden, unpacked_run(twin, hn, 0.7, lambda: twin.model(ids).last_hidden_state, monkeypatch), **close)


def test_generation_takes_the_joint_kernel(load_tiny, monkeypatch):
    """The prompt and each new token (one row) take the joint products: the same tokens and scores
    as the modules' own forward, with and without the KV cache."""
    model = load_tiny("llama")
    hn = per_site(model).eval()
    prompt = tokens(ROWS + 2, sequences=1)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    reference = unpacked_run(model, hn, 0.7, lambda: model.generate(prompt, **kw), monkeypatch)
    joints = count_calls(monkeypatch, "_joint")
    with hnkit.attach(model, hn, strength=0.7):
        cached = model.generate(prompt, use_cache=True, **kw)
        assert joints == [ROWS + 2] * 2 + [1] * 2 * 7  # the prompt, then 7 tokens, at each of the two sites
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, reference.sequences)
    assert torch.equal(uncached.sequences, reference.sequences)
    for a, b, c in zip(cached.scores, uncached.scores, reference.scores):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)


def test_half_precision_base(load_tiny, monkeypatch):
    """A bfloat16 base with the fp32 network: the fold runs in fp32 and adds in the base's dtype."""
    model = load_tiny("llama").to(torch.bfloat16)
    hn = per_site(model).eval()
    ids = tokens(ROWS)
    with torch.no_grad():
        reference = unpacked_run(model, hn, 0.7, lambda: model(ids).logits, monkeypatch)
        folds = count_folds(monkeypatch)
        with hnkit.attach(model, hn, strength=0.7):
            got = model(ids).logits
    assert folds and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference.float(), rtol=0.05, atol=0.05)


def test_a_new_generation_sees_changed_weights(load_tiny, monkeypatch):
    """The kept weights are trusted while a cached sequence continues, and checked again when the
    next one starts: generate, change the network as an optimizer step would, generate again."""
    model, twin = load_tiny("llama"), load_tiny("llama")
    hn = per_site(model).eval()
    prompt = tokens(ROWS + 2, sequences=1)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with hnkit.attach(model, hn, strength=0.7):
        first = model.generate(prompt, **kw)
        with torch.no_grad():
            for p in hn.parameters():
                p.mul_(1.5)
        second = model.generate(prompt, **kw)
    reference = unpacked_run(twin, hn, 0.7, lambda: twin.generate(prompt, **kw), monkeypatch)
    for a, b, c in zip(second.scores, reference.scores, first.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(a, c, atol=1e-4)


def test_the_check_of_a_pass_reaches_the_pair_of_a_folded_site(load_tiny):
    """A folded site's FoldedKV is the one owner of its kept weights that the start of a pass checks:
    it checks its pair's too, also where only the input side has kept any (the pair is not checked
    a second time on its own)."""
    model = load_tiny("llama")
    hn = per_site(model).eval()
    with torch.no_grad(), hnkit.attach(model, hn) as handle:
        assert len(handle._kept_owners) == handle.num_sites
        assert all(isinstance(owner, FoldedKV) for owner in handle._kept_owners)
        folded = handle._kept_owners[0]
        folded.packed._kept()  # kept by the input side; nothing folded yet
        assert folded._key is None
        for p in hn.parameters():
            p.mul_(1.5)
        folded.refresh()
        assert folded.packed._key == [m.weights_key() for m in folded.packed.modules]
