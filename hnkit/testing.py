"""Tiny models built from configs, for tests, demos and stress runs on a machine without a hub.

``build_tiny_lm(folder)`` writes a 2-layer GPT-2 with a small byte-level BPE tokenizer trained on
Python's reference manual (``pydoc_data``), and that text as a corpus. ``build_tiny_llama(folder,
tokenizer_folder)`` writes a 2-layer Llama with another model's tokenizer (the benchmarks' smoke runs).

Tiny Stable Diffusion pipelines:

``build_tiny_sd(folder, kind)`` writes a complete diffusers pipeline folder (UNet, VAE, text
encoder(s), tokenizer(s), scheduler, ``model_index.json``) with random weights drawn from a fixed
seed, so the real loading path (``from_pretrained(folder)``) is what tests exercise.

The widths are chosen so that every kind of attention input differs: the self-attention (attn1)
inputs are the UNet block widths (32 and 64) and the cross-attention (attn2) input is the text
context, whose width is different again (48, 56 or 80). A hypernetwork file keyed by width then
touches exactly the layers the test means it to.

| kind | like | prediction | text encoders | attn1 widths | attn2 (context) width |
| ---- | ---- | ---------- | ------------- | ------------ | --------------------- |
| sd1  | SD 1.x | epsilon | CLIPTextModel (48) | 32, 64 | 48 |
| sd2v | SD 2.x 768-v | v_prediction | CLIPTextModel (56), linear projections | 32, 64 | 56 |
| sdxl | SDXL base | epsilon | CLIPTextModel (32) + CLIPTextModelWithProjection (48) | 32, 64 | 80 |

The latents are 16x16 and the VAE halves once, so images are 32x32 pixels by default.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

def build_tiny_lm(folder: str | Path, n_topics: int = 40) -> dict:
    """A tiny GPT-2 (random weights, seed 0) and its tokenizer in ``folder/model``, and an offline
    English corpus in ``folder/corpus.txt`` (the first ``n_topics`` topics of the Python reference
    manual). Returns ``{"model": folder, "corpus": file}``."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:n_topics]), encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus.read_text()], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=320, n_positions=128, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=0.2))  # random weights large enough that K/V changes reach the logits
    model.save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(root / "model")
    return {"model": root / "model", "corpus": corpus}


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def build_tiny_llama(folder: str | Path, tokenizer_folder: str | Path) -> Path:
    """A 2-layer Llama with random weights (seed 0) and the tokenizer of ``tokenizer_folder``, saved
    to ``folder`` unless already there. Returns ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    folder = Path(folder)
    if not (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def build_tiny_styles(folder: str | Path, names=("noir", "whimsy", "gothic")) -> dict:
    """``build_tiny_lm`` with a chat template, and a folder ``styles`` of random (non-zero) [1, 2, 1]
    ReLU hypernetworks for it, one per name (seeds 0, 1, ...), with a perplexity-front PNG beside the
    first. Returns ``{"model": folder, "styles": folder}``."""
    import hnkit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .plot import line_plot

    lm = build_tiny_lm(folder)
    tokenizer = AutoTokenizer.from_pretrained(lm["model"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(lm["model"])
    styles = Path(folder) / "styles"
    styles.mkdir(exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(lm["model"])
    config = hnkit.HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")
    for i, name in enumerate(names):
        torch.manual_seed(i)
        hnkit.save(hnkit.Hypernetwork.for_model(model, config, name=name), styles / f"{name}.safetensors")
    line_plot({names[0]: [(0, 0), (1, 20), (3, 35)]}, styles / f"{names[0]}.png", title="front", size=(320, 200))
    return {"model": lm["model"], "styles": styles}


def build_tiny_generator(model_folder: str | Path, path: str | Path, seed: int = 0) -> Path:
    """A style generator for the model in ``model_folder`` with its zero-started weights drawn at
    random (seed ``seed``), so that different examples give different, non-identity styles; saved to
    ``path`` in float32. Returns ``path``."""
    from transformers import AutoModelForCausalLM

    from .generator import StyleGenerator

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    torch.manual_seed(seed)
    gen = StyleGenerator.for_model(model, name=Path(path).stem)
    with torch.no_grad():
        for p in (gen.c, gen.c0, gen.p, gen.a, gen.b0):
            p.normal_(0.0, 0.5)
        gen.q.mul_(4.0)  # examples then differ enough in e to give clearly different gates
    gen.save(path, dtype=torch.float32)
    return Path(path)


class ServerThread:
    """``hnkit serve`` as the command builds it, with its connection limits, run by uvicorn in a
    thread on a free port of 127.0.0.1: ``url``, ``port``, ``engine``, ``lines`` (the request log,
    and the styles left out), ``close()``. The engine runs in a thread of its own, unless
    ``engine_thread=False``: then the caller runs ``engine.serve_forever()`` (as ``hnkit serve``
    does, in the thread that loaded the model). ``engine`` serves that engine instead of loading
    ``model`` and ``styles``. ``log`` replaces the request log's target; ``generator`` and
    ``max_generated`` are ``--generator`` and ``--max-generated``; ``app_options`` go to
    :func:`hnkit.server.create_app` (``max_body_bytes``, ``allowed_hosts``, ...)."""

    def __init__(self, model, styles, api_key=None, max_batch=8, name="tiny", device="cpu", engine_thread=True,
                 header_timeout=None, max_connections=None, log=None, engine=None, max_styles=None,
                 poll_interval=None, generator=None, max_generated=None, **app_options):
        import argparse
        import threading
        import time

        from . import connections
        from .commands import serve
        from .server import create_app

        sock = serve.listen_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        args = argparse.Namespace(model=str(model), styles=str(styles), host="127.0.0.1", port=self.port,
                                  api_key=api_key, name=name, max_batch=max_batch, device=device,
                                  max_styles=max_styles or serve.MAX_STYLES,
                                  poll_interval=serve.POLL_INTERVAL if poll_interval is None else poll_interval,
                                  generator=None if generator is None else str(generator),
                                  max_generated=serve.MAX_GENERATED if max_generated is None else max_generated)
        self.lines: list[str] = []
        try:
            if engine is None:
                self.engine, self.base, fronts = serve.build(args, thread=engine_thread, say=self.lines.append)
            else:
                self.engine, self.base, fronts = engine, name, {}
        except BaseException:
            sock.close()
            raise
        header_timeout = header_timeout or connections.HEADER_TIMEOUT
        options = {"allowed_hosts": serve.allowed_hosts("127.0.0.1"), "body_timeout": header_timeout, **app_options}
        app = create_app(self.engine, self.base, api_key=api_key, fronts=fronts,
                         log=serve.request_log(log or self.lines.append), **options)
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = connections.uvicorn_server(app, sock, header_timeout=header_timeout,
                                                 max_connections=max_connections or connections.MAX_CONNECTIONS,
                                                 log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and self.thread.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.close()
            raise RuntimeError("the test server did not start (see the log above)")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


KINDS = ("sd1", "sd2v", "sdxl")
MAX_TOKENS = 77  # as real CLIP text encoders: prompts are padded to 77 tokens
LATENT_SIZE = 16

# Context width (attn2 K/V input) per kind; the attn1 widths are the UNet blocks, 32 and 64.
CONTEXT_WIDTH = {"sd1": 48, "sd2v": 56, "sdxl": 80}
SELF_WIDTHS = (32, 64)

# Words whose letters get merged into whole tokens, so prompts tokenize to a few ids each.
_WORDS = ("a", "the", "cat", "dog", "on", "mat", "painting", "of", "photo", "style", "in", "red", "blue")


def _clip_tokenizer(pad_token: str | None = None):
    """A small CLIP BPE tokenizer: every byte as a symbol (with and without the end-of-word mark)
    plus merges that spell out a few common words. Written to a temporary folder and loaded back with
    ``from_pretrained``, the only way transformers 5 reads the vocab and merges files."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab[symbol] = len(vocab)
    merges = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (Path(tmp) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        kwargs = {"model_max_length": MAX_TOKENS}
        if pad_token is not None:
            kwargs["pad_token"] = pad_token
        tok = CLIPTokenizer.from_pretrained(tmp, **kwargs)
    ids = tok("a cat on the mat").input_ids
    # <bos> a cat on the mat <eos>: the merges took effect, the specials are where CLIP has them.
    if len(ids) != 7 or ids[0] != tok.bos_token_id or ids[-1] != tok.eos_token_id:
        raise RuntimeError(f"tiny CLIP tokenizer does not tokenize as expected: {ids}")
    return tok


def _text_config(tok, hidden: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=projection_dim or hidden,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_act="quick_gelu",
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        sample_size=2 * LATENT_SIZE, scaling_factor=scaling_factor,
    )


def _unet(kind: str):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
                  norm_num_groups=8, cross_attention_dim=CONTEXT_WIDTH[kind])
    if kind == "sdxl":
        # SDXL's shape: a first block without attention, text_time added embeddings (pooled text
        # embeds + 6 size/crop ids), linear projections, two transformer layers in the last block.
        time_dim, pooled_dim = 8, 32
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64), transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled_dim, **common,
        )
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=SELF_WIDTHS, attention_head_dim=(2, 4) if kind == "sd2v" else 4,
        use_linear_projection=kind == "sd2v", **common,
    )


def build_tiny_sd(folder: str | Path, kind: str = "sd1") -> Path:
    """Write a tiny pipeline of ``kind`` ("sd1", "sd2v" or "sdxl") to ``folder`` and return it.

    Deterministic: the same kind gives the same weights every time (seed 0). The folder loads back
    with ``StableDiffusionPipeline.from_pretrained`` (sd1, sd2v) or
    ``StableDiffusionXLPipeline.from_pretrained`` (sdxl), and with ``DiffusionPipeline``."""
    from diffusers import (
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"unknown tiny SD kind {kind!r}; known: {', '.join(KINDS)}")
    folder = Path(folder)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        unet = _unet(kind)
        if kind == "sdxl":
            tok, tok2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")
            text_encoder = CLIPTextModel(_text_config(tok, 32))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(tok2, 48, projection_dim=32))
            pipe = StableDiffusionXLPipeline(
                vae=_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tok, tokenizer_2=tok2, unet=unet,
                scheduler=EulerDiscreteScheduler(**schedule, timestep_spacing="leading", steps_offset=1),
            )
        else:
            tok = _clip_tokenizer()
            text_encoder = CLIPTextModel(_text_config(tok, CONTEXT_WIDTH[kind]))
            if kind == "sd2v":
                scheduler = EulerDiscreteScheduler(**schedule, prediction_type="v_prediction",
                                                   timestep_spacing="leading", steps_offset=1)
            else:
                scheduler = DDPMScheduler(**schedule, prediction_type="epsilon", clip_sample=False, steps_offset=1)
            pipe = StableDiffusionPipeline(
                vae=_vae(0.18215), text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
    finally:
        torch.random.set_rng_state(rng_state)  # building a model does not disturb the caller's RNG
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
