"""Per-row strengths: one forward pass serves batch rows with different styles and strengths."""

import pytest
import torch

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig

STRONG = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")
LINEAR = HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear", weight_init="XavierNormal")
GREEDY = dict(do_sample=False, pad_token_id=0)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def styles(model, config=STRONG, n=2):
    torch.manual_seed(0)
    return [Hypernetwork.for_model(model, config, name=f"s{i}").eval() for i in range(n)]


def alone(model, styles_and_strengths, ids, blend="chain"):
    """Each row run alone with its own styles and strengths."""
    rows = []
    for r in range(len(ids)):
        entries = [(hn, float(s[r])) for hn, s in styles_and_strengths]
        with hnkit.attach(model, entries, blend=blend):
            rows.append(logits(model, ids[r:r + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("blend", ["chain", "sum"])
def test_each_row_equals_running_it_alone_and_zero_rows_are_bare(load_tiny, ids, blend):
    model = load_tiny("llama")
    a, b = styles(model)
    ids = torch.cat([ids, ids[:1], ids[1:]])  # 4 rows
    bare = logits(model, ids)
    sa, sb = [0.0, 0.7, 0.0, -0.5], [0.0, 0.0, 1.5, 1.0]
    with hnkit.attach(model, [(a, sa), (b, torch.tensor(sb))], blend=blend) as handle:
        batched = logits(model, ids)
        assert torch.equal(handle.strengths[0], torch.tensor(sa))
    assert torch.equal(batched[0], bare[0])  # all strengths 0: the bare model, bit for bit
    assert not torch.allclose(batched[1:], bare[1:])
    torch.testing.assert_close(batched, alone(model, [(a, sa), (b, sb)], ids, blend), rtol=1e-5, atol=1e-5)


def test_mixing_a_number_and_per_row_strengths_in_a_sum(load_tiny, ids):
    model = load_tiny("qwen2")
    a, b = styles(model)
    with hnkit.attach(model, [(a, 0.5), (b, [1.0, 0.0])], blend="sum"):
        batched = logits(model, ids)
    torch.testing.assert_close(batched, alone(model, [(a, [0.5, 0.5]), (b, [1.0, 0.0])], ids, "sum"),
                               rtol=1e-5, atol=1e-5)


def test_collapsed_linear_network_per_row_equals_its_chain(load_tiny, ids):
    """The classic linear [1, 2, 1] gets the Collapsed kernel; per-row strengths run its layers."""
    model = load_tiny("gpt2")
    (hn,) = styles(model, LINEAR, 1)
    with hnkit.attach(model, hn, [0.0, 2.0]):
        batched = logits(model, ids)
    torch.testing.assert_close(batched, alone(model, [(hn, [0.0, 2.0])], ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(batched[0], logits(model, ids)[0])


def test_same_strength_in_every_row_equals_the_number(load_tiny, ids):
    model = load_tiny("gpt_neox")
    (hn,) = styles(model, STRONG, 1)
    with hnkit.attach(model, hn, 0.8):
        number = logits(model, ids)
    with hnkit.attach(model, hn, [0.8, 0.8]):
        torch.testing.assert_close(logits(model, ids), number, rtol=1e-6, atol=1e-6)


def test_left_padded_generate_with_kv_cache_matches_each_prompt_alone(load_tiny):
    model = load_tiny("llama")
    a, b = styles(model)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sa, sb = [1.0, 0.0, 0.6], [0.0, 0.0, -0.8]
    with hnkit.steer(model, {a: sa, b: sb}):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)[:, width:]
    for r, p in enumerate(prompts):
        with hnkit.steer(model, {a: sa[r], b: sb[r]}):
            one = model.generate(torch.tensor([p]), max_new_tokens=6, **GREEDY)[0, len(p):]
        assert torch.equal(out[r], one), r
    bare = model.generate(torch.tensor([prompts[1]]), max_new_tokens=6, **GREEDY)[0, len(prompts[1]):]
    assert torch.equal(out[1], bare)


def test_per_row_strengths_change_in_place_and_train(load_tiny, ids):
    model = load_tiny("llama")
    (hn,) = styles(model, STRONG, 1)
    hn.train()
    with hnkit.attach(model, hn, 1.0) as handle:
        handle.strength = [0.0, 1.0]
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for p in hn.parameters())
        assert all(p.grad is None for p in model.parameters())
        handle.strength = 0.5
        assert handle.strength == 0.5


def test_bad_per_row_strengths_are_one_line(load_tiny, ids):
    model = load_tiny("llama")
    (hn,) = styles(model, STRONG, 1)
    for bad, words in (([], "1-D"), ([[1.0]], "1-D"), ([1.0, float("nan")], "finite"), (["x", 1], "numbers")):
        with pytest.raises(HnkitError, match=words):
            hnkit.attach(model, hn, bad)
    with hnkit.attach(model, hn, [1.0, 0.5, 0.0]):
        with pytest.raises(HnkitError, match="3 rows, but the batch has 2"):
            logits(model, ids)

