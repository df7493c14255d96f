"""The ``hnkit`` command. A user's mistake (HnkitError) is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import warnings

from ..errors import HnkitError, HnkitWarning

default_showwarning = warnings.showwarning


def cmd_inspect(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..checkpoint import load
    from ..compat import inspect_rows

    hn = load(args.file)
    c = hn.config
    table = Table(title=f"{args.file}", show_header=False)
    if c.form == "mlp":
        shape = [("layer structure", c.layer_structure), ("activation", c.activation or "linear"),
                 ("layer norm", c.layer_norm), ("dropout structure", c.dropout_structure),
                 ("activate output", c.activate_output), ("weight init", c.weight_init)]
    else:
        shape = [("form", c.form), ("rank", c.rank)]
    rows = [
        ("name", hn.name), ("step", hn.step), ("keyed by", hn.keyed_by),
        ("keys", ", ".join(map(str, hn.keys()))),
        ("parameters", f"{sum(p.numel() for p in hn.parameters()):,}"),
        *shape,
        ("family", hn.family), ("base model", hn.base_model), ("description", hn.description or None),
    ] + [(k, v) for k, v in hn.extra.items()]
    if hn.optimizer_state is not None:
        rows.append(("optimizer state", f"{hn.optimizer_state['optimizer_name']} (from {args.file}.optim)"))
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    table.add_section()
    for key, value in inspect_rows(args.file, hn):  # where the file loads: the web UI, ComfyUI
        table.add_row(key, value)
    Console().print(table)


def cmd_convert(args) -> None:
    from pathlib import Path

    from ..checkpoint import A1111_SUFFIXES, load, save

    if Path(args.output).resolve() == Path(args.input).resolve():
        raise HnkitError(f"{args.output}: output is the input file; choose another name")
    if Path(args.output).exists() and not args.force:
        raise HnkitError(f"{args.output}: already exists; choose another name or add --force to replace it")
    hn = load(args.input)
    out = save(hn, args.output, format=args.format)  # warns where the web UI or ComfyUI will not load a .pt as is
    print(f"wrote {out}")
    if hn.optimizer_state is not None:
        if (args.format or ("a1111" if out.suffix in A1111_SUFFIXES else "hnkit")) == "a1111":
            print(f"wrote {out}.optim (optimizer state)")
        else:
            print(f"note: the optimizer state in {args.input}.optim is not carried into {out.name}")


# Commands that live in a module of their own (named under hnkit), with add_arguments(parser) and run(args).
COMMANDS = {
    "train-text": ("commands.train_text", "train a hypernetwork on a text corpus (a style) for a causal LM"),
    "train-image": ("commands.train_image", "train a hypernetwork for a Stable Diffusion UNet on captioned images"),
    "generate-text": ("commands.generate_text", "continue a prompt with a causal LM steered by styles"),
    "generate-image": ("commands.generate_image", "generate images with a Stable Diffusion pipeline and hypernetworks"),
    "eval-text": ("commands.eval_text", "perplexity on a style and a neutral corpus across strengths, with a plot"),
    "merge": ("commands.merge", "merge weighted hypernetworks into one file (their sum blend, exactly)"),
    "serve": ("commands.serve", "serve a folder of styles: an OpenAI-compatible API and a studio page"),
    "make-style": ("commands.make_style", "a style from one example paragraph, written by a style generator"),
    "export": ("commands.export", "a style as a LoRA on the K/V projections: a PEFT folder or a GGUF file"),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="hnkit", description="NovelAI-style hypernetworks for LMs and SD.")
    parser.add_argument("--version", action="version", version=f"hnkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, text) in COMMANDS.items():
        module = importlib.import_module(f"hnkit.{module_name}")
        p = sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    p = sub.add_parser("inspect", help="print a hypernetwork file's config, widths and metadata")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("convert", help="convert between .safetensors and the web UI's .pt")
    p.add_argument("input")
    p.add_argument("output", help=".safetensors (hnkit's format) or .pt (the web UI's)")
    p.add_argument("--format", choices=["hnkit", "a1111"], help="must agree with the output's extension")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_convert)
    return parser


def quiet_libraries() -> None:
    """hnkit draws its own progress; the libraries' download/loading bars and notices are noise here."""
    import datasets
    import diffusers
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hnkit's own warnings as one ``hnkit: warning:`` line on stderr; the libraries' as Python prints them."""
    if issubclass(category, HnkitWarning):
        print(f"hnkit: warning: {message}", file=sys.stderr)
    else:
        default_showwarning(message, category, filename, lineno, file, line)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command.startswith(("train", "generate", "eval", "serve")):
            quiet_libraries()
        with warnings.catch_warnings():  # restores showwarning when the command returns
            warnings.showwarning = one_line_warning
            args.func(args)
    except HnkitError as exc:
        print(f"hnkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # already stopping: a further Ctrl-C during the interpreter's shutdown must not kill it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("hnkit: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a path that vanished mid-run, a folder that is not writable, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"hnkit: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
