"""Tiny models of every supported family, built from configs and loaded back through the real
``from_pretrained`` path from a folder (no hub)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_LIKE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, **_TOKENS)

TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_TOKENS),
    "gpt_neo": lambda: GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=VOCAB,
                                    max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                                    window_size=8, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
                                    **_TOKENS),
    "gptj": lambda: GPTJConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_TOKENS),
    "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                                      hidden_dropout=0.0, attention_dropout=0.0, **_TOKENS),
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: Qwen3Config(head_dim=8, **_LLAMA_LIKE),  # k_norm after k_proj
    "gemma": lambda: GemmaConfig(head_dim=8, **_LLAMA_LIKE),
    "gemma2": lambda: Gemma2Config(head_dim=8, query_pre_attn_scalar=8, sliding_window=8, **_LLAMA_LIKE),
    # Phi-3: a fused qkv_proj, with K and V narrower than Q (grouped-query attention)
    "phi3": lambda: Phi3Config(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **_LLAMA_LIKE),
    "opt": lambda: OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                             vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32,
                             dropout=0.0, attention_dropout=0.0, **_TOKENS),
}
FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """family -> folder holding a saved tiny model (random weights, seed 0)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family, make in TINY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make())
        dirs[family] = root / family
        model.save_pretrained(dirs[family])
    return dirs


@pytest.fixture
def load_tiny(tiny_model_dirs):
    """Load a fresh tiny model of a family, in eval mode, through from_pretrained."""

    def load(family):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
        return model.eval()

    return load


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny GPT-2 with a small byte-level BPE tokenizer saved to a folder, and a text corpus."""
    from hnkit.testing import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tokenized-data caches go to a temporary folder, never the user's."""
    monkeypatch.setenv("HNKIT_CACHE", str(tmp_path_factory.getbasetemp() / "hnkit_cache"))


def load_refused(path, says: str, seconds: float = 5) -> None:
    """``hnkit.load(path)`` refuses the file within ``seconds``: one line that names it and holds ``says``."""
    import time

    import hnkit
    from hnkit import HnkitError

    start = time.perf_counter()
    try:
        hnkit.load(path)
    except HnkitError as err:
        msg = str(err)
    else:
        raise AssertionError(f"{path} was loaded")
    assert time.perf_counter() - start < seconds
    assert msg.startswith(f"{path}: ") and "\n" not in msg and says in msg, msg


def refused_in_one_line(argv: list, folder, capsys, words: str) -> str:
    """``hnkit ARGV`` exits 2 with one stderr line holding ``words``, no traceback, and no file under
    ``folder`` written or changed. Returns what it printed on stdout."""
    from hnkit.commands.cli import main

    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and words in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    return captured.out


def with_option(args: list, flag: str, value) -> list:
    """``args`` with ``flag`` set to ``value``: replaced where present, appended otherwise."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = str(value)
    else:
        args += [flag, str(value)]
    return args


# --- the reference for the fast kernel (hnkit.kernels.Collapsed) -----------------------------------

def plain_run(model, hn, strength, run, monkeypatch):
    """``run()`` with ``hn`` attached (or a list of pairs, strength None) and every site on the plain
    kernels (Chain, Sum): the modules' own forward (``attach(..., fast=False)``). ``monkeypatch`` is
    unused, kept so that callers need not change."""
    import hnkit

    with hnkit.attach(model, hn, **({} if strength is None else {"strength": strength}), fast=False):
        return run()


def with_biases(hn):
    with torch.no_grad():  # biases start at zero: give them values, so that every path must carry them
        for p in hn.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.05)
    return hn


def grads_of(model, hn, ids):
    """Loss, logits, and the gradients of every hypernetwork parameter and of the input embeddings."""
    hn.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    return [out.logits.detach(), embeds.grad] + [p.grad.clone() for p in hn.parameters()]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """``hnkit serve`` on a tiny GPT-2 with three random styles (noir, whimsy, gothic), in a thread."""
    pytest.importorskip("uvicorn", reason="hnkit serve needs fastapi and uvicorn (pip install -e .)")
    from hnkit.testing import ServerThread, build_tiny_styles

    built = build_tiny_styles(tmp_path_factory.mktemp("serve"))
    server = ServerThread(built["model"], built["styles"])
    yield {"server": server, "model": built["model"], "styles": built["styles"], "url": server.url}
    server.close()


def torch_hooks(*owners) -> int:
    """How many hooks torch holds for ``owners`` (modules, each with all its submodules; optimizers),
    or with no owner, its process-wide module and optimizer hooks. torch keeps them in these dicts
    and offers no public way to list them."""
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as torch_optimizer

    if not owners:
        return sum(len(d) for d in (nn_module._global_forward_pre_hooks, nn_module._global_forward_hooks,
                                    nn_module._global_backward_pre_hooks, nn_module._global_backward_hooks,
                                    torch_optimizer._global_optimizer_pre_hooks,
                                    torch_optimizer._global_optimizer_post_hooks))
    dicts = []
    for owner in owners:
        if isinstance(owner, torch.nn.Module):
            dicts += [d for m in owner.modules() for d in (m._forward_pre_hooks, m._forward_hooks,
                                                           m._backward_pre_hooks, m._backward_hooks)]
        else:
            dicts += [owner._optimizer_step_pre_hooks, owner._optimizer_step_post_hooks]
    return sum(len(d) for d in dicts)
