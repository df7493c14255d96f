"""The style generator (hnkit.generator) and ``hnkit make-style``: an untrained generator writes the
identity, the same example gives bit-identical weights, the style written is exactly what training
computed (the per-row residual), the file is an ordinary style, and bad input is one line."""

import io
import json
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hnkit
from hnkit import HnkitError, StyleGenerator
from hnkit.commands.cli import main
from hnkit.generator import MIN_EXAMPLE_CHARS, check_example
from hnkit.targets import find_target
from hnkit.testing import build_tiny_generator

from conftest import refused_in_one_line

NOIR = ("The rain fell on the city like a debt nobody meant to pay. I lit a cigarette and watched the "
        "street lights blink out one by one, the way my luck had. She came in at midnight, all legs and "
        "trouble, and asked me to find a man who did not want to be found.")
PYDOC = ("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or "
         "list) or other iterable object. The expression list is evaluated once; it should yield an "
         "iterable object. An iterator is created for the result of that object.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hnkit.testing import build_tiny_lm

    root = tmp_path_factory.mktemp("gen")
    lm = build_tiny_lm(root)
    gen = build_tiny_generator(lm["model"], root / "gen.safetensors", seed=0)
    return {"model": lm["model"], "generator": gen, "root": root}


def load(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    return model, AutoTokenizer.from_pretrained(tiny["model"])


def logits(model, ids, hn=None, strength=1.0):
    with torch.no_grad():
        if hn is None:
            return model(ids).logits
        with hnkit.attach(model, hn, strength):
            return model(ids).logits


def test_an_untrained_generator_writes_the_identity(tiny):
    model, tok = load(tiny)
    hn = StyleGenerator.for_model(model).make_style(model, NOIR, tok)
    ids = tok(PYDOC, return_tensors="pt").input_ids[:, :40]
    assert torch.equal(logits(model, ids, hn), logits(model, ids))


def test_the_same_example_gives_bit_identical_weights_and_others_differ(tiny):
    model, tok = load(tiny)
    gen = StyleGenerator.load(tiny["generator"])
    a, b = gen.make_style(model, NOIR, tok), StyleGenerator.load(tiny["generator"]).make_style(model, NOIR, tok)
    c = gen.make_style(model, PYDOC, tok)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    g = a.extra["generated"]
    assert g["generator_sha256"] == gen.sha256 and len(g["example_sha256"]) == 64
    ids = tok(PYDOC, return_tensors="pt").input_ids[:, :40]
    assert not torch.equal(logits(model, ids, a), logits(model, ids))  # a real style, not the identity
    assert logits(model, ids, a, 0.0).equal(logits(model, ids))  # strength 0 is the bare model


def test_the_written_style_is_what_training_computes_per_row(tiny):
    """The per-row residual the training loop uses (a different style in each row of one batch) gives
    the same logits as attaching each written style alone."""
    model, tok = load(tiny)
    gen = StyleGenerator.load(tiny["generator"])
    texts = [NOIR, PYDOC]
    means = torch.cat([gen.read(model, gen.token_ids(tok, t, 128)) for t in texts])
    g, b2 = gen.codes(means)
    ids = tok([PYDOC[:120], NOIR[:120]], return_tensors="pt", padding=False, truncation=True, max_length=24).input_ids
    undo = [site.install(lambda x, which, i=i: x + gen.residual(x, i, which, g[:, i, which], b2[:, i, which]))
            for i, site in enumerate(find_target(model).sites)]
    try:
        with torch.no_grad():
            rows = model(ids).logits
    finally:
        for u in undo:
            u()
    for r, text in enumerate(texts):
        alone = logits(model, ids[r:r + 1], gen.make_style(model, text, tok))
        torch.testing.assert_close(rows[r:r + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_generated_style_is_an_ordinary_style(tiny, tmp_path):
    """Saved and loaded back exactly; folded into the weights; one per row of a batch."""
    model, tok = load(tiny)
    gen = StyleGenerator.load(tiny["generator"])
    hn = gen.make_style(model, NOIR, tok, name="noir")
    ids = tok(PYDOC, return_tensors="pt").input_ids[:, :32]
    want = logits(model, ids, hn, 0.7)
    back = hnkit.load(hnkit.save(hn, tmp_path / "noir.safetensors"))
    assert torch.equal(logits(model, ids, back, 0.7), want)
    with torch.no_grad(), hnkit.fuse(model, hn, 0.7):
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert hnkit.load(tmp_path / "noir.safetensors").extra["generated"] == hn.extra["generated"]
    other = gen.make_style(model, PYDOC, tok)
    two = torch.cat([ids, ids])
    with torch.no_grad(), hnkit.attach(model, [(hn, [0.7, 0.0]), (other, [0.0, 1.0])], blend="sum"):
        rows = model(two).logits
    torch.testing.assert_close(rows[:1], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1:], logits(model, ids, other), rtol=1e-5, atol=1e-5)


def test_a_generator_for_another_model_is_refused_naming_both(tiny, tmp_path):
    from transformers import GPT2Config

    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=320))
    other.save_pretrained(tmp_path / "other")
    gen = StyleGenerator.load(tiny["generator"])
    with pytest.raises(HnkitError) as err:
        gen.make_style(AutoModelForCausalLM.from_pretrained(tmp_path / "other"), NOIR,
                       AutoTokenizer.from_pretrained(tiny["model"]))
    msg = str(err.value)
    assert "made for model " in msg and str(tmp_path / "other") in msg and "\n" not in msg


@pytest.mark.parametrize("text, says", [
    ("", "too short"), ("word " * 10, f"at least {MIN_EXAMPLE_CHARS}"), ("a\x00b" * 200, "binary"),
    ("x" * 20_000, "too long"), (b"bytes" * 100, "must be text"),
])
def test_bad_examples_are_one_line(text, says):
    with pytest.raises(HnkitError) as err:
        check_example(text)
    assert says in str(err.value) and "\n" not in str(err.value)


def damaged_generators(good, folder):
    """(name, file, words) for hostile or broken generator files made from a good one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(good, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(meta["hnkit_generator"])

    def write(name, tensors=tensors, m=m, key="hnkit_generator"):
        path = folder / name
        save_file(tensors, path, metadata={key: json.dumps(m) if not isinstance(m, str) else m})
        return path

    raw = good.read_bytes()
    (folder / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    nan = dict(tensors, q=torch.full_like(tensors["q"], float("nan")))
    shape = dict(tensors, w1=tensors["w1"][:, :1].contiguous())
    huge = dict(m, sites=[[f"s{i}", 65536] for i in range(1000)])
    return [
        ("truncated", folder / "cut.safetensors", "corrupt or truncated"),
        ("not a generator", write("style.safetensors", key="hnkit"), "not a style generator"),
        ("nan", write("nan.safetensors", tensors=nan), "not finite floating point"),
        ("shape", write("shape.safetensors", tensors=shape), "tensor w1"),
        ("huge", write("huge.safetensors", m=huge), "tensor mu has shape"),  # declared on meta: nothing allocated
        ("bad json", write("json.safetensors", m="{not json"), "bad hnkit metadata"),
        ("bad sites", write("sites.safetensors", m=dict(m, sites="all")), "sites"),
    ]


def test_damaged_or_hostile_generator_files_are_refused_in_one_line(tiny, tmp_path):
    for _, path, words in damaged_generators(tiny["generator"], tmp_path):
        with pytest.raises(HnkitError) as err:
            StyleGenerator.load(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and words in msg and "\n" not in msg, msg


# -- hnkit make-style ------------------------------------------------------------------------------
def test_make_style_writes_an_ordinary_style_file(tiny, tmp_path, capsys):
    example = tmp_path / "noir.txt"
    example.write_text(NOIR, encoding="utf-8")
    out = tmp_path / "noir.safetensors"
    argv = ["make-style", "--model", str(tiny["model"]), "--example", str(example), "--output", str(out),
            "--generator", str(tiny["generator"])]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    hn = hnkit.load(out)
    model, tok = load(tiny)
    want = StyleGenerator.load(tiny["generator"]).make_style(model, NOIR, tok)
    assert all(torch.equal(a, b) for a, b in zip(hn.state_dict().values(), want.state_dict().values()))
    assert hn.name == "noir" and hn.extra["generated"]["example_sha256"] == want.extra["generated"]["example_sha256"]
    capsys.readouterr()
    refused_in_one_line(argv, tmp_path, capsys, "already exists")
    assert main(argv + ["--force", "--name", "n2"]) == 0 and hnkit.load(out).name == "n2"


def test_make_style_reads_standard_input(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(NOIR.encode())))
    out = tmp_path / "s.safetensors"
    assert main(["make-style", "--model", str(tiny["model"]), "--example", "-", "-o", str(out),
                 "--generator", str(tiny["generator"])]) == 0
    assert "generated" in hnkit.load(out).extra


def test_make_style_refuses_bad_input_in_one_line_and_writes_nothing(tiny, tmp_path, capsys):
    files = {"empty.txt": b"", "short.txt": b"too short", "latin1.txt": NOIR.encode() + b"\xe9\xff",
             "binary.bin": struct.pack("<400I", *range(400))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    base = ["make-style", "--model", str(tiny["model"]), "--generator", str(tiny["generator"]),
            "-o", str(tmp_path / "out.safetensors")]
    refused_in_one_line(base + ["--example", str(tmp_path / "empty.txt")], tmp_path, capsys, "too short")
    refused_in_one_line(base + ["--example", str(tmp_path / "short.txt")], tmp_path, capsys,
                        f"at least {MIN_EXAMPLE_CHARS}")
    refused_in_one_line(base + ["--example", str(tmp_path / "latin1.txt")], tmp_path, capsys, "not UTF-8")
    refused_in_one_line(base + ["--example", str(tmp_path / "binary.bin")], tmp_path, capsys, "binary")
    refused_in_one_line(base + ["--example", str(tmp_path / "missing.txt")], tmp_path, capsys, "no such example")
    (tmp_path / "ok.txt").write_text(NOIR)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for _, path, words in damaged_generators(tiny["generator"], damaged):
        argv = ["make-style", "--model", str(tiny["model"]), "--generator", str(path), "--example",
                str(tmp_path / "ok.txt"), "-o", str(tmp_path / "out.safetensors")]
        refused_in_one_line(argv, tmp_path, capsys, words)


def test_the_shipped_generator_loads_without_training_anything():
    """A fresh clone makes styles: the generator for SmolLM2-135M-Instruct is in the package, within
    the issue's bounds (at most 10 M parameters, 20 MB), with the command that made it."""
    from hnkit.generator import SHIPPED

    gen = StyleGenerator.load()
    assert gen.family == "llama" and len(gen.sites) == 30 and gen.width == 576
    assert "SmolLM2-135M-Instruct" in gen.base_model
    assert sum(p.numel() for p in gen.parameters()) <= 10_000_000 and SHIPPED.stat().st_size <= 20_000_000
    assert gen.info["command"].startswith("python scripts/train_generator.py") and gen.info["steps"] > 0
    assert any(p.abs().sum() > 0 for p in (gen.c, gen.c0, gen.p, gen.a, gen.b0))  # trained: not the identity
