"""scripts/train_generator.py: the example-specific (contrastive) term scores each row's target under
its pair's generated style exactly as attaching that written style does, episodes come in pairs of
similar styles, and a run started from a
trained generator (--init-generator) keeps its neutral statistics, trains only the generator and says
what it started from."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hnkit
from hnkit import StyleGenerator
from hnkit.targets import find_target

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_generated  # noqa: E402
import train_generator  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir, generator, library = bench_generated.tiny_setup(tmp_path_factory.mktemp("train-gen"))
    return {"model": model_dir, "generator": generator, "library": library}


def nll(model, ids, hn=None) -> float:
    """Mean NLL per token of one row, with ``hn`` attached at strength 1 when given."""
    with torch.no_grad():
        if hn is None:
            logits = model(ids).logits
        else:
            with hnkit.attach(model, hn, 1.0):
                logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


def test_the_wrong_style_gain_is_the_pair_rows_written_style_on_each_target(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    gen = StyleGenerator.load(tiny["generator"])
    styles, neutral_docs = train_generator.load_library(tiny["library"], tok)
    names = sorted(styles)  # the tiny library's four training styles
    feats = {n: train_generator.read_all(gen, model, styles[n][:3], tok.eos_token_id) for n in names}
    args = train_generator.parse_args(["--block", "24", "--contrast-weight", "1", "--neutral-rows", "1"])
    rows = [(n, 0, styles[n][1][:24]) for n in names]  # targets of 24 tokens: no padding
    neutral = train_generator.packed_blocks(neutral_docs, 24, tok.eos_token_id, 4)
    teacher = train_generator.Teacher(model, neutral)
    loss, parts = train_generator.step_loss(gen, model, find_target(model), rows, feats, neutral, teacher, args,
                                            tok.eos_token_id, torch.tensor([0]))
    gains = []
    for i, (_, _, target) in enumerate(rows):
        ids = torch.tensor([target])
        other = names[i ^ 1]  # rows 2k and 2k+1 are a pair
        wrong = gen.write(feats[other][0])
        gains.append(nll(model, ids) - nll(model, ids, wrong))
    assert parts["wrong_gain_rows"] == pytest.approx(gains, rel=1e-4, abs=1e-5)
    assert len(set(names)) == 4 and all(g != 0 for g in gains)  # another style each: a real difference
    assert parts["wrong_gain"] == pytest.approx(sum(max(g, 0.0) for g in gains) / len(gains), abs=1e-6)
    assert loss.item() == pytest.approx(parts["nll"] + parts["kl"] + parts["wrong_gain"], rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the base stays frozen
    assert gen.c.grad is not None and gen.c.grad.abs().sum() > 0

    off = train_generator.parse_args(["--block", "24", "--neutral-rows", "1"])  # weight 0: no term, no extra rows
    _, parts0 = train_generator.step_loss(gen, model, find_target(model), rows, feats, neutral, teacher, off,
                                          tok.eos_token_id, torch.tensor([0]))
    assert "wrong_gain" not in parts0 and parts0["nll"] == pytest.approx(parts["nll"], rel=1e-5)


def test_a_run_from_a_trained_generator_keeps_its_statistics_and_records_it(tiny, tmp_path):
    out = tmp_path / "next.safetensors"
    train_generator.main(["--model", str(tiny["model"]), "--library", str(tiny["library"]), "--output", str(out),
                          "--init-generator", str(tiny["generator"]), "--contrast-weight", "1", "--steps", "2",
                          "--block", "24", "--styles-per-step", "4", "--examples-per-style", "3",
                          "--neutral", "library", "--neutral-blocks", "4", "--threads", "1"])
    start, after = StyleGenerator.load(tiny["generator"]), StyleGenerator.load(out)
    assert torch.equal(after.mu, start.mu) and torch.equal(after.sigma, start.sigma)
    assert not torch.equal(after.c, start.c)  # it trained
    assert after.info["steps"] == 2 and after.info["init"]["sha256"] == start.sha256
    assert "--contrast-weight 1" in after.info["command"] and "last_wrong_gain" in after.info


def test_contrastive_episodes_pair_each_style_with_one_of_its_nearest(tiny):
    import random

    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    gen = StyleGenerator.load(tiny["generator"])
    styles, _ = train_generator.load_library(tiny["library"], tok)
    feats = {n: train_generator.read_all(gen, model, styles[n][:3], tok.eos_token_id) for n in sorted(styles)}
    partners = train_generator.nearest_styles(gen, feats, 1)
    assert all(len(v) == 1 and v[0] != n and v[0] in feats for n, v in partners.items())
    rng = random.Random(0)
    for _ in range(20):
        rows = train_generator.episode(rng, styles, sorted(styles), feats, 16, 2, partners)
        (first, _, _), (second, _, _) = rows
        assert second == partners[first][0]
    rows = train_generator.episode(rng, styles, sorted(styles), feats, 16, 4, partners)
    assert len({name for name, _, _ in rows}) == 4  # never the same style twice in a step
    with pytest.raises(SystemExit):
        train_generator.parse_args(["--contrast-weight", "1", "--styles-per-step", "3"])
