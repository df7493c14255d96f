"""``hnkit train-text``: options, recipe files, and the run itself."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import HnkitError, shown
from ..preserve import WEIGHT as PRESERVE_WEIGHT
from . import options as shared
from .options import MLP_ONLY, MODULE, TEXTS, TRAINING

# option name -> (type, default, help). The YAML recipes use the same names with underscores.
OPTIONS = {
    "model": (str, None, "hub id or local folder of a causal LM"),
    "data": (str, None, ".txt file, folder of .txt files, .jsonl with a text field, or a saved datasets folder"),
    # lr 1e-3: the best of bench_quality.py's grid with --preserve-data; without it 3e-4 keeps more
    # style within 3 % neutral cost, where 1e-3 and 1e-4 are at parity (docs/benchmarks.md)
    **shared.with_defaults(TRAINING, output="runs/text", lr="1e-3"),
    "batch_size": (int, 4, "blocks per step and process"),
    "block_size": (int, 256, "tokens per block"),
    "val_fraction": (float, 0.05, "share of blocks held out for validation"),
    "sample_every": (int, 0, "write sample continuations every N steps (0: off)"),
    "sample_prompts": (TEXTS, None, "prompts for samples (default: starts of validation blocks)"),
    "sample_tokens": (int, 48, "tokens per sample"),
    "text_field": (str, "text", "field holding the text in .jsonl / datasets input"),
    "preserve_data": (str, None, "neutral text (same forms as --data) whose next-token distributions the "
                                 "style should keep: adds a KL term to the loss (prior preservation)"),
    # a new run from a style's weights: the file decides the architecture (the MODULE options below)
    "init": (str, None, "start a new run from this style's weights (.safetensors or .pt) instead of the identity; "
                        "its architecture is the run's (architecture options given must match it)"),
    "preserve_weight": (float, PRESERVE_WEIGHT, "weight of the prior-preservation KL term (0: off)"),
    # on by default: without --preserve-data, on text the bare model writes itself (hnkit/self_text.py)
    "preserve": (bool, True, "prior preservation (default on): on --preserve-data, else on text the bare model "
                             "writes itself; --no-preserve turns it off"),
    # text's default network, chosen by scripts/bench_quality.py (docs/benchmarks.md): one small
    # bottleneck per attention layer, starting as the identity; the web UI's classic network is
    # recipes/webui_classic.yaml
    **shared.with_defaults(MODULE, layer_structure=[1, 0.125, 1], activation="relu", zero_init_last=True,
                           per_site=True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_arguments(parser, OPTIONS)


def run(args: argparse.Namespace) -> Path:
    from ..text import TextTask, context_length, default_prompts, load_causal_lm, split_blocks, tokenized_data
    from ..train_config import check_resume, config_options, task_options
    from ..trainer import Trainer

    o = shared.resolve_options(args, OPTIONS)  # defaults <- recipe YAML <- command line
    output = shared.check_output(o)
    check_paths(o)
    check_preservation(o, args.preserve_weight is not None or o["preserve_weight"] != PRESERVE_WEIGHT)
    recorded = recorded_run_options(o["resume"])
    init, init_record = init_style(args, o, recorded)  # o's architecture options become the file's
    config = shared.train_config(o, output)
    options = {**config_options(config), **task_options(o), **init_record}  # recorded in checkpoints

    def check_record() -> None:  # a resume that changes the run is refused as soon as the change is known
        if o["resume"]:
            check_resume(o["resume"], options)

    check_record()  # before the model is loaded
    check_older_run(o, recorded)
    model, tokenizer = load_causal_lm(o["model"])
    if init is not None and not o["resume"]:
        start_from_init(init, model, o, init_record["init_sha256"])  # fits the model: checked before the data
    ctx = context_length(model)
    if ctx is not None and o["block_size"] > ctx:
        raise HnkitError(f"--block-size {o['block_size']} is larger than the model's context of {ctx} tokens")
    blocks, options["data_tokens"] = tokenized_data(o["data"], tokenizer, o["block_size"], o["text_field"])
    check_record()  # before the data is split and the teacher computed
    train, val = split_blocks(blocks, o["val_fraction"], o["seed"])
    del blocks  # the split is a copy: keep only it
    neutral = preserve_blocks(o, tokenizer, options)
    check_record()  # before the teacher is computed
    hn = network(o, model, init)
    # how the corpus was cut and split: eval-text measures the same held-out blocks by default
    hn.extra["data"] = {k: o[k] for k in ("block_size", "val_fraction", "seed", "text_field")}
    prompts = o["sample_prompts"] or default_prompts(tokenizer, val if len(val) else train)
    task = TextTask(model, tokenizer, hn, train, val, prompts, o["sample_tokens"])
    trainer = Trainer(task, config, options)
    if preserving(o):
        start_preservation(trainer, o, neutral, recorded)
        del neutral
    if o["resume"]:
        trainer.resume(o["resume"])
    final = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"wrote {final}: {trainer.summary()}; metrics, samples and loss.png in {output}")
    return final


def network(o: dict, model, init):
    """The network the run trains: the checkpoint's on --resume (the structure it was trained with),
    else the --init style, else a new one (of the options' structure, starting as the identity)."""
    import torch

    from .. import Hypernetwork, load

    if o["resume"]:
        return load(shared.checkpoint_file(Path(o["resume"])))
    if init is not None:
        return init
    torch.manual_seed(o["seed"])
    return Hypernetwork.for_model(model, shared.module_config(o), name=o["name"])


def preserving(o: dict) -> bool:
    return o["preserve"] and o["preserve_weight"] > 0


def start_preservation(trainer, o: dict, neutral, recorded: dict | None) -> None:
    """Train with prior preservation: the teacher on the --preserve-data blocks (``neutral``), or,
    without them, on blocks the bare model writes itself (cached; their sha256 recorded in the run's
    options as ``self_text_tokens``). Progress goes to the main process's output."""
    from ..preserve import Teacher
    from ..self_text import count, self_blocks

    task, acc = trainer.task, trainer.accelerator
    say = print if acc.is_main_process else None
    n = len(task.train_dataset)
    if neutral is None:
        with acc.main_process_first():  # one process writes the cached blocks, the others read them
            neutral, digest = self_blocks(task.model, task.tokenizer, count(n), o["block_size"], say)
        trainer.options["self_text_tokens"] = digest
        if recorded is not None and recorded.get("self_text_tokens", digest) != digest:
            raise HnkitError(f"--resume {o['resume']}: the neutral text the model wrote for prior preservation "
                             "differs from the run's (written again on another machine or library version?); "
                             "start over with --force, or resume where the run's cache is")
    # The bare model as the trainer runs it (its device and dtype); nothing is attached yet. A
    # training block i is paired with neutral block i mod n, so more than len(train) are never used.
    task.use_preservation(Teacher(task.model, neutral[:n].clone(), say=say), o["preserve_weight"])


def recorded_run_options(resume: str | None) -> dict | None:
    """The options recorded in the checkpoint --resume names (None: no resume, or an older record)."""
    from ..run_folder import checkpoint_to_resume, read_trainer_state, recorded_options

    if resume is None:
        return None
    folder = checkpoint_to_resume(Path(resume))
    return recorded_options(read_trainer_state(folder), folder)


def check_older_run(o: dict, recorded: dict | None) -> None:
    """A run recorded before preservation became the default, trained without it, is not resumed
    with it (its record has no ``preserve`` option to compare)."""
    if recorded is not None and "preserve" not in recorded and recorded.get("preserve_data") is None \
            and preserving(o) and o["preserve_data"] is None:
        raise HnkitError(f"--resume {o['resume']}: this run was trained without prior preservation (the default "
                         "then); resume it with --no-preserve")


# -- --init: a new run from a style's weights ------------------------------------------------------
def init_style(args: argparse.Namespace, o: dict, recorded: dict | None):
    """The --init style (None without one), loaded safely, and its record in the run's options
    (``init_sha256``, the file's content). The file decides the architecture: an architecture option
    given that contradicts it is refused, the others are set from it in ``o``. Resuming a run that
    started from one, --init may be left out: the run's record gives both."""
    from ..checkpoint import load

    given = given_options(args, MODULE)
    was = (recorded or {}).get("init_sha256")
    if o["init"] is None:
        if was is None:
            return None, {}
        o.update({k: recorded[k] for k in MODULE if k in recorded and k not in given})
        return None, {"init": recorded.get("init"), "init_sha256": was}
    if o["resume"] and was is None:
        raise HnkitError(f"--init {o['init']}: the run in --resume {o['resume']} did not start from a style; "
                         "resume it without --init, or start a new run")
    try:
        hn = load(o["init"])
    except HnkitError as exc:
        raise HnkitError(f"--init {exc}") from None
    sha256 = file_sha256(Path(o["init"]))
    if o["resume"] and sha256 != was:
        raise HnkitError(f"--init {o['init']}: not the style the run started from (sha256 {str(was)[:12]}..., "
                         f"file {shown(recorded.get('init'))}); resume with that file, or without --init")
    check_architecture(hn.config, o, given)
    o.update({k: getattr(hn.config, k) for k in MODULE})
    return hn, {"init_sha256": sha256}


def given_options(args: argparse.Namespace, names) -> set:
    """Which of ``names`` were given, on the command line or in the --config recipe."""
    given = {name for name in names if getattr(args, name, None) is not None}
    if getattr(args, "config", None):
        given |= set(shared.read_recipe(args.config, OPTIONS)) & set(names)
    return given


def check_architecture(config, o: dict, given: set) -> None:
    """Refuse an architecture option given (``given``; its value in ``o``) that the --init file's
    network (``config``) contradicts: one line naming the option and the file's value."""
    from ..module import activation_name

    for name in (k for k in MODULE if k in given):
        mine, theirs = o[name], getattr(config, name)
        if config.form != "mlp" and name in MLP_ONLY:
            raise HnkitError(f"{shown_option(name, mine)} does not apply to --init {o['init']}, a {config.form} "
                             f"network of rank {config.rank}: leave it out (the file decides the architecture)")
        if name == "activation":
            mine, theirs = activation_name(mine) or "linear", activation_name(theirs) or "linear"
        elif isinstance(theirs, list) and mine is not None:
            mine, theirs = [float(x) for x in mine], [float(x) for x in theirs]
        if mine != theirs:
            raise HnkitError(f"{shown_option(name, o[name])} contradicts --init {o['init']}, a network with "
                             f"{shown_option(name, theirs)}: leave it out (the file decides the architecture)")


def shown_option(name: str, value) -> str:
    """An option as the command line gives it: ``--per-site``, ``--no-per-site``, ``--layer-structure 1,2,1``."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, list):
        value = ",".join(f"{x:g}" for x in value)
    return f"{flag} {'none' if value is None else value}"


def file_sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def start_from_init(hn, model, o: dict, sha256: str) -> None:
    """Make the --init network (``hn``) this run's: refused in one line if it does not fit ``model``
    (a style for another base model); then a new run of it, at step 0, under this run's name, its
    metadata recording the file it started from (``extra["init"]``)."""
    from ..attach import check_fits
    from ..targets import find_sites, model_name

    family, sites = find_sites(model)
    try:
        check_fits(hn, sites, family)
    except HnkitError as exc:
        raise HnkitError(f"--init {o['init']}: made for {hn.base_model or 'an unnamed model'}, it does not fit "
                         f"--model {o['model']}: {exc}") from None
    hn.name, hn.step, hn.family, hn.base_model, hn.base_model_hash = o["name"], 0, family, model_name(model), None
    hn.description, hn.optimizer_state = "", None
    hn.extra = {"init": {"file": Path(o["init"]).name, "sha256": sha256}}


def preserve_blocks(o: dict, tokenizer, options: dict):
    """The --preserve-data blocks (None without it); their token ids' sha256 goes into ``options``."""
    from ..text import tokenized_data

    if o["preserve_data"] is None:
        return None
    try:
        neutral, options["preserve_data_tokens"] = tokenized_data(o["preserve_data"], tokenizer, o["block_size"],
                                                                  o["text_field"])
    except HnkitError as exc:
        raise HnkitError(f"--preserve-data {exc}") from None
    if options["preserve_data_tokens"] == options["data_tokens"]:  # the same text in another form or folder
        raise HnkitError(f"--preserve-data {o['preserve_data']} is the same text as --data {o['data']} once "
                         "tokenized; the preserved text is neutral text the style should leave alone")
    return neutral


def check_paths(o: dict) -> None:
    """The data exist and the numbers are in range: checked before anything is loaded."""
    if not Path(o["data"]).exists():
        raise HnkitError(f"{o['data']}: no such file or folder")
    if o["preserve_data"] is not None and not Path(o["preserve_data"]).exists():
        raise HnkitError(f"--preserve-data {o['preserve_data']}: no such file or folder")
    if not 0 <= o["val_fraction"] < 1:
        raise HnkitError(f"--val-fraction must be at least 0 and below 1, got {o['val_fraction']}")


def check_preservation(o: dict, weight_given: bool) -> None:
    """Prior-preservation options that would be silently wrong, refused before anything is loaded.
    ``weight_given``: --preserve-weight was given on the command line, or a recipe changed it."""
    import math

    from .common import same_corpus

    weight, data = o["preserve_weight"], o["preserve_data"]
    if not (math.isfinite(weight) and weight >= 0):
        raise HnkitError(f"--preserve-weight must be 0 or more (a finite number), got {weight}")
    if not o["preserve"] and data is not None:
        raise HnkitError(f"--no-preserve turns prior preservation off, but --preserve-data {data} asks for it: "
                         "give one of them")
    if not o["preserve"] and weight_given and weight > 0:
        raise HnkitError(f"--preserve-weight {weight:g} does nothing with --no-preserve (prior preservation off): "
                         "leave one of them out")
    if data is not None and same_corpus(Path(o["data"]), Path(data)):
        raise HnkitError(f"--preserve-data {data} is the same text as --data {o['data']}; the preserved text is "
                         "neutral text the style should leave alone (e.g. general prose)")
