"""Steering: steer() and its styles, blends, per-layer factors, token schedules, StyleLibrary."""

import threading

import pytest
import torch

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig
from hnkit.util import parse_style_arg

STRONG = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")
GREEDY = dict(do_sample=False, pad_token_id=0)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def two_styles(model, seed=0):
    torch.manual_seed(seed)
    return Hypernetwork.for_model(model, STRONG, name="a"), Hypernetwork.for_model(model, STRONG, name="b")


def kv_inputs(model, run):
    """What layer 0's and layer 1's k_proj receive during ``run()`` (a Llama-type model)."""
    seen = {0: [], 1: []}
    hooks = [model.model.layers[i].self_attn.k_proj.register_forward_hook(
        lambda mod, args, out, i=i: seen[i].append(args[0].detach())) for i in (0, 1)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen[0][0], seen[1][0]


def test_strength_zero_is_bit_identical_in_every_mode(load_tiny, ids):
    model = load_tiny("llama")
    a, b = two_styles(model)
    base = logits(model, ids)
    prompt = ids[:1, :5]
    base_tokens = model.generate(prompt, max_new_tokens=8, **GREEDY)
    for blend in ("chain", "sum"):
        with hnkit.steer(model, {a: 0.0, b: 0.0}, blend=blend, layers=[0.5, 2.0], schedule=hnkit.fade_in(3)):
            assert torch.equal(logits(model, ids), base)
            assert torch.equal(model.generate(prompt, max_new_tokens=8, **GREEDY), base_tokens)
    assert torch.equal(logits(model, ids), base)


def test_one_style_in_a_mapping_equals_attaching_it(load_tiny, ids, tmp_path):
    model = load_tiny("gpt_neox")
    a, _ = two_styles(model)
    a.eval()  # as hnkit.load returns it
    with hnkit.attach(model, a, 0.7):
        attached = logits(model, ids)
    for blend in ("chain", "sum"):
        with hnkit.steer(model, {a: 0.7}, blend=blend) as handle:
            assert torch.equal(logits(model, ids), attached)
            assert handle.strengths == [0.7]
    hnkit.save(a, tmp_path / "a.safetensors")
    with hnkit.steer(model, tmp_path / "a.safetensors", strength=0.7):  # a path, and a single style
        assert torch.equal(logits(model, ids), attached)
    assert not torch.equal(attached, logits(model, ids))


def test_negative_strength_steers_away(load_tiny, ids):
    model = load_tiny("llama")
    a, _ = two_styles(model)
    plain = kv_inputs(model, lambda: logits(model, ids))[0]
    with hnkit.steer(model, {a: -0.5}):
        away = kv_inputs(model, lambda: logits(model, ids))[0]
    k_module = a[32][0]
    with torch.no_grad():
        mlp = k_module(plain, 1.0) - plain
    torch.testing.assert_close(away, plain - 0.5 * mlp, rtol=0, atol=1e-6)
    assert (away - plain).abs().max() > 1e-3


def test_sum_blend_is_the_weighted_sum_of_residuals(load_tiny, ids):
    model = load_tiny("llama")
    a, b = two_styles(model)
    x = kv_inputs(model, lambda: logits(model, ids))[0]  # layer 0: its input is the embeddings
    with hnkit.steer(model, {a: 0.6, b: -1.5}, blend="sum"):
        summed = kv_inputs(model, lambda: logits(model, ids))[0]
    with hnkit.steer(model, {a: 0.6, b: -1.5}, blend="chain"):
        chained = kv_inputs(model, lambda: logits(model, ids))[0]
    with torch.no_grad():
        ka, kb = a[32][0], b[32][0]
        expected = x + 0.6 * ka.linear(x) + (-1.5) * kb.linear(x)
        torch.testing.assert_close(summed, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(chained, kb(ka(x, 0.6), -1.5), rtol=0, atol=0)
    assert (summed - chained).abs().max() > 1e-3  # the two blends really differ


def test_per_layer_factors(load_tiny, ids):
    model = load_tiny("llama")
    a, b = two_styles(model)
    x0, x1 = kv_inputs(model, lambda: logits(model, ids))
    with hnkit.steer(model, a, layers=[0.0, 1.0]):
        y0, y1 = kv_inputs(model, lambda: logits(model, ids))
    assert torch.equal(y0, x0)  # factor 0 at layer 0: untouched
    assert not torch.equal(y1, x1)
    # A function of the layer index is the same as the list; a uniform factor is the same as a strength.
    with hnkit.steer(model, a, strength=0.8, layers=lambda i: 0.5 if i else 2.0):
        by_function = logits(model, ids)
    with hnkit.steer(model, a, strength=0.8, layers=[2.0, 0.5]):
        assert torch.equal(logits(model, ids), by_function)
    with hnkit.steer(model, {a: 1.0, b: 0.5}, layers=[0.25, 0.25]):
        quarter = logits(model, ids)
    with hnkit.steer(model, {a: 0.25, b: 0.125}):
        assert torch.equal(logits(model, ids), quarter)
    with pytest.raises(HnkitError, match="3 factors.*2 attention layers"):
        hnkit.steer(model, a, layers=[1, 1, 1])


def test_sites_with_equal_strengths_share_one_kernel(load_tiny):
    model = load_tiny("llama")
    a, _ = two_styles(model)
    with hnkit.steer(model, a, layers=[0.5, 0.5], blend="sum") as handle:
        assert handle.num_sites == 2 and len(handle.kernels) == 1
    with hnkit.steer(model, a, layers=[0.5, 1.0]) as handle:
        assert handle.num_sites == 2 and len(handle.kernels) == 2


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_schedule_zero_for_the_first_tokens_gives_the_base_models_tokens(family, load_tiny, ids):
    model = load_tiny(family)
    a, _ = two_styles(model)
    prompt, k, n = ids[:1, :5], 4, 12
    base = model.generate(prompt, max_new_tokens=n, **GREEDY)[0, 5:]
    with hnkit.steer(model, a, strength=2.0):
        full = model.generate(prompt, max_new_tokens=n, **GREEDY)[0, 5:]
    assert not torch.equal(base[:k], full[:k])  # the style acts from the first token when not scheduled
    with hnkit.steer(model, a, strength=2.0, schedule=hnkit.after(k)) as handle:
        for use_cache in (True, False):
            steered = model.generate(prompt, max_new_tokens=n, use_cache=use_cache, **GREEDY)[0, 5:]
            assert torch.equal(steered[:k], base[:k])
            assert not torch.equal(steered, base)  # ... and takes over afterwards
            assert handle.token_index == n - 1
        torch.manual_seed(7)
        sampled = model.generate(prompt, max_new_tokens=n, do_sample=True, pad_token_id=0)[0, 5:]
    torch.manual_seed(7)
    base_sampled = model.generate(prompt, max_new_tokens=n, do_sample=True, pad_token_id=0)[0, 5:]
    assert torch.equal(sampled[:k], base_sampled[:k])
    assert "generate" not in model.__dict__  # the wrapper is gone with the handle


def test_schedule_counts_generated_tokens(load_tiny, ids):
    model = load_tiny("llama")
    a, _ = two_styles(model)
    factors = []

    def schedule(i):
        factors.append(i)
        return 1.0

    with hnkit.steer(model, a, schedule=schedule):
        scheduled = model.generate(ids[:1, :6], max_new_tokens=5, **GREEDY)
        assert factors == [0, 1, 2, 3, 4]  # the prompt pass is 0, then one per new token
        factors.clear()
        with torch.no_grad():  # by hand, outside generate(): a forward on an empty cache starts a sequence
            out = model(ids[:1, :6], use_cache=True)
            model(ids[:1, 6:7], cache=out.cache, use_cache=True)
        assert factors == [0, 1]
    with hnkit.steer(model, a):
        assert torch.equal(model.generate(ids[:1, :6], max_new_tokens=5, **GREEDY), scheduled)  # factor 1 = none


def test_schedule_helpers_and_grad_refusal(load_tiny, ids):
    assert [hnkit.fade_in(4)(i) for i in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert [hnkit.fade_in(2, start=3)(i) for i in (0, 3, 4, 5)] == [0.0, 0.0, 0.5, 1.0]
    assert [hnkit.fade_out(2)(i) for i in (0, 1, 2, 3)] == [1.0, 0.5, 0.0, 0.0]
    assert [hnkit.after(2)(i) for i in (0, 1, 2)] == [0.0, 0.0, 1.0]
    model = load_tiny("llama")
    a, _ = two_styles(model)
    with hnkit.steer(model, a, schedule=hnkit.fade_in(2)):
        with pytest.raises(HnkitError, match="inference only"):
            model(ids, labels=ids).loss.backward()
    with pytest.raises(HnkitError, match="needs a model with generate"):
        hnkit.steer(model.model, a, schedule=hnkit.fade_in(2))


def test_streamer_with_a_steered_model(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm["model"])
    torch.manual_seed(0)
    hn = Hypernetwork.for_model(model, STRONG)
    ids = tokenizer("The with statement", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=True, top_k=0, pad_token_id=0)
    with hnkit.steer(model, {hn: 1.5}, schedule=hnkit.fade_in(4)):
        torch.manual_seed(3)
        expected = model.generate(ids, **kw)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        result = {}

        def work():
            torch.manual_seed(3)
            result["ids"] = model.generate(ids, streamer=streamer, **kw)

        thread = threading.Thread(target=work)
        thread.start()
        streamed = "".join(streamer)
        thread.join()
    assert torch.equal(result["ids"], expected)
    assert streamed == tokenizer.decode(expected[0, ids.shape[1]:])
    torch.manual_seed(3)
    assert not torch.equal(model.generate(ids, **kw), expected)  # the steering changed the text


def test_style_library(load_tiny, ids, tmp_path):
    model = load_tiny("opt")
    a, b = two_styles(model)
    folder = tmp_path / "styles"
    hnkit.save(a, folder / "noir.safetensors")
    hnkit.save(b, folder / "whimsy.pt")
    (folder / "notes.txt").write_text("not a style")
    lib = hnkit.StyleLibrary(folder)
    assert list(lib) == ["noir", "whimsy"] and len(lib) == 2 and "noir" in lib
    assert lib["noir"] is lib["noir"]  # loaded once
    assert all(torch.equal(p, q) for p, q in zip(lib["whimsy"].parameters(), b.parameters()))
    with hnkit.attach(model, [(a, 0.5), (b, -0.25)]):
        expected = logits(model, ids)
    with hnkit.steer(model, {"noir": 0.5, "whimsy": -0.25}, library=lib):
        assert torch.equal(logits(model, ids), expected)
    with hnkit.steer(model, {"noir": 0.5, folder / "whimsy.pt": -0.25}, library=folder):  # a folder, a path
        assert torch.equal(logits(model, ids), expected)
    with pytest.raises(HnkitError, match="no style named 'gothic'.*noir, whimsy"):
        hnkit.steer(model, "gothic", library=lib)
    hnkit.save(a, folder / "noir.pt")
    with pytest.raises(HnkitError, match="ambiguous"):
        hnkit.StyleLibrary(folder)["noir"]
    with pytest.raises(HnkitError, match="no such folder"):
        hnkit.StyleLibrary(tmp_path / "missing")


def test_style_arguments_take_only_a_trailing_number_as_strength(tmp_path):
    assert parse_style_arg("noir.pt:0.6") == ("noir.pt", 0.6)
    assert parse_style_arg("noir.pt:-1.5e-1") == ("noir.pt", -0.15)
    assert parse_style_arg("noir.pt") == ("noir.pt", 1.0)
    assert parse_style_arg("C:/styles/noir.pt") == ("C:/styles/noir.pt", 1.0)
    assert parse_style_arg("a:b.safetensors") == ("a:b.safetensors", 1.0)
    with pytest.raises(HnkitError, match="finite"):
        parse_style_arg("noir.pt:inf")
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(HnkitError, match="bad strength 'abc'"):
        parse_style_arg(f"{tmp_path / 'x.pt'}:abc")
