"""Prior preservation (hnkit.preserve, train-text --preserve-data): the KL term and its cached teacher."""

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import hnkit
from hnkit import Hypernetwork, HypernetworkConfig
from hnkit.commands.cli import main
from hnkit.preserve import Teacher, coarse_kl
from hnkit.text import TextTask, load_causal_lm, tokenized_blocks

from conftest import with_option


def neutral_corpus(tmp_path):
    from pydoc_data.topics import topics

    path = tmp_path / "neutral.txt"
    path.write_text("\n\n".join(list(topics.values())[:6]), encoding="utf-8")
    return path


def full_kl(teacher_logits, logits):
    p = F.log_softmax(teacher_logits.float(), -1)
    return F.kl_div(F.log_softmax(logits.float(), -1), p, log_target=True, reduction="none").sum(-1).mean()


def _top(teacher, k):
    logp = F.log_softmax(teacher.float(), -1)
    top = logp.topk(k, -1)
    rest = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1)
    return top.values, top.indices, rest


def test_the_coarse_kl_is_the_full_kl_with_the_whole_vocabulary_and_a_lower_bound_below():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 50) * 3, (torch.randn(2, 5, 50) * 3).requires_grad_(True)
    values, index, _ = _top(teacher, 50)
    whole = coarse_kl(values, index, torch.full(values.shape[:-1], -1e30), student)
    torch.testing.assert_close(whole, full_kl(teacher, student))
    whole.backward()
    assert torch.isfinite(student.grad).all()
    top = _top(teacher, 8)
    assert 0 < coarse_kl(*top, student) <= full_kl(teacher, student) + 1e-6
    assert coarse_kl(*top, teacher).abs() < 1e-6  # the same distribution: 0


def test_the_rest_bucket_stays_exact_when_the_student_is_overconfident():
    """A student that puts all but 1e-10 of its mass on the teacher's top-k: the rest bucket is a
    log-sum-exp, not 1 - sum (which is 0 in fp32), so value and gradient match a float64 reference."""
    teacher = torch.zeros(1, 1, 40)
    teacher[..., :4] = 2.0  # the teacher keeps about 0.27 of its mass outside its top 4
    student = torch.full((1, 1, 40), -25.0)
    student[..., :4] = 0.0
    student.requires_grad_(True)
    got = coarse_kl(*_top(teacher, 4), student)
    got.backward()
    ref_student = student.detach().double().requires_grad_(True)
    want = coarse_kl(*[t.double() if t.is_floating_point() else t for t in _top(teacher.double(), 4)], ref_student)
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-4, atol=1e-9)
    assert student.grad[..., 4:].abs().sum() > 0  # the push back towards the rest of the vocabulary


@pytest.fixture
def task(tiny_lm, tmp_path):
    model, tokenizer = load_causal_lm(str(tiny_lm["model"]))
    model.eval()
    neutral = tokenized_blocks(neutral_corpus(tmp_path), tokenizer, 32)
    style = tokenized_blocks(tiny_lm["corpus"], tokenizer, 32)
    hn = Hypernetwork.for_model(model, HypernetworkConfig([1, 2, 1], "relu", weight_init="XavierNormal"))
    return TextTask(model, tokenizer, hn, style, None, preserve=Teacher(model, neutral), preserve_weight=1.0)


def test_the_cached_teacher_equals_a_fresh_bare_forward(task):
    t = task.preserve
    with torch.no_grad():
        fresh = F.log_softmax(task.model(input_ids=t.blocks[:3]).logits.float(), -1)
    torch.testing.assert_close(t.values[:3], fresh.gather(-1, t.indices[:3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.values[:3], fresh.topk(t.values.shape[-1], -1).values, rtol=1e-5, atol=1e-5)


def kl_term(task, strength):
    batch = task.collate([task.train_dataset[i] for i in range(4)])
    with torch.no_grad(), hnkit.attach(task.model, task.hypernetwork, strength=strength):
        logits = task.model(input_ids=batch["preserve_ids"]).logits
    return coarse_kl(batch["teacher_logp"], batch["teacher_index"], batch["teacher_rest"], logits)


def test_the_kl_term_is_zero_at_strength_0_and_for_an_identity_network(task):
    assert kl_term(task, 0.0).abs() < 1e-6
    assert kl_term(task, 1.0) > 1e-3  # the network does change the neutral distributions
    identity = Hypernetwork.for_model(task.model, HypernetworkConfig([1, 2, 1], "relu", zero_init_last=True))
    task.hypernetwork = identity
    assert kl_term(task, 1.0).abs() < 1e-6


def test_the_loss_adds_the_weighted_term_to_the_style_cross_entropy(task):
    batch = task.collate([task.train_dataset[i] for i in range(8)])
    assert len(batch["preserve_ids"]) == 2  # one neutral block per NEUTRAL_SHARE (4) style blocks
    assert len(task.collate([task.train_dataset[i] for i in range(3)])["preserve_ids"]) == 1  # at least one
    with torch.no_grad(), hnkit.attach(task.model, task.hypernetwork):
        style = task.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        kl = coarse_kl(batch["teacher_logp"], batch["teacher_index"], batch["teacher_rest"],
                       task.model(input_ids=batch["preserve_ids"]).logits)
        task.preserve_weight = 0.5
        torch.testing.assert_close(task.loss(batch), style + 0.5 * kl, rtol=1e-5, atol=1e-5)
    plain = task.collate([task.train_dataset.blocks[i] for i in range(4)])  # validation: the style alone
    assert set(plain) == {"input_ids"}


def train_args(tiny_lm, output, neutral, *extra):
    return ["train-text", "--model", str(tiny_lm["model"]), "--data", str(tiny_lm["corpus"]), "--output", str(output),
            "--batch-size", "4", "--block-size", "32", "--lr", "3e-3", "--activation", "relu",
            "--preserve-data", str(neutral), "--preserve-weight", "0.5", *map(str, extra)]


def test_resume_with_preservation_is_exact(tiny_lm, tmp_path):
    neutral = neutral_corpus(tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args(tiny_lm, straight, neutral, "--max-steps", 6, "--save-every", 3, "--keep-last", 5)) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(straight / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    assert main(train_args(tiny_lm, resumed, neutral, "--max-steps", 6, "--resume", resumed)) == 0
    a, b = load_file(straight / "hypernetwork.safetensors"), load_file(resumed / "hypernetwork.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_preserve_data_is_one_line_and_exit_2(tiny_lm, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    neutral = neutral_corpus(tmp_path)
    cases = [
        (["--preserve-data", tmp_path / "missing.txt"], "--preserve-data .*missing.txt: no such file or folder"),
        (["--preserve-data", empty], "--preserve-data .*empty.txt: no text found"),
        (["--preserve-data", short], "--preserve-data .*short.txt: only .* tokens, fewer than one block of 32"),
        (["--preserve-weight", -1], "--preserve-weight must be 0 or more"),
    ]
    import re

    for i, (override, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(with_option(train_args(tiny_lm, out, neutral, "--max-steps", 1), *override)) == 2, message
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
        assert not (out / "hypernetwork.safetensors").exists()
