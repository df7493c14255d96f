"""``hnkit export --format peft``: the adapter, loaded back with PEFT, gives hnkit's logits (exact
forms), comes closer to hnkit than the bare model (fitted forms), and bad input is one line."""

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import refused_in_one_line

import hnkit
from hnkit.commands.cli import main
from hnkit.export import lora_factors
from hnkit.export_peft import write_peft

peft = pytest.importorskip("peft")

SMOLLM2 = Path("~/.cache/hnkit/SmolLM2-135M-Instruct").expanduser()


def random_network(model, seed=0, std=0.1, **config):
    """A network of ``config`` for ``model`` with every weight and bias drawn from N(0, std): biases
    non-zero, so that the export must carry the constant term."""
    torch.manual_seed(seed)
    hn = hnkit.Hypernetwork.for_model(model, hnkit.HypernetworkConfig(**config), name="style")
    with torch.no_grad():
        for p in hn.parameters():
            p.normal_(0, std)
    return hn


def peft_logits(model, folder, ids):
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(model, str(folder))
        try:
            return peft_model(input_ids=ids).logits
        finally:
            peft_model.unload()


def attached_logits(model, hn, strength, ids):
    with torch.no_grad(), hnkit.attach(model, hn, strength):
        return model(input_ids=ids).logits


EXACT = {
    "lowrank": dict(form="lowrank", rank=4),
    "linear-mlp": dict(layer_structure=[1, 0.5, 1]),
    "lowrank-per-site": dict(form="lowrank", rank=3, per_site=True),
    "linear-mlp-per-site": dict(layer_structure=[1, 0.5, 1], per_site=True),
    "deep-linear-mlp": dict(layer_structure=[1, 2, 0.25, 1]),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_forms_give_hnkits_logits_through_peft(load_tiny, ids, tmp_path, name):
    model = load_tiny("llama")
    hn = random_network(model, **EXACT[name])
    factors = lora_factors(hn, model, 0.8)
    assert factors.exact and factors.family == "llama"
    assert factors.module_names[1] == {"k": "model.layers.1.self_attn.k_proj", "v": "model.layers.1.self_attn.v_proj"}
    out = write_peft(factors, tmp_path / "lora", base_model="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_bias"] is True  # the biases are the constant term
    assert config["r"] == config["lora_alpha"] == factors.rank
    assert sorted(config["target_modules"]) == ["k_proj", "v_proj"] and config["base_model_name_or_path"] == "tiny"
    ref = attached_logits(model, hn, 0.8, ids)
    bare = model(input_ids=ids).logits.detach()
    got = peft_logits(model, out, ids)
    assert (ref - bare).abs().max() > 1e-2  # the network does act
    assert (got - ref).abs().max() <= 1e-4


def test_a_network_on_some_layers_targets_those_modules_only(load_tiny, ids, tmp_path):
    model = load_tiny("llama")
    hn = hnkit.Hypernetwork(hnkit.HypernetworkConfig(form="lowrank", rank=2, per_site=True), name="one",
                            keys=["layers.1.self_attn"], widths={"layers.1.self_attn": 32})
    with torch.no_grad():
        for p in hn.parameters():
            p.normal_(0, 0.2)
    out = write_peft(lora_factors(hn, model), tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    assert (peft_logits(model, out, ids) - attached_logits(model, hn, 1.0, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3", "opt", "qwen3"])
def test_fused_and_other_families_export_exactly(load_tiny, ids, tmp_path, family):
    model = load_tiny(family)
    hn = random_network(model, layer_structure=[1, 0.5, 1])
    factors = lora_factors(hn, model, 1.0)
    out = write_peft(factors, tmp_path / "lora")
    ref = attached_logits(model, hn, 1.0, ids)
    assert (peft_logits(model, out, ids) - ref).abs().max() <= 1e-4
    if family in ("gpt2", "gpt_neox", "phi3"):  # one LoRA on the fused projection: K and V side by side
        assert factors.module_names[0]["k"] == factors.module_names[0]["v"]
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 2 * factors.rank


def test_no_bias_drops_exactly_the_constant_term(load_tiny, ids, tmp_path):
    model = load_tiny("llama")
    hn = random_network(model, form="lowrank", rank=4)
    out = write_peft(lora_factors(hn, model), tmp_path / "lora", bias=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is False
    assert not lora_factors(hn, model, bias=False).exact  # its biases are nonzero
    with torch.no_grad():
        for key in hn.keys():
            for m in hn[key]:
                m.up.bias.zero_()
    assert (peft_logits(model, out, ids) - attached_logits(model, hn, 1.0, ids)).abs().max() <= 1e-4


def test_a_smaller_rank_cuts_an_exact_network(load_tiny, ids):
    model = load_tiny("llama")
    factors = lora_factors(random_network(model, form="lowrank", rank=8), model, rank=2)
    assert not factors.exact and factors.rank == 2
    assert all(a.shape[0] == 2 for per in factors.layers.values() for a, _, _ in per.values())


# -- through the command line, on a tiny Llama with a tokenizer --------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tiny_lm, tmp_path_factory):
    from hnkit.testing import build_tiny_llama

    folder = build_tiny_llama(tmp_path_factory.mktemp("llama") / "model", tiny_lm["model"])
    return {"model": folder, "corpus": tiny_lm["corpus"]}


def save_style(model_folder, path, seed=0, **config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    hn = random_network(model, seed, **config)
    hnkit.save(hn, path)
    return hn


def test_a_relu_network_is_fitted_and_closer_to_hnkit_than_the_bare_model(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    style = tmp_path / "relu.safetensors"
    hn = save_style(tiny_llama["model"], style, layer_structure=[1, 2, 1], activation="relu")
    out, neutral = tmp_path / "lora", tmp_path / "neutral.txt"
    neutral.write_text(" ".join(f"Line {i}: the weather was mild and the shops opened at nine." for i in range(300)))
    assert main(["export", str(style), "--model", str(tiny_llama["model"]), "--format", "peft", "--output", str(out),
                 "--data", str(tiny_llama["corpus"]), "--neutral-data", str(neutral), "--rank", "8"]) == 0
    printed = capsys.readouterr().out
    assert "fitted LoRA of rank 8" in printed and "relative error" in printed and "fidelity" in printed
    assert any(x.strip().startswith("neutral") and "export" in x for x in printed.splitlines())
    line = next(x for x in printed.splitlines() if x.strip().startswith("style") and "bare" in x)
    bare, hn_ppl, export = (float(line.split(word)[1].split()[0]) for word in ("bare", "hnkit", "export"))
    assert abs(export - hn_ppl) < abs(bare - hn_ppl)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama["model"]).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = attached_logits(model, hn, 1.0, ids)
    bare_logits = model(input_ids=ids).logits.detach()
    got = peft_logits(model, out, ids)
    assert (got - ref).norm() < 0.5 * (bare_logits - ref).norm()
    # without the constant term the fit goes through the origin, and still comes closer than the bare model
    blocks = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(4))
    factors = lora_factors(hn, model, rank=8, texts=blocks, bias=False)
    assert not factors.exact and all(c is None for per in factors.layers.values() for _, _, c in per.values())
    got = peft_logits(model, write_peft(factors, tmp_path / "no-bias"), ids)
    assert (got - ref).norm() < (bare_logits - ref).norm()


def test_exact_export_through_the_cli_prints_its_fidelity(tiny_llama, tmp_path, capsys):
    style = tmp_path / "low.safetensors"
    save_style(tiny_llama["model"], style, form="lowrank", rank=4)
    out = tmp_path / "lora"
    out.mkdir()  # an empty folder is fine
    assert main(["export", str(style), "--model", str(tiny_llama["model"]), "--format", "peft", "--output", str(out),
                 "--strength", "0.7", "--data", str(tiny_llama["corpus"])]) == 0
    printed = capsys.readouterr().out
    assert "exact LoRA of rank 4" in printed and "lora_B.bias" in printed
    line = next(x for x in printed.splitlines() if "bare" in x)
    assert "export vs hnkit +0.00 %" in line or "export vs hnkit -0.00 %" in line
    # a second export into the same folder needs --force, and then replaces it whole
    before = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    refused_in_one_line(["export", str(style), "--model", str(tiny_llama["model"]), "--format", "peft",
                         "--output", str(out)], tmp_path, capsys, "--force")
    assert main(["export", str(style), "--model", str(tiny_llama["model"]), "--format", "peft", "--output", str(out),
                 "--force"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before  # strength 1 now, not 0.7
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_bad_input_is_one_line(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig

    model = str(tiny_llama["model"])
    relu = tmp_path / "relu.safetensors"
    save_style(model, relu, layer_structure=[1, 2, 1], activation="relu")
    sd = tmp_path / "sd.safetensors"
    hnkit.save(hnkit.Hypernetwork(hnkit.HypernetworkConfig(), keys=[320], family="sd_unet", name="sd"), sd)
    bloom = tmp_path / "bloom"
    bloom_config = BloomConfig(n_layer=1, hidden_size=32, n_head=4, vocab_size=300)
    AutoModelForCausalLM.from_config(bloom_config).save_pretrained(bloom)
    AutoTokenizer.from_pretrained(model).save_pretrained(bloom)
    low = tmp_path / "low.safetensors"
    save_style(model, low, form="lowrank", rank=2)
    base = ["export", "--format", "peft", "--output", str(tmp_path / "out")]
    cases = [
        ([str(sd), "--model", model], "SD UNet style"),
        ([str(tmp_path / "missing.safetensors"), "--model", model], "no such file"),
        ([str(low), "--model", str(bloom)], "unsupported model type 'bloom'"),
        ([str(relu), "--model", model], "give --data"),
        ([str(low), "--model", model, "--rank", "0"], "--rank"),
        ([str(low), "--model", model, "--data", str(tmp_path / "nothing.txt")], "no such file or folder"),
        ([str(low), "--model", model, "--strength", "nan"], "--strength"),
    ]
    capsys.readouterr()  # the loading above printed its own progress
    for argv, words in cases:
        refused_in_one_line(base + argv, tmp_path, capsys, words)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    refused_in_one_line(base + [str(low), "--model", model], tmp_path, capsys, "already exists and is not empty")
    (tmp_path / "file").write_text("mine")
    refused_in_one_line(["export", str(low), "--model", model, "--format", "peft", "--output", str(tmp_path / "file")],
                        tmp_path, capsys, "is a file")


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason=f"needs SmolLM2-135M-Instruct in {SMOLLM2} "
                    "(the demo's conversion: bash scripts/install.sh --demo)")
def test_smollm2_exact_export_gives_hnkits_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    hn = random_network(model, std=0.02, form="lowrank", rank=8)  # changes the logits by ~10
    out = write_peft(lora_factors(hn, model, 1.0), tmp_path / "lora", base_model=str(SMOLLM2))
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    ref = attached_logits(model, hn, 1.0, ids)
    assert (ref - model(input_ids=ids).logits.detach()).abs().max() > 1
    # fp32 rounding over 30 layers of logits near 20: about 6e-5, as hnkit.fuse differs from attach
    assert (peft_logits(model, out, ids) - ref).abs().max() <= 1e-4
    assert time.monotonic() - start < 30


def test_gguf_format_goes_to_the_gguf_writer(tiny_llama, tmp_path, capsys):
    pytest.importorskip("gguf")
    pytest.importorskip("hnkit.export_gguf")
    style = tmp_path / "low.safetensors"
    save_style(tiny_llama["model"], style, form="lowrank", rank=4)
    argv = ["export", str(style), "--model", str(tiny_llama["model"]), "--format", "gguf",
            "--output", str(tmp_path / "low.gguf")]
    capsys.readouterr()
    refused_in_one_line(argv, tmp_path, capsys, "--no-bias")  # llama.cpp's LoRA holds no constant term
    assert main(argv + ["--no-bias"]) == 0
    assert (tmp_path / "low.gguf").read_bytes()[:4] == b"GGUF"
