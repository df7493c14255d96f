"""Options shared by the training commands: one table per command, recipes and overrides.

A command's options are a dict ``name -> (type, default, help)``. The same names, with
underscores, are the keys of its YAML recipes; the command line overrides a recipe, a recipe the
defaults. List options come in two kinds: ``NUMBERS`` (``--layer-structure 1,2,1``) and ``TEXTS``
(``--sample-prompts "a cat" --sample-prompts "a dog"``: repeat the flag, since prompts hold commas).
A tuple of names as the type is a choice among them (``--precision {fp32,fp16,bf16}``).

A recipe's values are taken as the command line would take them, so ``weight_decay: 1e-2`` (a
string to YAML 1.1) is the number 0.01 and ``max_steps: "30"`` is 30; a switch takes only a YAML
boolean (``true``/``false`` unquoted: a quoted ``"false"`` is refused, not counted as true). Each
mistake is one line naming the recipe, the key, the value and the type expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ..errors import HnkitError, first_line
from ..module import WEIGHT_INITS, activation_name
from ..util import cache_root

NUMBERS, TEXTS = "numbers", "texts"

# The trainer's options (hnkit/train_config.py TrainConfig), the same for every task.
TRAINING = {
    "output": (str, "runs/hypernetwork", "output folder"),
    "name": (str, "hypernetwork", "name of the hypernetwork (and of the final file)"),
    "max_steps": (int, 1000, "optimizer steps"),
    "batch_size": (int, 4, "examples per step and process"),
    "grad_accum": (int, 1, "micro-batches per optimizer step"),
    "lr": (str, "1e-4", "learning rate, or the web UI's step string '5e-3:100, 1e-3:1000, 1e-5'"),
    "lr_schedule": (("constant", "linear", "cosine"), "constant", "learning-rate schedule"),
    "warmup_steps": (int, 0, "linear warm-up steps"),
    "weight_decay": (float, 0.0, "AdamW weight decay"),
    "max_grad_norm": (float, 1.0, "clip gradients to this norm (0: off)"),
    "max_grad_value": (float, 0.0, "clip gradients to this value (0: off)"),
    "precision": (("fp32", "fp16", "bf16"), "fp32", "training precision: fp32, or mixed fp16 / bf16"),
    "gradient_checkpointing": (bool, False, "recompute activations in backward to save memory"),
    "seed": (int, 0, "random seed"),
    "save_every": (int, 0, "write a resumable checkpoint every N steps (0: at the end)"),
    "keep_last": (int, 2, "checkpoints to keep"),
    "eval_every": (int, 0, "validation loss every N steps (0: off)"),
    "eval_batches": (int, 16, "validation batches per evaluation"),
    "sample_every": (int, 0, "write samples every N steps (0: off)"),
    "log_every": (int, 10, "metrics every N steps"),
    "tensorboard": (bool, False, "also log to TensorBoard (needs the tensorboard package)"),
    "resume": (str, None, "continue from this output folder or checkpoint folder"),
    "force": (bool, False, "start over in an --output that holds a run (its checkpoints and metrics go)"),
}

# The hypernetwork's structure (HypernetworkConfig); a task may change the defaults.
MODULE = {
    "layer_structure": (NUMBERS, [1, 2, 1], "module widths as multiples of the input width"),
    "activation": (str, "linear", "linear, relu, leakyrelu, elu, swish, tanh, sigmoid, gelu, ..."),
    "layer_norm": (bool, False, "LayerNorm after each Linear"),
    "dropout_structure": (NUMBERS, None, "dropout per layer, e.g. 0,0.3,0"),
    "activate_output": (bool, False, "activation after the last Linear too"),
    "weight_init": (WEIGHT_INITS, "Normal", "initialization of the Linear weights"),
    "zero_init_last": (bool, False, "start as an exact identity"),
    "per_site": (bool, False, "one module pair per attention layer instead of per width"),
    "form": (("mlp", "lowrank"), "mlp", "module form: mlp (the web UI's, the options above) or lowrank "
                                        "(x + B A x + c, of --rank; the MLP options are not used; .safetensors only)"),
    "rank": (int, None, "rank of the lowrank form (1 to the input width)"),
}
MLP_ONLY = ("layer_structure", "activation", "layer_norm", "dropout_structure", "activate_output", "weight_init",
            "zero_init_last")


def with_defaults(table: dict, **defaults) -> dict:
    """``table`` with some defaults changed (types and help kept)."""
    out = dict(table)
    for name, value in defaults.items():
        typ, _, text = table[name]
        out[name] = (typ, value, text)
    return out


def add_arguments(parser: argparse.ArgumentParser, options: dict) -> None:
    parser.add_argument("--config", help="a recipe YAML; command-line options override it")
    for name, (typ, default, text) in options.items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typ == NUMBERS:
            parser.add_argument(flag, default=None, help=f"{text} (comma-separated)")
        elif typ == TEXTS:
            parser.add_argument(flag, action="append", default=None, help=f"{text} (repeat the flag for several)")
        elif isinstance(typ, tuple):
            parser.add_argument(flag, choices=typ, default=None, help=f"{text} (default: {default})")
        else:
            parser.add_argument(flag, type=typ, default=None, help=f"{text} (default: {default})")


# -- values: a recipe's, and the command line's lists --------------------------------------------
def _is_scalar(value) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _expected(typ) -> str:
    if isinstance(typ, tuple):
        return f"one of {', '.join(typ)}"
    names = {bool: "a YAML boolean: true or false, unquoted", int: "an integer", float: "a number", str: "a string",
             NUMBERS: "numbers: a list [1, 2, 1] or '1,2,1'", TEXTS: "a text or a list of texts"}
    return names.get(typ, getattr(typ, "__name__", str(typ)))


def _described(value) -> str:
    if value is None:
        return "no value"
    kind = {bool: "boolean", str: "string", int: "number", float: "number", list: "list", dict: "mapping"}
    return f"the {kind.get(type(value), type(value).__name__)} {value!r}"


def _option_value(typ, value):
    """``value`` (from YAML, or a list option's command-line string) as the command line gives an
    option of type ``typ``; ValueError if it does not fit. None (no value) is kept."""
    if value is None:
        return None
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(typ, tuple):
        if value in typ and isinstance(value, str):
            return value
    elif typ == NUMBERS:
        items = str(value).split(",") if _is_scalar(value) else value
        if isinstance(items, list) and all(_is_scalar(x) for x in items):
            return [x if isinstance(x, (int, float)) else float(x) for x in items]
    elif typ == TEXTS:
        items = value if isinstance(value, list) else [value]
        if all(_is_scalar(x) for x in items):
            return [str(x) for x in items]
    elif _is_scalar(value):
        return typ(str(value))  # as argparse converts the command line's text
    raise ValueError(_expected(typ))


def _recipe_value(key: str, value, option: tuple, path: str):
    """A recipe's value for the option ``key``, checked and converted."""
    typ, default, _ = option
    if value is None and default is not None:
        raise HnkitError(f"{path}: {key}: got no value, expected {_expected(typ)}")
    try:
        value = _option_value(typ, value)
    except ValueError:
        hint = " (quote it: YAML reads yes, no, on, off, true, false as booleans)" if isinstance(value, bool) else ""
        raise HnkitError(f"{path}: {key}: got {_described(value)}, expected {_expected(typ)}{hint}") from None
    if typ is str and value is not None:
        # "{cache}" is hnkit's cache folder ($HNKIT_CACHE, else ~/.cache/hnkit), so recipes follow it
        value = os.path.expanduser(value.replace("{cache}", str(cache_root())))
    return value


# A recipe is a page of options. Bounds checked before PyYAML builds anything, so that a small file
# cannot hang or expand into gigabytes: aliases that repeat aliases (a "billion laughs"), deep nesting.
MAX_RECIPE_BYTES = 64 * 1024  # the shipped recipes are under 1 KB
MAX_RECIPE_VALUES = 10_000  # values, each alias counted as all it stands for
MAX_RECIPE_DEPTH = 16  # nested lists and mappings (a recipe's are 2 deep: option: [values])


def _load_yaml(path: str):
    """The recipe's YAML, refused in one line if it is too large, too deep or expands too far."""
    import yaml

    with open(path, "rb") as f:
        text = f.read(MAX_RECIPE_BYTES + 1)
    if len(text) > MAX_RECIPE_BYTES:
        raise HnkitError(f"{path}: refused: a recipe is at most {MAX_RECIPE_BYTES // 1024} KB")
    try:
        _check_yaml_size(yaml.parse(text, Loader=yaml.SafeLoader), path)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HnkitError(f"{path}: not valid YAML ({first_line(exc)})") from None
    except RecursionError:  # bounded above; kept so that no input can give a traceback
        raise HnkitError(f"{path}: refused: nested too deeply") from None


def _check_yaml_size(events, path: str) -> None:
    """Count the values a YAML event stream stands for, each alias as the values of its anchor,
    without building them (the event stream is read one event at a time)."""
    import yaml

    sizes, starts, total = {}, [], 0  # anchor -> values; the open collections' (anchor, total at start)
    for event in events:
        if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            total += 1
            if isinstance(event, yaml.CollectionStartEvent):
                starts.append((event.anchor, total - 1))
            elif event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                raise HnkitError(f"{path}: alias *{event.anchor} refers to no complete anchor before it "
                                 "(undefined, or inside its own anchor)")
            total += sizes[event.anchor]
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, start = starts.pop()
            if anchor:
                sizes[anchor] = total - start
        if len(starts) > MAX_RECIPE_DEPTH:
            raise HnkitError(f"{path}: refused: nested more than {MAX_RECIPE_DEPTH} levels deep")
        if total > MAX_RECIPE_VALUES:
            raise HnkitError(f"{path}: refused: it stands for more than {MAX_RECIPE_VALUES:,} values (YAML "
                             "aliases repeating aliases?); a recipe is a page of options")


def read_recipe(path: str, options: dict) -> dict:
    p = Path(path)
    if not p.is_file():
        raise HnkitError(f"{path}: no such recipe file")
    data = _load_yaml(path) or {}
    if not isinstance(data, dict):
        raise HnkitError(f"{path}: a recipe is a mapping of option: value")
    unknown = [str(k) for k in data if k not in options]
    if unknown:
        meant = [k.replace("-", "_") for k in unknown if k.replace("-", "_") in options]
        hint = f" (recipe keys use underscores: {', '.join(meant)})" if meant else ""
        raise HnkitError(f"{path}: unknown option(s) {', '.join(unknown)}{hint}")
    out, mistakes = {}, []
    for k, v in data.items():
        try:
            out[k] = _recipe_value(k, v, options[k], path)
        except HnkitError as exc:
            mistakes.append(str(exc))
    if mistakes:
        raise HnkitError("\n".join(mistakes))  # one line each
    return out


def resolve_options(args: argparse.Namespace, options: dict, required=("model", "data")) -> dict:
    """defaults <- recipe YAML <- command line."""
    opts = {name: default for name, (_, default, _) in options.items()}
    if getattr(args, "config", None):
        opts.update(read_recipe(args.config, options))
    for name, (typ, _, _) in options.items():
        value = getattr(args, name, None)
        if value is not None and typ == NUMBERS:
            try:
                value = _option_value(typ, value)
            except ValueError:
                raise HnkitError(f"--{name.replace('_', '-')}: got {value!r}, expected {_expected(typ)}") from None
        if value is not None:
            opts[name] = value
    for name in required:
        if not opts[name]:
            raise HnkitError(f"--{name.replace('_', '-')} is required (on the command line or in the --config recipe)")
    return opts


# -- from options to the objects a run needs -----------------------------------------------------
def check_output(opts: dict) -> Path:
    """The output folder; an existing run there is continued only with --resume and replaced only
    with --force, never overwritten by accident (checked again by the trainer, under its lock)."""
    from ..run_folder import refuse_existing_run

    output = Path(opts["output"])
    if opts["resume"] is None and not opts["force"]:
        refuse_existing_run(output, opts["name"])
    probe = output
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HnkitError(f"--output {output}: {probe} is a file, expected a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HnkitError(f"--output {output}: {probe} is not writable")
    return output


def module_config(opts: dict):
    from ..hypernetwork import HypernetworkConfig

    module = {k: opts.get(k, default) for k, (_, default, _) in MODULE.items()}
    module["activation"] = activation_name(module["activation"])
    if module["form"] != "mlp":  # the MLP's options (a command's defaults) do not describe another form
        module = {k: v for k, v in module.items() if k not in MLP_ONLY}
    try:
        config = HypernetworkConfig(**module)
    except HnkitError as exc:
        if module["form"] != "mlp" or module["rank"] is not None:
            raise HnkitError(f"--form {module['form']} --rank {module['rank']}: {exc}") from None
        raise
    if opts.get("save_pt") and config.form != "mlp":
        raise HnkitError(f"--save-pt: a {config.form!r} hypernetwork cannot be written as a web UI .pt (the web UI "
                         "knows only the MLP form); leave --save-pt off and use the .safetensors")
    return config


def train_config(opts: dict, output: Path):
    from ..train_config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in opts.items() if k in names}, output_dir=str(output))
    config.lr = _number_or_string(config.lr)
    config.max_grad_norm = config.max_grad_norm or None
    config.max_grad_value = config.max_grad_value or None
    return config


def _number_or_string(lr):
    try:
        return float(lr)
    except ValueError:
        return str(lr)


def checkpoint_file(folder: Path) -> Path:
    """The hypernetwork file of the checkpoint --resume points at (an output folder: its latest)."""
    found = sorted(folder.glob("checkpoints/step-*")) if (folder / "checkpoints").is_dir() else [folder]
    if not found or not (found[-1] / "hypernetwork.safetensors").is_file():
        raise HnkitError(f"{folder}: no checkpoint to resume from")
    return found[-1] / "hypernetwork.safetensors"
