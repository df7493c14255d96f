"""Stacks: several styles of one shape as one network, each row with its own mix of them."""

import pytest
import torch

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig, Stack

RELU = HypernetworkConfig(layer_structure=[1, 0.5, 1], activation="relu", weight_init="XavierNormal", per_site=True)
LINEAR = HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear", weight_init="XavierNormal")


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def styles(model, config=RELU, n=3):
    torch.manual_seed(0)
    nets = [Hypernetwork.for_model(model, config, name=f"s{i}").eval() for i in range(n)]
    with torch.no_grad():
        for hn in nets:
            for p in hn.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # non-zero biases too
    return nets


@pytest.mark.parametrize("family,config", [("llama", RELU), ("gpt2", LINEAR)])
def test_stack_equals_the_plain_sum_per_row_and_zero_rows_are_bare(load_tiny, ids, family, config):
    model = load_tiny(family)
    nets = styles(model, config)
    ids = torch.cat([ids, ids])  # 4 rows
    bare = logits(model, ids)
    columns = [[0.0, 0.7, 0.0, -0.5], [0.0, 0.0, 1.5, 1.0], [0.0, 0.3, 0.0, 0.0]]
    with hnkit.attach(model, list(zip(nets, columns)), blend="sum"):
        plain = logits(model, ids)
    stack = Stack(nets)
    with hnkit.attach(model, stack, dict(zip(stack.names, columns)), blend="sum") as handle:
        stacked = logits(model, ids)
        assert torch.equal(torch.stack(handle.strengths), torch.tensor(columns))
    assert torch.equal(stacked[0], bare[0])  # a row whose strengths are all 0: the bare model, bit for bit
    torch.testing.assert_close(stacked, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stacked[1:], bare[1:])


def test_numbers_layer_factors_and_one_member(load_tiny, ids):
    model = load_tiny("qwen2")
    nets = styles(model)
    layers = [0.5, 1.5]
    with hnkit.attach(model, [(nets[0], 0.4), (nets[1], 0.0), (nets[2], -0.8)], blend="sum", layers=layers):
        plain = logits(model, ids)
    with hnkit.attach(model, Stack(nets), [0.4, 0.0, -0.8], blend="sum", layers=layers) as handle:
        torch.testing.assert_close(logits(model, ids), plain, rtol=1e-5, atol=1e-5)
        handle.set_strength({"s0": 0.0, "s2": 0.0})
        handle.set_strength(1.2, "s1")  # only the middle member: computed alone
        one = logits(model, ids)
        handle.set_strength(0.0, 1)
        all_zero = logits(model, ids)
    assert torch.equal(all_zero, logits(model, ids))  # every strength 0: the bare model
    with hnkit.attach(model, nets[1], 1.2, layers=layers):
        torch.testing.assert_close(one, logits(model, ids), rtol=1e-5, atol=1e-5)


def test_greedy_generation_per_row_equals_each_row_alone(load_tiny, ids):
    model = load_tiny("llama")
    nets = styles(model)
    stack = Stack(nets)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with hnkit.attach(model, stack, {"s0": [1.0, 0.0], "s2": [0.0, 1.5]}, blend="sum"):
        with torch.no_grad():
            batched = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    for row, (hn, s) in enumerate([(nets[0], 1.0), (nets[2], 1.5)]):
        with hnkit.attach(model, hn, s), torch.no_grad():
            alone = model.generate(ids[row:row + 1], attention_mask=torch.ones_like(ids[row:row + 1]), **kw)
        assert torch.equal(batched[row], alone[0])


def test_gradients_reach_the_stack_only(load_tiny, ids):
    model = load_tiny("llama")
    stack = Stack(styles(model, n=2))
    with hnkit.attach(model, stack, [1.0, [0.5, 0.0]], blend="sum"):
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())


def test_the_stack_is_a_copy(load_tiny, ids):
    model = load_tiny("llama")
    nets = styles(model, n=2)
    stack = Stack(nets, names=["a", "b"])
    with hnkit.attach(model, stack, {"a": 1.0}, blend="sum"):
        before = logits(model, ids)
        with torch.no_grad():
            for p in nets[0].parameters():
                p.zero_()
        assert torch.equal(logits(model, ids), before)  # reads nothing of the networks it was made from


def test_refusals_are_one_clear_line(load_tiny, ids):
    model = load_tiny("llama")
    relu, linear = styles(model, n=1)[0], styles(model, LINEAR, n=1)[0]
    deep = Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 2, 2, 1]), name="deep")
    normed = Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 2, 1], layer_norm=True), name="n")
    cases = [(lambda: Stack([relu, linear], names=["a", "b"]), "'b' cannot share a stack with 'a'"),
             (lambda: Stack([deep]), "only two-layer"),
             (lambda: Stack([normed]), "only two-layer"),
             (lambda: Stack([Hypernetwork.for_model(model, HypernetworkConfig(activation="softmax"), name="x")]),
              "'softmax' does not act on each hidden unit alone"),
             (lambda: Stack([relu, relu]), "distinct names"),
             (lambda: Stack([]), "at least one"),
             (lambda: hnkit.attach(model, Stack([relu]), 1.0), "blend='sum'")]
    for make, words in cases:
        with pytest.raises(HnkitError, match=words) as info:
            make()
        assert "\n" not in str(info.value)
    stack = Stack(styles(model, n=2))
    with hnkit.attach(model, stack, 0.0, blend="sum") as handle:
        for value, member, words in [(1.0, "nope", "no member 'nope'"), (1.0, 5, "out of range"),
                                     ([1.0, 0.0, 2.0], "s0", "same rows"), (float("nan"), "s1", "finite")]:
            if words == "same rows":
                handle.set_strength([1.0, 0.0], "s1")
            with pytest.raises(HnkitError, match=words):
                handle.set_strength(value, member)
        handle.set_strength({"s0": [1.0, 0.0, 0.5], "s1": 0.0})
        with pytest.raises(HnkitError, match="3 rows, but the batch has 2"):
            logits(model, ids)


@pytest.mark.parametrize("mixed_shapes", [False, True])
def test_the_engine_stacks_styles_of_one_shape_and_rows_equal_running_alone(tiny_lm, tmp_path, mixed_shapes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hnkit.engine import Engine, Job
    from hnkit.steer import StyleLibrary

    model = AutoModelForCausalLM.from_pretrained(tiny_lm["model"]).eval()
    nets = styles(model) + ([styles(model, LINEAR, n=1)[0]] if mixed_shapes else [])
    for i, hn in enumerate(nets):
        hnkit.save(hn, tmp_path / f"style{i}.safetensors")
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_lm["model"]), StyleLibrary(tmp_path))
    assert (engine.stack is None) == mixed_shapes
    requests = [({"style0": 1.0}, 6), ({"style1": 0.7, "style2": -0.4}, 3), ({}, 5),
                ({f"style{len(nets) - 1}": 1.5}, 6)]
    prompt = [5, 17, 33, 2, 8]

    def job(styles, n):
        return Job(prompt_ids=list(prompt), styles=styles, max_tokens=n, emit=lambda *a: None, temperature=0,
                   ignore_eos=True)

    batch = [job(*r) for r in requests]
    with torch.no_grad():
        engine.run(batch)
        for (styles_, n), done in zip(requests, batch):
            one = job(styles_, n)
            engine.run([one])
            assert one.tokens == done.tokens and len(one.tokens) == n
    engine.close()


def test_a_half_precision_stack_equals_its_plain_sum(load_tiny, ids):
    model = load_tiny("llama")
    nets = [hn.to(torch.bfloat16) for hn in styles(model, n=2)]
    with hnkit.attach(model, [(nets[0], [1.0, 0.0]), (nets[1], [0.5, 1.0])], blend="sum"):
        plain = logits(model, ids)
    with hnkit.attach(model, Stack(nets), {"s0": [1.0, 0.0], "s1": [0.5, 1.0]}, blend="sum"):
        torch.testing.assert_close(logits(model, ids), plain, rtol=2e-2, atol=2e-2)


def test_set_strength_takes_what_attach_takes(load_tiny, ids, tmp_path):
    model = load_tiny("llama")
    nets = styles(model, n=2)
    stack = Stack(nets)
    with hnkit.attach(model, stack, 0.0, blend="sum") as handle:
        handle.set_strength([0.4, [1.0, 0.0]])
        assert handle.strengths[0] == 0.4 and handle.strengths[1].tolist() == [1.0, 0.0]
        assert "s0@0.4" in repr(handle) and "s1@[1.0, 0.0]" in repr(handle)
        first = logits(model, ids)
        handle.strength = 0.0
        handle.set_strength({1: [1.0, 0.0], "s0": 0.4})
        torch.testing.assert_close(logits(model, ids), first, rtol=0, atol=0)
        for call, words in [(lambda: handle.strength, "strength per member"),
                            (lambda: handle.set_strength(1.0, nets[0]), "by its name or position"),
                            (lambda: hnkit.save(stack, tmp_path / "x.safetensors"), "writes a Hypernetwork"),
                            (lambda: Stack(["a"]), "made of Hypernetwork objects"),
                            (lambda: handle.set_strength([1.0]), "1 strengths for a stack of 2")]:
            with pytest.raises(HnkitError, match=words):
                call()
    assert not (tmp_path / "x.safetensors").exists()
    linear = Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear"), name="a")
    plain = Hypernetwork.for_model(model, HypernetworkConfig(layer_structure=[1, 2, 1], activation=None), name="b")
    assert Stack([linear, plain]).names == ["a", "b"]  # "linear" and None are the same activation
