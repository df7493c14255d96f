"""Prior preservation by default (hnkit.self_text): without --preserve-data, train-text preserves the
model's distributions on text the bare model writes itself, cached; --no-preserve turns it off."""

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from hnkit.commands.cli import main
from hnkit.preserve import Teacher
from hnkit.self_text import MAX_BLOCKS, count, sample_blocks, self_blocks
from hnkit.text import load_causal_lm
from hnkit.util import cache_root

WROTE, REUSED = "the model wrote", "reusing the"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A cache of this test's own: it starts empty, and what a test does to it stays there."""
    monkeypatch.setenv("HNKIT_CACHE", str(tmp_path / "cache"))


def train(tiny_lm, output, *extra):
    return ["train-text", "--model", str(tiny_lm["model"]), "--data", str(tiny_lm["corpus"]), "--output", str(output),
            "--batch-size", "4", "--block-size", "32", "--lr", "3e-3", "--max-steps", "4", *map(str, extra)]


def recorded(output):
    step = sorted((output / "checkpoints").glob("step-*"))[-1]
    return json.loads((step / "trainer_state.json").read_text())["options"]


def weights(output):
    return load_file(str(output / "hypernetwork.safetensors"))


def test_the_default_preserves_on_the_models_own_text_and_reuses_it(tiny_lm, tmp_path, capsys):
    assert main(train(tiny_lm, tmp_path / "a")) == 0
    out = capsys.readouterr().out
    options = recorded(tmp_path / "a")
    assert options["preserve"] is True and options["preserve_data"] is None
    # the blocks the teacher used are those the model writes: the same function gives the recorded sha256
    model, tokenizer = load_causal_lm(str(tiny_lm["model"]))
    assert WROTE in out and REUSED not in out
    n = int(re.findall(r"(\d+) blocks of 32 tokens", out)[-1])
    assert n == count(n) and 1 <= n <= MAX_BLOCKS
    blocks, digest = self_blocks(model, tokenizer, n, 32)
    assert options["self_text_tokens"] == digest == hashlib.sha256(blocks.int().numpy().tobytes()).hexdigest()
    assert blocks.shape == (n, 32) and (blocks[:, 0] == tokenizer.eos_token_id).all()
    assert "next-token distributions on" in out and f"{n}/{n} neutral blocks" in out  # the teacher's progress
    # a second run writes nothing: it says it reuses the cached blocks, and trains the same weights
    assert main(train(tiny_lm, tmp_path / "b")) == 0
    again = capsys.readouterr().out
    assert REUSED in again and WROTE not in again
    assert recorded(tmp_path / "b")["self_text_tokens"] == digest
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_preserve_and_a_zero_weight_turn_it_off(tiny_lm, tmp_path, capsys):
    assert main(train(tiny_lm, tmp_path / "on")) == 0
    assert main(train(tiny_lm, tmp_path / "off", "--no-preserve")) == 0
    out = capsys.readouterr().out
    assert out.count(WROTE) + out.count(REUSED) >= 1  # the default run
    assert main(train(tiny_lm, tmp_path / "zero", "--preserve-weight", 0)) == 0
    assert WROTE not in capsys.readouterr().out
    off, zero, on = weights(tmp_path / "off"), weights(tmp_path / "zero"), weights(tmp_path / "on")
    assert "self_text_tokens" not in recorded(tmp_path / "off") and recorded(tmp_path / "off")["preserve"] is False
    assert all(torch.equal(off[k], zero[k]) for k in off)  # both plain training
    assert any(not torch.equal(off[k], on[k]) for k in off)  # the KL term changed the default run's steps


def test_a_recipe_turns_it_off_too(tiny_lm, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preserve: false\n")
    assert main(train(tiny_lm, tmp_path / "out", "--config", recipe)) == 0
    assert WROTE not in capsys.readouterr().out and recorded(tmp_path / "out")["preserve"] is False


def test_resume_is_exact_and_a_changed_preservation_is_refused(tiny_lm, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train(tiny_lm, straight, "--max-steps", 6, "--save-every", 3, "--keep-last", 5)) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "step-0000003").symlink_to(straight / "checkpoints" / "step-0000003")
    for change, words in [(["--no-preserve"], "--no-preserve differs from the run's --preserve"),
                          (["--preserve-weight", "0.5"], "--preserve-weight 0.5 differs")]:
        assert main(train(tiny_lm, resumed, "--max-steps", 6, "--resume", resumed, *change)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    # a damaged cache is found (its sha256) and written again: the same blocks, so the resume goes on
    for f in (cache_root() / "self_text").glob("*.int32"):
        f.write_bytes(b"\0" * f.stat().st_size)
    assert main(train(tiny_lm, resumed, "--max-steps", 6, "--resume", resumed)) == 0
    assert WROTE in capsys.readouterr().out
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_neutral_text_on_resume_is_refused_in_one_line(tiny_lm, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train(tiny_lm, out, "--max-steps", 2)) == 0
    state = sorted((out / "checkpoints").glob("step-*"))[-1] / "trainer_state.json"
    record = json.loads(state.read_text())
    record["options"]["self_text_tokens"] = "0" * 64  # the blocks the run had are not those written now
    state.write_text(json.dumps(record))
    assert main(train(tiny_lm, out, "--max-steps", 4, "--resume", out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neutral text the model wrote for prior preservation differs" in err, err


def test_an_older_run_without_preservation_is_not_resumed_with_it(tiny_lm, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train(tiny_lm, out, "--max-steps", 2, "--no-preserve")) == 0
    state = sorted((out / "checkpoints").glob("step-*"))[-1] / "trainer_state.json"
    record = json.loads(state.read_text())
    del record["options"]["preserve"]  # as an hnkit from before preservation was the default recorded it
    state.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(train(tiny_lm, out, "--max-steps", 4, "--resume", out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resume it with --no-preserve" in err, err
    assert main(train(tiny_lm, out, "--max-steps", 4, "--resume", out, "--no-preserve")) == 0


def test_writing_leaves_the_global_rng_alone_and_depends_on_nothing_else(tiny_lm):
    model, tokenizer = load_causal_lm(str(tiny_lm["model"]))
    model.eval()
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    first = sample_blocks(model, tokenizer.eos_token_id, 3, 20)
    assert torch.equal(torch.random.get_rng_state(), before)  # neither reseeded nor drawn from
    torch.manual_seed(2)
    assert torch.equal(sample_blocks(model, tokenizer.eos_token_id, 3, 20), first)
    assert first.shape == (3, 20) and len({tuple(b.tolist()) for b in first}) == 3  # sampled, not greedy


def test_the_teachers_progress_is_a_few_lines(tiny_lm):
    model, _ = load_causal_lm(str(tiny_lm["model"]))
    lines = []
    Teacher(model.eval(), torch.randint(0, 300, (100, 8)), batch_size=4, say=lines.append)
    assert 2 <= len(lines) <= 11 and lines[-1].endswith("100/100 neutral blocks")
