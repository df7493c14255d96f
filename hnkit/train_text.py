"""``hnkit train-text``: options, recipe files, and the run itself."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .errors import HnkitError, first_line

# option name -> (type, default, help). The YAML recipes use the same names with underscores.
OPTIONS = {
    "model": (str, None, "hub id or local folder of a causal LM"),
    "data": (str, None, ".txt file, folder of .txt files, .jsonl with a text field, or a saved datasets folder"),
    "output": (str, "runs/text", "output folder"),
    "name": (str, "hypernetwork", "name of the hypernetwork (and of the final file)"),
    "max_steps": (int, 1000, "optimizer steps"),
    "batch_size": (int, 4, "blocks per step and process"),
    "block_size": (int, 256, "tokens per block"),
    "grad_accum": (int, 1, "micro-batches per optimizer step"),
    "lr": (str, "1e-4", "learning rate, or the web UI's step string '5e-3:100, 1e-3:1000, 1e-5'"),
    "lr_schedule": (str, "constant", "constant | linear | cosine"),
    "warmup_steps": (int, 0, "linear warm-up steps"),
    "weight_decay": (float, 0.0, "AdamW weight decay"),
    "max_grad_norm": (float, 1.0, "clip gradients to this norm (0: off)"),
    "max_grad_value": (float, 0.0, "clip gradients to this value (0: off)"),
    "precision": (str, "fp32", "fp32 | fp16 | bf16"),
    "gradient_checkpointing": (bool, False, "recompute activations in backward to save memory"),
    "seed": (int, 0, "random seed"),
    "save_every": (int, 0, "write a resumable checkpoint every N steps (0: at the end)"),
    "keep_last": (int, 2, "checkpoints to keep"),
    "eval_every": (int, 0, "validation loss every N steps (0: off)"),
    "eval_batches": (int, 16, "validation batches per evaluation"),
    "val_fraction": (float, 0.05, "share of blocks held out for validation"),
    "sample_every": (int, 0, "write sample continuations every N steps (0: off)"),
    "sample_prompts": (list, None, "prompts for samples (default: starts of validation blocks)"),
    "sample_tokens": (int, 48, "tokens per sample"),
    "log_every": (int, 10, "metrics every N steps"),
    "tensorboard": (bool, False, "also log to TensorBoard (needs the tensorboard package)"),
    "text_field": (str, "text", "field holding the text in .jsonl / datasets input"),
    "resume": (str, None, "continue from this output folder or checkpoint folder"),
    # the hypernetwork
    "layer_structure": (list, [1, 2, 1], "module widths as multiples of the input width"),
    "activation": (str, "linear", "linear, relu, leakyrelu, elu, swish, tanh, sigmoid, gelu, ..."),
    "layer_norm": (bool, False, "LayerNorm after each Linear"),
    "dropout_structure": (list, None, "dropout per layer, e.g. 0,0.3,0"),
    "activate_output": (bool, False, "activation after the last Linear too"),
    "weight_init": (str, "Normal", "Normal | XavierUniform | XavierNormal | KaimingUniform | KaimingNormal"),
    "zero_init_last": (bool, False, "start as an exact identity"),
    "per_site": (bool, False, "one module pair per attention layer instead of per width"),
}
MODULE_OPTIONS = ("layer_structure", "activation", "layer_norm", "dropout_structure", "activate_output",
                  "weight_init", "zero_init_last", "per_site")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a recipe YAML; command-line options override it")
    for name, (typ, default, text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typ is list:
            parser.add_argument(flag, default=None, help=f"{text} (comma-separated)")
        else:
            parser.add_argument(flag, type=typ, default=None, help=f"{text} (default: {default})")


def _as_list(value, name: str, where: str):
    if value is None or isinstance(value, list):
        return value
    if name == "sample_prompts":
        return [value]
    try:
        return [float(x) for x in str(value).split(",")]
    except ValueError:
        raise HnkitError(f"{where}: {name} must be comma-separated numbers, got {value!r}") from None


def resolve_options(args: argparse.Namespace) -> dict:
    """defaults <- recipe YAML <- command line."""
    opts = {name: default for name, (_, default, _) in OPTIONS.items()}
    if args.config:
        opts.update(read_recipe(args.config))
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = _as_list(value, name, "command line") if OPTIONS[name][0] is list else value
    for name in ("model", "data"):
        if not opts[name]:
            raise HnkitError(f"--{name} is required (on the command line or in the --config recipe)")
    return opts


def read_recipe(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise HnkitError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise HnkitError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise HnkitError(f"{path}: a recipe is a mapping of option: value")
    unknown = [k for k in data if k not in OPTIONS]
    if unknown:
        raise HnkitError(f"{path}: unknown option(s) {', '.join(unknown)}")
    out = {}
    for k, v in data.items():
        typ = OPTIONS[k][0]
        if typ is list:
            out[k] = _as_list(v, k, path)
        elif typ is str and v is not None:
            out[k] = str(v)
        else:
            out[k] = v
    return out


def run(args: argparse.Namespace) -> Path:
    import torch

    from . import Hypernetwork, HypernetworkConfig, load
    from .text import TextTask, context_length, default_prompts, load_causal_lm, split_blocks, tokenized_blocks
    from .trainer import TrainConfig, Trainer

    o = resolve_options(args)
    output = Path(o["output"])
    if o["resume"] is None and (output / "checkpoints").exists():
        raise HnkitError(f"{output}: already holds a training run; continue it with --resume {output} "
                         "or choose another --output")
    if not Path(o["data"]).exists():
        raise HnkitError(f"{o['data']}: no such file or folder")
    model, tokenizer = load_causal_lm(o["model"])
    ctx = context_length(model)
    if ctx is not None and o["block_size"] > ctx:
        raise HnkitError(f"--block-size {o['block_size']} is larger than the model's context of {ctx} tokens")
    blocks = tokenized_blocks(o["data"], tokenizer, o["block_size"], o["text_field"])
    train, val = split_blocks(blocks, o["val_fraction"], o["seed"])
    if o["resume"]:
        hn = load(_checkpoint_file(Path(o["resume"])))  # the structure it was trained with
    else:
        module = {k: o[k] for k in MODULE_OPTIONS}
        module["activation"] = None if module["activation"] in (None, "linear") else module["activation"]
        torch.manual_seed(o["seed"])
        hn = Hypernetwork.for_model(model, HypernetworkConfig(**module), name=o["name"])
    prompts = o["sample_prompts"] or default_prompts(tokenizer, val if len(val) else train)
    task = TextTask(model, tokenizer, hn, train, val, prompts, o["sample_tokens"])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in o.items() if k in names}, output_dir=str(output))
    config.lr = _number_or_string(config.lr)
    config.max_grad_norm = config.max_grad_norm or None
    config.max_grad_value = config.max_grad_value or None
    trainer = Trainer(task, config)
    if o["resume"]:
        trainer.resume(o["resume"])
    final = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"wrote {final} ({trainer.step} steps); metrics, samples and loss.png in {output}")
    return final


def _number_or_string(lr):
    try:
        return float(lr)
    except ValueError:
        return str(lr)


def _checkpoint_file(folder: Path) -> Path:
    found = sorted(folder.glob("checkpoints/step-*")) if (folder / "checkpoints").is_dir() else [folder]
    if not found or not (found[-1] / "hypernetwork.safetensors").is_file():
        raise HnkitError(f"{folder}: no checkpoint to resume from")
    return found[-1] / "hypernetwork.safetensors"
