"""``hnkit generate-text`` and ``hnkit eval-text`` on a tiny GPT-2 with a real tokenizer."""

import json
import re

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

import hnkit
from hnkit import Hypernetwork, HypernetworkConfig
from hnkit.commands.cli import build_parser, main
from hnkit.text import perplexity, split_blocks, tokenized_blocks

PROMPT = "The with statement is used to"


@pytest.fixture
def lm(tiny_lm, tmp_path):
    """The tiny model and tokenizer, and a style file for them (width 32)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm["model"])
    torch.manual_seed(0)
    hn = Hypernetwork.for_model(model, HypernetworkConfig([1, 2, 1], "relu", weight_init="XavierNormal"), name="ink")
    hnkit.save(hn, tmp_path / "ink.safetensors")
    return dict(model=model, tokenizer=tokenizer, hn=hn, dir=str(tiny_lm["model"]), file=tmp_path / "ink.safetensors",
                corpus=tiny_lm["corpus"])


def continuation(lm, strength, seed=None, **options):
    ids = lm["tokenizer"](PROMPT, return_tensors="pt")
    with hnkit.steer(lm["model"], lm["hn"], strength), torch.no_grad():  # strength 0: the bare model
        if seed is not None:
            torch.manual_seed(seed)
        out = lm["model"].generate(**ids, max_new_tokens=12, pad_token_id=0, **options)
    return lm["tokenizer"].decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def generate_text(*argv):
    from hnkit.commands.generate_text import run

    return run(build_parser().parse_args(["generate-text", *map(str, argv)]))


def test_prints_the_steered_continuation(lm, capsys, tmp_path):
    args = ["generate-text", "--model", lm["dir"], "--hypernetwork", f"{lm['file']}:1.5", "--prompt", PROMPT,
            "--max-new-tokens", "12", "--greedy"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    expected = continuation(lm, 1.5, do_sample=False)
    assert printed == expected + "\n"
    assert expected != continuation(lm, 0.0, do_sample=False)  # the style changes the text
    assert main(args + ["--stream"]) == 0  # streamed token by token: the same text
    assert capsys.readouterr().out.strip() == expected.strip()
    (tmp_path / "prompt.txt").write_text(PROMPT, encoding="utf-8")
    from_file = [a if a != PROMPT else str(tmp_path / "prompt.txt") for a in args]
    assert main([a if a != "--prompt" else "--prompt-file" for a in from_file]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_strength_table_side_by_side(lm, capsys):
    texts = generate_text("--model", lm["dir"], "--hypernetwork", lm["file"], "--prompt", PROMPT,
                          "--max-new-tokens", 12, "--strengths", "0,-1,2", "--seed", 3)
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0)
    assert texts == [continuation(lm, s, seed=3, **sampling) for s in (0.0, -1.0, 2.0)]
    assert len(set(texts)) == 3
    out = capsys.readouterr().out
    assert "x0" in out and "x-1" in out and "x2" in out and "ink@1" in out


def test_bad_input_is_one_line_and_exit_2(lm, tmp_path, capsys):
    wide = tmp_path / "wide.safetensors"
    hnkit.save(Hypernetwork(keys=[48], name="wide"), wide)
    cases = [
        (["--model", tmp_path / "nomodel", "--hypernetwork", lm["file"]], "no such model folder"),
        (["--model", lm["dir"], "--hypernetwork", tmp_path / "missing.pt"], "missing.pt: no such file"),
        (["--model", lm["dir"], "--hypernetwork", f"{lm['file']}:strong"], "bad strength 'strong'"),
        (["--model", lm["dir"], "--hypernetwork", f"{lm['file']}:nan"], "finite"),
        (["--model", lm["dir"], "--hypernetwork", wide], r"widths \[48\], which fit no attention layer"),
        (["--model", lm["dir"], "--hypernetwork", lm["file"], "--fuse"], "cannot be fused"),
        (["--model", lm["dir"], "--hypernetwork", lm["file"], "--strengths", "0,x"], "comma-separated"),
    ]
    for argv, message in cases:
        assert main(["generate-text", *map(str, argv), "--prompt", PROMPT, "--max-new-tokens", "4"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("hnkit: error:"), err
        assert re.search(message, err), err  # main() returned: no exception escaped, no traceback


def test_fuse_option_gives_the_attached_text(lm, capsys):
    torch.manual_seed(1)
    linear = Hypernetwork.for_model(lm["model"], HypernetworkConfig([1, 2, 1], weight_init="XavierNormal"))
    path = lm["file"].with_name("linear.pt")
    hnkit.save(linear, path)
    common = ["--model", lm["dir"], "--hypernetwork", f"{path}:2", "--prompt", PROMPT, "--max-new-tokens", 12,
              "--greedy"]
    assert generate_text(*common, "--fuse") == generate_text(*common)


def test_eval_text_sweeps_strengths_and_plots(lm, tmp_path, capsys):
    neutral = tmp_path / "neutral.txt"
    neutral.write_text(" ".join(f"The {c} cat sat on mat number {i}." for i in range(300) for c in ("red", "blue")))
    png, report = tmp_path / "eval.png", tmp_path / "eval.json"
    argv = ["eval-text", "--model", lm["dir"], "--hypernetwork", lm["file"], "--hypernetwork", f"{lm['file']}:-1",
            "--style-data", lm["corpus"], "--neutral-data", neutral, "--strengths", "0,0.5,1", "--block-size", 32,
            "--max-blocks", 4, "--plot", png, "--json", report]
    assert main(list(map(str, argv))) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "ink (2)" in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 480)
    data = json.loads(report.read_text())
    assert data["factors"] == [0.0, 0.5, 1.0] and data["blocks"] == {"style": 4, "neutral": 4}
    # The numbers are the perplexities of the held-out blocks train-text would have kept aside.
    blocks = tokenized_blocks(lm["corpus"], lm["tokenizer"], 32)
    held_out = split_blocks(blocks, 0.05, 0)[1][:4]
    bare = perplexity(lm["model"], held_out)
    with hnkit.attach(lm["model"], lm["hn"], 0.5):
        half = perplexity(lm["model"], held_out)
    ink, away = data["styles"]["ink"]["perplexity"], data["styles"]["ink (2)"]["perplexity"]
    assert ink["style"][0] == pytest.approx(bare, rel=1e-6) and away["style"][0] == ink["style"][0]
    assert ink["style"][1] == pytest.approx(half, rel=1e-6)
    assert len(set(ink["neutral"])) == 3 and ink["style"] != away["style"]
    # The Pareto front and the recommendation: the largest style gain within the neutral cost limit.
    assert "recommended strength" in out and "Pareto front" in out
    with Image.open(tmp_path / "eval-front.png") as image:
        assert image.format == "PNG"
    rec = data["styles"]["ink"]["recommended"]
    allowed = [(1 - s / ink["style"][0], f) for f, s, n in zip(data["factors"], ink["style"], ink["neutral"])
               if n / ink["neutral"][0] - 1 <= 0.03]
    assert rec["max_neutral_cost"] == 0.03 and rec["neutral_cost"] <= 0.03
    assert rec["style_gain"] == pytest.approx(max(allowed)[0]) and rec["strength"] == rec["factor"] * 1.0
    assert main(["eval-text", "--model", lm["dir"], "--hypernetwork", str(lm["file"]),
                 "--style-data", str(tmp_path / "none")]) == 2
    assert "none: no such file or folder" in capsys.readouterr().err
