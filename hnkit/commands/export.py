"""``hnkit export``: a style as a LoRA that other tools load (PEFT, vLLM, LoRAX, TGI; llama.cpp's GGUF).

    hnkit export noir.safetensors --model runs/base --format peft --output noir-lora --data noir/

Affine networks (form "lowrank", or "mlp" with activation "linear" and no layer norm) export
exactly; the others are fitted on ``--data`` (and ``--neutral-data``) at ``--rank`` (see
:mod:`hnkit.export`). With ``--data``, a quarter of its blocks is held out of the fit, and the
perplexity of those blocks through the bare model, through hnkit and through the export (loaded
back with PEFT) is printed: the export's fidelity.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
from pathlib import Path

import torch

from ..errors import HnkitError

BLOCK_SIZE, MAX_BLOCKS = 256, 64  # tokens per block and blocks read per corpus: a fit of ~16k tokens
HELD_OUT = 0.25  # share of the blocks kept out of the fit, to measure the export on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("style", help="the hypernetwork file (.safetensors or the web UI's .pt)")
    parser.add_argument("--model", default=None,
                        help="hub id or local folder of the causal LM (default: the style's base model)")
    parser.add_argument("--format", required=True, choices=["peft", "gguf"],
                        help="peft: an adapter folder (PEFT, vLLM, LoRAX, TGI); gguf: a llama.cpp LoRA file")
    parser.add_argument("--output", required=True, help="the adapter folder (peft) or .gguf file (gguf)")
    parser.add_argument("--strength", default="1", help="the strength baked into the export (default: 1)")
    parser.add_argument("--rank", type=int, default=None,
                        help="LoRA rank (default: exact networks their own rank; fitted ones 16, vLLM's default "
                             "--max-lora-rank); below an exact network's rank the export is cut and no longer exact")
    parser.add_argument("--data", default=None,
                        help="style text (as for train-text --data): fits a non-linear network, and measures the "
                             "export's fidelity; needed for non-linear networks")
    parser.add_argument("--neutral-data", default=None, help="neutral text, fitted and measured as well (optional)")
    parser.add_argument("--no-bias", action="store_true",
                        help="leave out the constant term (the network's biases): loads where a LoRA bias does not "
                             "(vLLM), but an exact network is then exact only up to that term")
    parser.add_argument("--base-gguf", default=None,
                        help="gguf only: the base model's GGUF, to check the adapter against (architecture, shapes)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def check_arguments(args) -> float:
    """Everything checked before a file is read; returns the strength."""
    from ..export_peft import check_output_folder
    from ..util import parse_strength

    strength = parse_strength(args.strength, "--strength")
    if args.rank is not None and args.rank < 1:
        raise HnkitError(f"--rank must be a positive integer, got {args.rank}")
    for data in (args.data, args.neutral_data):
        if data is not None and not Path(data).exists():
            raise HnkitError(f"{data}: no such file or folder")
    if args.neutral_data and not args.data:
        raise HnkitError("--neutral-data needs --data (the style's text)")
    if not Path(args.style).is_file():
        raise HnkitError(f"{args.style}: no such file")
    if args.base_gguf is not None and (args.format != "gguf" or not Path(args.base_gguf).is_file()):
        raise HnkitError(f"--base-gguf {args.base_gguf}: " + ("no such file" if args.format == "gguf" else
                                                             "is an option of --format gguf only"))
    if args.format == "peft":
        if importlib.util.find_spec("peft") is None:
            raise HnkitError("--format peft needs the peft package: pip install 'hnkit[export]' (or pip install peft)")
        check_output_folder(args.output, args.force)
    elif Path(args.output).is_dir():
        raise HnkitError(f"{args.output}: is a folder; a gguf export is a file, name one")
    elif Path(args.output).exists() and not args.force:
        raise HnkitError(f"{args.output}: already exists; choose another name or add --force to replace it")
    return strength


def load_style(args):
    """The style, refused at once where it cannot be exported or needs text it was not given."""
    from ..checkpoint import load
    from ..targets import unet

    hn = load(args.style)
    if hn.family == unet.FAMILY:
        raise HnkitError(f"{args.style}: an SD UNet style cannot be exported: --format peft and gguf are for "
                         "causal LMs' K/V projections")
    if not hn.config.is_linear and args.data is None:
        raise HnkitError(f"{args.style}: a non-linear network (activation {hn.config.activation!r}) is fitted on "
                         "text: give --data (the style's text)")
    if args.model is None and not hn.base_model:
        raise HnkitError(f"{args.style}: names no base model; give --model")
    return hn


def split_corpus(data, tokenizer, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit blocks, held-out blocks)`` of a corpus (held out: a seeded quarter, none from one block)."""
    from ..text import split_blocks, tokenized_blocks

    blocks = tokenized_blocks(data, tokenizer, block_size)
    if len(blocks) == 0:
        raise HnkitError(f"{data}: too little text for one block of {block_size} tokens")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    return split_blocks(blocks[order[:MAX_BLOCKS]], HELD_OUT, 0)


def run(args) -> None:
    from ..export import lora_factors
    from ..text import context_length, load_causal_lm
    from ..util import choose_device
    from .cli import quiet_libraries

    quiet_libraries()  # main() quiets them for the commands it names; export is not among them
    strength = check_arguments(args)
    hn = load_style(args)
    device = choose_device(args.device)
    model_name = args.model or hn.base_model
    model, tokenizer = load_causal_lm(model_name)
    model.to(device).eval()
    block_size = min(BLOCK_SIZE, context_length(model) or BLOCK_SIZE)
    corpora = {name: split_corpus(data, tokenizer, block_size)
               for name, data in (("style", args.data), ("neutral", args.neutral_data)) if data}
    fit = torch.cat([f for f, _ in corpora.values()]) if corpora else None
    factors = lora_factors(hn, model, strength, rank=args.rank, texts=fit, bias=not args.no_bias)
    describe(factors, hn, strength, args)
    if args.format == "peft":
        from ..export_peft import write_peft

        out = write_peft(factors, args.output, base_model=model_name, bias=not args.no_bias, force=args.force)
        print(f"wrote {out}/ (adapter_config.json, adapter_model.safetensors)")
    else:
        write_gguf(factors, args, hn.name, model.config)
    if corpora:
        fidelity(model, hn, strength, factors, {name: held for name, (_, held) in corpora.items()}, args)


def write_gguf(factors, args, name: str, config) -> Path:
    """The llama.cpp adapter (:mod:`hnkit.export_gguf`); it holds no constant term: ``--no-bias`` drops it."""
    from ..export_gguf import write_gguf as write

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out = write(factors, Path(args.output), base_gguf=args.base_gguf, name=name,
                bias="drop" if args.no_bias else "error", head_dim=head_dim)
    print(f"wrote {out}")
    return out


def describe(factors, hn, strength: float, args) -> None:
    """What the export is: exact, fitted (with the fit's relative errors) or cut, its rank, the constant term."""
    from ..export_peft import has_bias, peft_modules

    if factors.exact:
        how = "exact"
    elif factors.fit_errors:
        how = "fitted"
    else:
        why = [f"cut to rank {args.rank}"] if args.rank is not None else []
        how = f"approximate ({' and '.join(why + ['constant term left out'] if args.no_bias else why)})"
    print(f"{hn.name}: {how} LoRA of rank {factors.rank} on the K/V projections of {len(factors.layers)} layers "
          f"(strength {strength:g})")
    for w in ("k", "v"):
        errors = [e[w] for e in factors.fit_errors.values()]
        if errors:
            print(f"  fit of {w.upper()}'s change, relative error over layers: min {min(errors):.3f}, "
                  f"median {statistics.median(errors):.3f}, max {max(errors):.3f}")
    if args.no_bias:
        print("  no constant term (--no-bias): the networks' biases are left out" +
              (", a fit goes through the origin" if factors.fit_errors else ""))
    elif args.format == "peft" and has_bias(peft_modules(factors)):
        print("  constant term kept as lora_B.bias (PEFT lora_bias=True): PEFT loads it; vLLM no longer "
              "loads a LoRA bias (removed in 2025), LoRAX and TGI may not either: use --no-bias for those")
    if factors.rank > 16 and args.format == "peft":
        fits = next((r for r in (32, 64, 128, 256, 320, 512) if r >= factors.rank), factors.rank)
        print(f"  rank {factors.rank}: vLLM needs --max-lora-rank {fits} (its default is 16)")


def fidelity(model, hn, strength: float, factors, held: dict, args) -> None:
    """Perplexity of the held-out blocks through the bare model, hnkit and the export (loaded with PEFT)."""
    import hnkit
    import warnings

    from peft import PeftModel

    from ..export_peft import write_peft
    from ..text import perplexity

    held = {name: blocks for name, blocks in held.items() if len(blocks)}
    if not held:
        print("fidelity: not measured (the text gives no held-out block; give more --data)")
        return
    bare = {name: perplexity(model, blocks) for name, blocks in held.items()}
    with hnkit.attach(model, hn, strength):
        attached = {name: perplexity(model, blocks) for name, blocks in held.items()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.output if args.format == "peft" else write_peft(factors, Path(tmp) / "peft")
        with warnings.catch_warnings():  # PEFT: a LoRA bias on a projection without one cannot be merged
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(folder))
        exported = {name: perplexity(peft_model, blocks) for name, blocks in held.items()}
        peft_model.unload()
    through = "" if args.format == "peft" else ", the export's factors loaded through PEFT"
    print(f"fidelity (perplexity of held-out text{through}):")
    for name in held:
        print(f"  {name:8s} bare {bare[name]:.3f}   hnkit {attached[name]:.3f}   export {exported[name]:.3f}   "
              f"(export vs hnkit {100 * (exported[name] / attached[name] - 1):+.2f} %)")
