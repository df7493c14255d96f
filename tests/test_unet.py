"""The Stable Diffusion UNet target: sites, exactness against the web UI's math, the once-per-call
text-context memo, diffusers pipelines and ``hnkit generate-image``. Tiny pipelines built by
hnkit.testing, loaded back through from_pretrained."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig, HypernetworkModule
from hnkit.commands.cli import main
from hnkit.targets import find_sites
from hnkit.testing import CONTEXT_WIDTH, KINDS, SELF_WIDTHS, build_tiny_sd

STRONG = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")


@pytest.fixture(scope="session")
def sd_dirs(tmp_path_factory):
    """kind -> folder of a tiny saved pipeline, each built once per session."""
    root = tmp_path_factory.mktemp("tiny_sd")
    return {kind: build_tiny_sd(root / kind, kind) for kind in KINDS}


@pytest.fixture
def load_unet(sd_dirs):
    def load(kind):
        return UNet2DConditionModel.from_pretrained(sd_dirs[kind], subfolder="unet").eval()

    return load


def unet_inputs(kind, batch=2):
    g = torch.Generator().manual_seed(0)
    kwargs = {"encoder_hidden_states": torch.randn(batch, 77, CONTEXT_WIDTH[kind], generator=g)}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(500)), kwargs


def run_unet(unet, kind, grad=False):
    args, kwargs = unet_inputs(kind)
    with torch.set_grad_enabled(grad):
        return unet(*args, **kwargs).sample


def hypernetwork(unet, config=STRONG, seed=0):
    torch.manual_seed(seed)
    return Hypernetwork.for_model(unet, config).eval()


# -- the tiny pipelines ------------------------------------------------------------------------------
def test_tiny_pipelines_are_deterministic_and_complete(sd_dirs, tmp_path):
    from safetensors.torch import load_file

    again = build_tiny_sd(tmp_path / "again", "sd1")
    for part in ("unet", "vae", "text_encoder"):
        a, b = (load_file(next((d / part).glob("*.safetensors"))) for d in (sd_dirs["sd1"], again))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sd2 = StableDiffusionPipeline.from_pretrained(sd_dirs["sd2v"])
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    xl = StableDiffusionXLPipeline.from_pretrained(sd_dirs["sdxl"])
    assert xl.unet.config.addition_embed_type == "text_time"
    assert xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size == CONTEXT_WIDTH["sdxl"]
    ids = xl.tokenizer_2("a cat on the mat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:7] == xl.tokenizer("a cat on the mat").input_ids


# -- sites -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sites_are_self_and_cross_attention_by_input_width(kind, load_unet, sd_dirs):
    unet = load_unet(kind)
    family, sites = find_sites(unet)
    assert family == "sd_unet"
    self_attn = [s for s in sites if s.key.endswith("attn1")]
    cross_attn = [s for s in sites if s.key.endswith("attn2")]
    assert len(self_attn) == len(cross_attn) == len(sites) // 2
    assert {s.width for s in self_attn} == set(SELF_WIDTHS)
    assert {s.width for s in cross_attn} == {CONTEXT_WIDTH[kind]}
    for site in sites:  # the width is what feeds to_k, and the key names the module
        attn = unet.get_submodule(site.key)
        assert attn.to_k.in_features == site.width and type(attn).__name__ == "Attention"
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2" in {s.key for s in sites}
    hn = Hypernetwork.for_model(unet)
    assert sorted(hn.keys()) == sorted([*SELF_WIDTHS, CONTEXT_WIDTH[kind]])
    assert hn.family == "sd_unet" and hn.base_model == str(sd_dirs[kind])
    per_site = Hypernetwork.for_model(unet, HypernetworkConfig(per_site=True))
    assert per_site.keys() == [s.key for s in sites]


@pytest.mark.parametrize("kind", KINDS)
def test_strength_zero_and_remove_are_bit_identical(kind, load_unet):
    unet = load_unet(kind)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run_unet(unet, kind)
    hn = hypernetwork(unet)
    with hnkit.attach(unet, hn, strength=0.0) as handle:
        assert torch.equal(run_unet(unet, kind), base)
        handle.strength = 0.7
        assert not torch.allclose(run_unet(unet, kind), base, atol=1e-3)
        assert list(unet.state_dict()) == list(before)  # never registered inside the UNet
    assert torch.equal(run_unet(unet, kind), base)
    after = unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in unet.parameters())


def test_self_and_cross_attention_widths_act_separately(load_unet):
    unet = load_unet("sd1")
    base = run_unet(unet, "sd1")
    torch.manual_seed(0)
    only_text = Hypernetwork(STRONG, [CONTEXT_WIDTH["sd1"]])
    only_self = Hypernetwork(STRONG, [SELF_WIDTHS[0]])
    outs = []
    for hn in (only_text, only_self):
        with hnkit.attach(unet, hn):
            outs.append(run_unet(unet, "sd1"))
    assert not torch.allclose(outs[0], base, atol=1e-3)
    assert not torch.allclose(outs[1], base, atol=1e-3)
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


def test_bad_models_and_widths_are_one_line_errors(load_unet, sd_dirs):
    unet = load_unet("sd1")
    with pytest.raises(HnkitError, match=r"widths \[768, 1280\].*sd_unet.*widths \[32, 48, 64\]") as err:
        hnkit.attach(unet, Hypernetwork(keys=[768, 1280]))
    assert "\n" not in str(err.value)
    with pytest.raises(HnkitError, match="supported families: .*sd_unet"):
        hnkit.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), Hypernetwork(keys=[4]))
    pipe = StableDiffusionPipeline.from_pretrained(sd_dirs["sd1"])
    with pytest.raises(HnkitError, match=r"StableDiffusionPipeline, not a model: .*pipe\.unet"):
        hnkit.attach(pipe, Hypernetwork(keys=[48]))
    unet.fuse_qkv_projections()  # diffusers then computes K and V without to_k / to_v
    with pytest.raises(HnkitError, match="unfuse_qkv_projections"):
        hnkit.attach(unet, Hypernetwork(keys=[48]))


# -- the web UI's math, written out from docs/design.md section 2 ------------------------------------
_ACTIVATIONS = {"relu": F.relu, "swish": F.hardswish, "tanh": torch.tanh, "elu": F.elu, "sigmoid": torch.sigmoid,
                "leakyrelu": F.leaky_relu, "gelu": F.gelu}


def webui_module(state_dict, meta):
    """``x -> x + s * mlp(x)`` from a web UI state dict and the file's metadata (with the file
    format's defaults), indexing ``linear.N`` the way torch.nn.Sequential numbers the children."""
    ls = meta.get("layer_structure") or [1, 2, 1]
    act = meta.get("activation_func")
    act = None if act in (None, "linear") else _ACTIVATIONS[act]
    ln = meta.get("is_layer_norm", False)
    activate_output = meta.get("activate_output", True)
    dropout = meta.get("dropout_structure")
    if dropout is None:  # the legacy placement
        n = len(ls)
        dropout = ([0] + [0.3] * (n - 3) + [0.3 if meta.get("last_layer_dropout") else 0] + [0]
                   if meta.get("use_dropout") else [0] * n)
    oldest = {"linear1": "linear.0", "linear2": "linear.1"}  # the first files: two Linears, no metadata
    sd = {}
    for name, tensor in state_dict.items():
        layer, param = name.rsplit(".", 1)
        sd[f"{oldest.get(layer, layer)}.{param}"] = tensor
    ops, index = [], 0
    for i in range(len(ls) - 1):
        ops.append(("linear", index))
        index += 1
        if act is not None and (i < len(ls) - 2 or activate_output):
            ops.append(("act", index))
            index += 1
        if ln:
            ops.append(("ln", index))
            index += 1
        if dropout[i + 1] > 0:
            index += 1  # Dropout: identity in eval mode, but it takes an index
    used = {f"linear.{j}.{p}" for kind, j in ops if kind != "act" for p in ("weight", "bias")}
    assert used == set(sd), (sorted(used), sorted(sd))  # every weight of the file, and only those

    def forward(x, strength):
        h = x
        for kind, j in ops:
            if kind == "linear":
                h = F.linear(h, sd[f"linear.{j}.weight"], sd[f"linear.{j}.bias"])
            elif kind == "act":
                h = act(h)
            else:
                h = F.layer_norm(h, h.shape[-1:], sd[f"linear.{j}.weight"], sd[f"linear.{j}.bias"])
        return x + strength * h

    return forward


class WebUIAttention:
    """A diffusers attention processor that does what the web UI's attention does with
    hypernetworks: ``context = x`` for self-attention, then ``k = to_k(hn_k(context))`` and
    ``v = to_v(hn_v(context))`` through each network in order, softmax(QK^T / sqrt(d)) V, to_out."""

    def __init__(self, files):  # [(the .pt dict, strength)]
        self.files = files

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert attention_mask is None and hidden_states.ndim == 3 and attn.norm_cross is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        x = hidden_states
        context = x if encoder_hidden_states is None else encoder_hidden_states
        context_k = context_v = context
        for data, strength in self.files:
            width = context.shape[-1]
            if width in data:
                context_k = webui_module(data[width][0], data)(context_k, strength)
                context_v = webui_module(data[width][1], data)(context_v, strength)
        q, k, v = attn.to_q(x), attn.to_k(context_k), attn.to_v(context_v)
        b, heads = x.shape[0], attn.heads
        q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, x.shape[1], -1)
        return attn.to_out[1](attn.to_out[0](out))


def reference_output(unet, kind, files):
    saved = unet.attn_processors
    unet.set_attn_processor(WebUIAttention(files))
    try:
        return run_unet(unet, kind)
    finally:
        unet.set_attn_processor(saved)


MIXES = {
    "relu": HypernetworkConfig([1, 2, 1], "relu", weight_init="XavierNormal"),
    "linear": HypernetworkConfig([1, 1], None, weight_init="XavierUniform"),
    "swish-layernorm-activated": HypernetworkConfig([1, 1.5, 1], "swish", layer_norm=True, activate_output=True,
                                                    weight_init="KaimingNormal"),
    "tanh-dropout-layernorm": HypernetworkConfig([1, 2, 2, 1], "tanh", layer_norm=True,
                                                 dropout_structure=[0, 0.2, 0.1, 0], weight_init="XavierNormal"),
}


def _randomize_layer_norms(hn):
    # Web UI init draws LayerNorm weights from N(0, 0.01), which all but hides them; make them count.
    for m in hn.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)


@pytest.mark.parametrize("mix", list(MIXES))
def test_matches_the_web_ui_math_through_a_pt_file(mix, load_unet, tmp_path):
    kind = "sd1"
    unet = load_unet(kind)
    hn = hypernetwork(unet, MIXES[mix])
    _randomize_layer_norms(hn)
    hnkit.save(hn, tmp_path / "x.pt")
    data = torch.load(tmp_path / "x.pt", weights_only=True)
    expected = reference_output(unet, kind, [(data, 0.8)])
    base = run_unet(unet, kind)
    with hnkit.attach(unet, hnkit.load(tmp_path / "x.pt"), strength=0.8):
        got = run_unet(unet, kind)
    assert not torch.allclose(expected, base, atol=1e-3)  # the check bites
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd2v", "sdxl"])
def test_two_chained_networks_match_the_web_ui(kind, load_unet, tmp_path):
    unet = load_unet(kind)
    a = hypernetwork(unet, MIXES["relu"], seed=1)
    b = hypernetwork(unet, MIXES["swish-layernorm-activated"], seed=2)
    _randomize_layer_norms(b)
    hnkit.save(a, tmp_path / "a.pt")
    hnkit.save(b, tmp_path / "b.pt")
    files = [(torch.load(tmp_path / f, weights_only=True), s) for f, s in (("a.pt", 0.7), ("b.pt", 0.3))]
    expected = reference_output(unet, kind, files)
    with hnkit.attach(unet, [(hnkit.load(tmp_path / "a.pt"), 0.7), (hnkit.load(tmp_path / "b.pt"), 0.3)]):
        got = run_unet(unet, kind)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    only_a = reference_output(unet, kind, files[:1])
    assert not torch.allclose(got, only_a, atol=1e-3)  # the second network does act


def _state(width_in, width_hidden, names, g):
    """A state dict with web UI key names: names[i] is the Sequential index of Linear i."""
    sizes = [(width_hidden, width_in), (width_in, width_hidden)]
    sd = {}
    for name, (out, inp) in zip(names, sizes):
        sd[f"{name}.weight"] = torch.randn(out, inp, generator=g) * 0.3
        sd[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1
    return sd


def test_hand_written_web_ui_files_load_and_match(load_unet, tmp_path):
    """Files written the way other tools write them, not by hnkit: the oldest format (linear1 /
    linear2, no metadata) and one without activate_output (so the last layer is activated) and
    with legacy use_dropout (Dropout children shift the indices)."""
    unet = load_unet("sd1")
    g = torch.Generator().manual_seed(0)
    oldest = {w: (_state(w, 2 * w, ["linear1", "linear2"], g), _state(w, 2 * w, ["linear1", "linear2"], g))
              for w in (48, 64)}
    # relu + legacy dropout, [1, 2, 1], use_dropout with last_layer_dropout: [0, 0.3, 0] -> children
    # Linear(0) ReLU(1) Dropout(2) Linear(3) ReLU(4): activate_output is missing, so True.
    legacy = {32: (_state(32, 64, ["linear.0", "linear.3"], g), _state(32, 64, ["linear.0", "linear.3"], g)),
              "layer_structure": [1, 2, 1], "activation_func": "relu", "use_dropout": True,
              "last_layer_dropout": True, "name": "legacy", "step": 12}
    torch.save(oldest, tmp_path / "oldest.pt")
    torch.save(legacy, tmp_path / "legacy.pt")
    a, b = hnkit.load(tmp_path / "oldest.pt"), hnkit.load(tmp_path / "legacy.pt")
    assert a.name == "oldest" and a.config.activate_output and b.config.dropout_structure == [0, 0.3, 0]
    expected = reference_output(unet, "sd1", [(oldest, 1.0), (legacy, 0.5)])
    with hnkit.attach(unet, [(a.eval(), 1.0), (b.eval(), 0.5)]):
        got = run_unet(unet, "sd1")
    assert not torch.allclose(expected, run_unet(unet, "sd1"), atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- the text context: K and V modules once per UNet call ------------------------------------------
@pytest.fixture
def count_module_calls(monkeypatch):
    """Counts HypernetworkModule.forward() runs per input width (the Chain kernel calls forward())."""
    calls = {}
    original = HypernetworkModule.forward

    def counting(self, x, strength=1.0):
        calls[self.dim] = calls.get(self.dim, 0) + 1
        return original(self, x, strength)

    monkeypatch.setattr(HypernetworkModule, "forward", counting)
    return calls


def _without_memo(monkeypatch):
    from hnkit.kernels import Memo

    monkeypatch.setattr(Memo, "make", lambda self, context: None)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_context_modules_run_once_per_unet_call(kind, load_unet, count_module_calls, monkeypatch):
    unet = load_unet(kind)
    _, sites = find_sites(unet)
    n_cross = sum(s.key.endswith("attn2") for s in sites)
    n_self = {w: sum(s.key.endswith("attn1") and s.width == w for s in sites) for w in SELF_WIDTHS}
    a, b = hypernetwork(unet, seed=1), hypernetwork(unet, seed=2)
    ctx = CONTEXT_WIDTH[kind]
    with hnkit.attach(unet, [(a, 0.7), (b, 0.4)]):
        memoized = run_unet(unet, kind)
        # Two networks, one context width: K and V of each, once: 4 module calls for 2x n_cross layers.
        assert count_module_calls[ctx] == 2 * 2
        assert all(count_module_calls[w] == 2 * 2 * n_self[w] for w in SELF_WIDTHS)  # attn1: every layer
        count_module_calls.clear()
        run_unet(unet, kind)
        assert count_module_calls[ctx] == 4  # again next call, not zero: the memo is per call
    count_module_calls.clear()
    _without_memo(monkeypatch)
    with hnkit.attach(unet, [(a, 0.7), (b, 0.4)]):
        plain = run_unet(unet, kind)
    assert count_module_calls[ctx] == 2 * 2 * n_cross
    assert torch.equal(memoized, plain)


def test_memo_follows_strengths_and_weights_between_calls(load_unet, monkeypatch):
    """Training feeds the same cached text-embedding tensor step after step while the weights
    change; a UI changes strengths between calls. Each call must see the current values."""
    unet = load_unet("sd1")
    hn = hypernetwork(unet)
    args, kwargs = unet_inputs("sd1")  # the very same tensors on every call

    def call():
        with torch.no_grad():
            return unet(*args, **kwargs).sample

    with hnkit.attach(unet, hn, 0.3) as handle:
        call()
        handle.strength = 0.9
        at_09 = call()
        with torch.no_grad():
            for p in hn.parameters():
                p.mul_(1.5)  # an optimizer step, in place
        stepped = call()
    _without_memo(monkeypatch)
    with hnkit.attach(unet, hn, 0.9):
        assert torch.equal(call(), stepped)
        with torch.no_grad():
            for p in hn.parameters():
                p.div_(1.5)
        # mul then div by 1.5 restores the weights up to rounding, not bit for bit
        torch.testing.assert_close(call(), at_09, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(stepped, at_09, atol=1e-3)


@pytest.mark.parametrize("dropout", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(dropout, load_unet, count_module_calls):
    config = HypernetworkConfig([1, 2, 1], "relu", weight_init="XavierNormal",
                                dropout_structure=[0, 0.3, 0] if dropout else None)
    unet = load_unet("sd1")
    hn = hypernetwork(unet, config).train()
    grads, calls = [], []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        hn.zero_grad()
        count_module_calls.clear()
        with hnkit.attach(unet, hn):
            torch.manual_seed(1)
            run_unet(unet, "sd1", grad=True).square().mean().backward()
        grads.append([p.grad.clone() for p in hn.parameters()])
        calls.append(count_module_calls.get(CONTEXT_WIDTH["sd1"]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in grads[0])
    assert all(p.grad is None for p in unet.parameters())
    n_cross = sum(s.key.endswith("attn2") for s in find_sites(unet)[1])
    # With dropout in training mode each layer draws its own mask, as in the web UI: no memo.
    # Otherwise once per call; checkpointing's recompute in backward finds the same memo.
    assert calls[0] == (2 * n_cross if dropout else 2)
    assert calls[1] == calls[0] * (2 if dropout else 1)  # dropout: recomputed in backward too


def test_per_site_hypernetwork_on_the_unet(load_unet):
    unet = load_unet("sd1")
    hn = hypernetwork(unet, HypernetworkConfig([1, 2, 1], "relu", weight_init="XavierNormal", per_site=True))
    with hnkit.attach(unet, hn):
        run_unet(unet, "sd1", grad=True).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hn.parameters())


# -- pipelines ---------------------------------------------------------------------------------------
def _images(pipe):
    generator = torch.Generator().manual_seed(7)
    return pipe("a cat on the mat", negative_prompt="blue", num_inference_steps=2, generator=generator,
                output_type="pt").images


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_pipeline_attach_chain_and_remove(kind, sd_dirs):
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(sd_dirs[kind])
    pipe.set_progress_bar_config(disable=True)
    base = _images(pipe)
    hn1, hn2 = hypernetwork(pipe.unet, seed=1), hypernetwork(pipe.unet, seed=2)
    with hnkit.attach(pipe.unet, hn1, strength=0.0) as handle:
        assert torch.equal(_images(pipe), base)
        handle.strength = 0.7
        single = _images(pipe)
    assert not torch.allclose(single, base, atol=1e-3)
    with hnkit.attach(pipe.unet, [(hn1, 0.7), (hn2, 0.3)]):
        chained = _images(pipe)
    assert not torch.allclose(chained, single, atol=1e-3)
    handle = hnkit.attach(pipe.unet, hn1, strength=0.7)
    assert torch.equal(_images(pipe), single)  # reproducible for a seed
    handle.remove()
    assert torch.equal(_images(pipe), base)


# -- hnkit generate-image ----------------------------------------------------------------------------
@pytest.fixture
def sd1_file(sd_dirs, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(sd_dirs["sd1"], subfolder="unet")
    path = tmp_path / "ink.pt"
    hnkit.save(hypernetwork(unet), path)
    return path


def generate(sd_dirs, out, *extra, kind="sd1"):
    return main(["generate-image", "--model", str(sd_dirs[kind]), "--prompt", "a cat on the mat",
                 "--steps", "2", "--output", str(out), *map(str, extra)])


def pixels(image):
    return torch.tensor(list(image.convert("RGB").getdata()))


def test_generate_image_writes_pngs_and_a_strength_grid(sd_dirs, sd1_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(sd_dirs, out, "--hypernetwork", f"{sd1_file}:0.8", "--seed", 3, "--num-images", 2,
                    "--grid", "0,0.5,1") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"00-a-cat-on-the-mat-seed{s}-x{g}.png" for s in (3, 4) for g in ("0", "0.5", "1")]
                           + ["grid.png"])
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 32, 2 * 32)  # columns: strengths, rows: seeds
    def cell(r, c):
        return pixels(grid.crop((32 * c, 32 * r, 32 * c + 32, 32 * r + 32)))

    assert torch.equal(cell(0, 0), pixels(Image.open(out / "00-a-cat-on-the-mat-seed3-x0.png")))
    assert not torch.equal(cell(0, 0), cell(0, 2)) and not torch.equal(cell(0, 0), cell(1, 0))
    info = json.loads(Image.open(out / "00-a-cat-on-the-mat-seed4-x0.5.png").text["hnkit"])
    assert info["seed"] == 4 and info["hypernetworks"] == [[str(sd1_file), 0.4]]
    # Factor 0 is the base model: the same pixels as a run without hypernetworks.
    assert generate(sd_dirs, tmp_path / "plain", "--seed", 3) == 0
    plain = Image.open(tmp_path / "plain" / "00-a-cat-on-the-mat-seed3.png")
    assert torch.equal(pixels(plain), pixels(Image.open(out / "00-a-cat-on-the-mat-seed3-x0.png")))
    # A second run never overwrites: new names.
    before = {p: p.read_bytes() for p in out.iterdir()}
    assert generate(sd_dirs, out, "--hypernetwork", sd1_file, "--seed", 3) == 0
    assert all(p.read_bytes() == b for p, b in before.items())
    assert (out / "00-a-cat-on-the-mat-seed3.png").exists()
    assert generate(sd_dirs, out, "--hypernetwork", sd1_file, "--seed", 3) == 0
    assert (out / "00-a-cat-on-the-mat-seed3-2.png").exists()
    assert "wrote" in capsys.readouterr().out


def test_generate_image_sdxl(sd_dirs, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(sd_dirs["sdxl"], subfolder="unet")
    hnkit.save(hypernetwork(unet), tmp_path / "xl.safetensors")
    assert generate(sd_dirs, tmp_path / "out", "--hypernetwork", tmp_path / "xl.safetensors", kind="sdxl") == 0
    assert Image.open(tmp_path / "out" / "00-a-cat-on-the-mat-seed0.png").size == (32, 32)


def test_hypernetwork_spec_parsing(tmp_path):
    """``FILE[:STRENGTH]`` as every command reads it (generate-image: any finite strength)."""
    from hnkit.commands.common import parse_styles

    def parse(spec):
        return parse_styles([spec], bounded=False)[0]

    assert parse("ink.pt") == (Path("ink.pt"), 1.0)
    assert parse("ink.pt:0.75")[1] == 0.75 and parse("ink.pt:-1e-1")[1] == -0.1
    assert parse(r"C:\nets\ink.pt") == (Path(r"C:\nets\ink.pt"), 1.0)
    assert parse(r"C:\nets\ink.pt:.5") == (Path(r"C:\nets\ink.pt"), 0.5)
    odd = tmp_path / "a:b.pt"  # a colon inside an existing name is part of the name
    odd.write_bytes(b"x")
    assert parse(str(odd)) == (odd, 1.0)
    timed = tmp_path / "ink.pt:2"  # the whole name exists: no strength split off
    timed.write_bytes(b"x")
    assert parse(str(timed)) == (timed, 1.0)
    (tmp_path / "real.pt").write_bytes(b"x")
    with pytest.raises(HnkitError, match="bad strength 'strong'"):
        parse(f"{tmp_path / 'real.pt'}:strong")
    with pytest.raises(HnkitError, match="finite"):
        parse("ink.pt:nan")


def test_generate_image_bad_input_is_one_line_exit_2_and_writes_nothing(sd_dirs, sd1_file, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    hnkit.save(Hypernetwork(HypernetworkConfig([1, 1]), [80]), tmp_path / "xl.pt")  # fits only the tiny SDXL
    cases = [
        (["--model", tmp_path / "nowhere"], "no such model folder"),
        (["--model", tmp_path], "no model_index.json"),
        (["--hypernetwork", tmp_path / "missing.pt"], "missing.pt: no such file"),
        (["--hypernetwork", bad], "bad.pt: (refused|corrupt)"),
        (["--hypernetwork", f"{sd1_file}:lots"], "bad strength 'lots'"),
        (["--hypernetwork", tmp_path / "xl.pt"], r"xl.pt: .*widths \[80\].*fit no attention layer"),
        (["--grid", "0,x"], "bad strength 'x'"),
        (["--grid", "0,1"], "--grid varies hypernetwork strengths"),
        (["--width", 30], "--width 30: must be a positive multiple of 8"),
        (["--steps", 0], "--steps 0"),
    ]
    for extra, message in cases:
        argv = ["generate-image", "--model", str(sd_dirs["sd1"]), "--prompt", "x", "--steps", "1",
                "--output", str(out)]
        argv += [str(a) for a in extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("hnkit: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
        assert not out.exists()  # nothing written


def test_inspect_a_unet_width_file(sd1_file, capsys):
    assert main(["inspect", str(sd1_file)]) == 0
    out = capsys.readouterr().out
    assert "32, 48, 64" in out and "relu" in out


def test_linear_modules_multiply_their_weights_once_per_unet_call(load_unet, monkeypatch):
    """A linear module whose sites see enough rows in one UNet call gets its product W2 @ W1 once,
    at the root (the Collapsed kernel): the same outputs and gradients as the modules run at every
    site, also when checkpointing recomputes the blocks in backward."""
    from conftest import plain_run

    unet = load_unet("sd1")
    hn = hypernetwork(unet, HypernetworkConfig([1, 2, 1], None, weight_init="XavierNormal")).train()
    n_modules = 2 * len(hn.keys())  # K and V per width: each sees hundreds of rows here
    products = []
    original = HypernetworkModule.affine
    monkeypatch.setattr(HypernetworkModule, "affine",
                        lambda self, dtype=None: products.append(self) or original(self, dtype))

    def run(checkpointing=False):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        hn.zero_grad()
        del products[:]
        with hnkit.attach(unet, hn):
            out = run_unet(unet, "sd1", grad=True)
            out.square().mean().backward()
        unet.disable_gradient_checkpointing()
        return [out.detach()] + [p.grad.clone() for p in hn.parameters()], len(products)

    def run_plain():
        hn.zero_grad()
        out = plain_run(unet, hn, 1.0, lambda: run_unet(unet, "sd1", grad=True), monkeypatch)
        out.square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in hn.parameters()]

    kept, n_kept = run()
    assert n_kept == n_modules  # once per module and call
    checkpointed, n_checkpointed = run(checkpointing=True)
    assert n_checkpointed == n_modules  # the recomputation reads the products made at the root
    del products[:]
    per_site = run_plain()
    assert not products
    for a, b, c in zip(kept, checkpointed, per_site):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in kept[1:])
    with hnkit.attach(unet, hn):
        for _ in range(3):  # without gradients (a denoising loop): nothing is kept between calls
            first = run_unet(unet, "sd1")
        assert len(products) == 3 * n_modules
        with torch.no_grad():
            for p in hn.parameters():
                p.mul_(1.1)  # a weight changes: the next call sees it
        assert not torch.allclose(run_unet(unet, "sd1"), first, atol=1e-4)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_fuse_folds_a_linear_network_into_the_unet(kind, load_unet):
    """hnkit.fuse on the UNet: to_k/to_v weights of every attn1 and attn2 take the network in,
    the output equals the attached one up to rounding, and unfuse gives the UNet back bit for bit."""
    unet = load_unet(kind)
    hn = hypernetwork(unet, HypernetworkConfig([1, 2, 1], None, weight_init="XavierNormal"))
    base = run_unet(unet, kind)
    with hnkit.attach(unet, hn, strength=0.8):
        attached = run_unet(unet, kind)
    with hnkit.fuse(unet, hn, strength=0.8) as fusion:
        fused = run_unet(unet, kind)
        assert fusion.num_params == 4 * len(find_sites(unet)[1])  # weight and bias of to_k and to_v
    torch.testing.assert_close(fused, attached, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused, base, atol=1e-3)
    assert torch.equal(run_unet(unet, kind), base)
