"""``hnkit generate-text``: continue a prompt with a causal LM steered by one or more styles.

    hnkit generate-text --model runs/base --hypernetwork noir.safetensors:0.8 --prompt "The rain" --stream
    hnkit generate-text --model runs/base --hypernetwork noir.pt --prompt "The rain" --strengths 0,0.5,1

With ``--strengths`` every listed factor multiplies the styles' own strengths and the continuations
are printed side by side in one table; each is sampled from the same seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import HnkitError
from .common import check_styles_fit, load_styles, parse_factors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    parser.add_argument("--hypernetwork", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="a style file and its strength (default 1; may be negative); repeat for several")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: off)")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token (no sampling)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    parser.add_argument("--blend", choices=["chain", "sum"], default="chain",
                        help="several styles: chain (one after the other, the web UI's way) or sum (of residuals)")
    parser.add_argument("--fade-in", type=int, default=0, metavar="N",
                        help="raise the strength from 0 to full over the first N generated tokens")
    parser.add_argument("--fuse", action="store_true",
                        help="fold linear styles into the weights: no extra cost per token")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--strengths", metavar="F1,F2,...",
                        help="compare factors on the strengths side by side, e.g. 0,0.5,1 (0 = the bare model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def _check_options(args) -> None:
    if args.max_new_tokens <= 0:
        raise HnkitError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not args.greedy and args.temperature <= 0:
        raise HnkitError(f"--temperature must be positive, got {args.temperature} (use --greedy for none)")
    if not 0 < args.top_p <= 1:
        raise HnkitError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise HnkitError(f"--top-k must be 0 or more, got {args.top_k}")
    if args.fade_in < 0:
        raise HnkitError(f"--fade-in must be 0 or more, got {args.fade_in}")
    if args.fuse and args.fade_in:
        raise HnkitError("--fuse and --fade-in exclude each other: a fused style has one fixed strength")
    if args.stream and args.strengths:
        raise HnkitError("--stream and --strengths exclude each other: the table is printed when all are done")


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise HnkitError(f"{path}: no such prompt file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HnkitError(f"{path}: not UTF-8 text") from None


class SeededSampler:
    """A logits processor that samples the next token as ``generate(do_sample=True)`` does (temperature,
    then top-k, then top-p, with transformers' own warpers), but from ``generator``, and leaves only
    that token possible, so that greedy decoding takes it. The global torch RNG is neither reseeded nor
    drawn from; a generator seeded with s gives the tokens ``torch.manual_seed(s)`` gave before."""

    def __init__(self, generator, temperature: float, top_p: float, top_k: int):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generator = generator
        self.warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        self.warpers += [TopKLogitsWarper(top_k)] if top_k else []  # 0: off
        self.warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []

    def __call__(self, input_ids, scores):
        import torch

        for warp in self.warpers:
            scores = warp(input_ids, scores)
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens, 0.0)


class Generator:
    """A model, its tokenizer and its styles; ``continuation(factor)`` steers at factor x strengths."""

    def __init__(self, model, tokenizer, styles, *, blend="chain", fade_in=0, fuse=False, seed=0,
                 greedy=False, temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=100):
        self.model, self.tokenizer, self.styles = model, tokenizer, styles
        self.blend, self.fade_in, self.fuse, self.seed = blend, fade_in, fuse, seed
        self.sampling = None if greedy else dict(temperature=temperature, top_p=top_p, top_k=top_k)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # greedy decoding of what SeededSampler leaves possible: generate() never draws from the global RNG
        self.options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)

    def _steered(self, factor: float):
        import contextlib

        import hnkit

        entries = [(hn, s * factor) for hn, s in self.styles]
        if not entries or all(s == 0 for _, s in entries):
            return contextlib.nullcontext()
        if self.fuse:
            return hnkit.fuse(self.model, entries, blend=self.blend)
        schedule = hnkit.fade_in(self.fade_in) if self.fade_in else None
        return hnkit.attach(self.model, entries, blend=self.blend, schedule=schedule)

    def continuation(self, prompt: str, factor: float = 1.0, streamer=None) -> str:
        import torch

        device = next(self.model.parameters()).device
        ids = self.tokenizer(prompt, return_tensors="pt").to(device)
        if ids.input_ids.shape[1] == 0:
            raise HnkitError("the prompt is empty")
        processors = []
        if self.sampling is not None:  # a generator of its own per continuation: each starts from the seed
            generator = torch.Generator(device).manual_seed(self.seed)
            processors = [SeededSampler(generator, **self.sampling)]
        with self._steered(factor), torch.no_grad():
            out = self.model.generate(**ids, streamer=streamer, logits_processor=processors, **self.options)
        return self.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def run(args: argparse.Namespace) -> list[str]:
    import warnings

    from rich.console import Console
    from rich.table import Table

    from ..text import load_causal_lm
    from ..util import choose_device

    _check_options(args)
    factors = parse_factors(args.strengths) if args.strengths else None
    prompt = read_prompt(args)
    styles = load_styles(args.hypernetwork, factors)
    device = choose_device(args.device)  # before the model loads: a wrong device is said at once
    model, tokenizer = load_causal_lm(args.model)
    model.eval()
    model.to(device)
    check_styles_fit(model, styles, args.fuse)
    gen = Generator(model, tokenizer, styles, blend=args.blend, fade_in=args.fade_in, fuse=args.fuse,
                    seed=args.seed, greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, max_new_tokens=args.max_new_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generation-config notices are noise on a command line
        if factors is None:
            if args.stream:
                from transformers import TextStreamer

                text = gen.continuation(prompt, 1.0, TextStreamer(tokenizer, skip_prompt=True,
                                                                  skip_special_tokens=True))
                print(flush=True)
            else:
                text = gen.continuation(prompt)
                print(text)
            return [text]
        texts = [gen.continuation(prompt, f) for f in factors]
    names = ", ".join(f"{hn.name}@{s:g}" for hn, s in styles) or "no style"
    table = Table(title=f"{names}: {len(factors)} factors on the strengths, seed {args.seed}", show_lines=True)
    for f in factors:
        table.add_column(f"x{f:g}", ratio=1, overflow="fold")
    table.add_row(*texts)
    Console().print(table)
    return texts
