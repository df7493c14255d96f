"""The ``hnkit`` command. A user's mistake (HnkitError) is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from .errors import HnkitError


def cmd_inspect(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from .checkpoint import load

    hn = load(args.file)
    c = hn.config
    table = Table(title=f"{args.file}", show_header=False)
    rows = [
        ("name", hn.name), ("step", hn.step), ("keyed by", hn.keyed_by),
        ("keys", ", ".join(map(str, hn.keys()))),
        ("parameters", f"{sum(p.numel() for p in hn.parameters()):,}"),
        ("layer structure", c.layer_structure), ("activation", c.activation or "linear"),
        ("layer norm", c.layer_norm), ("dropout structure", c.dropout_structure),
        ("activate output", c.activate_output), ("weight init", c.weight_init),
        ("family", hn.family), ("base model", hn.base_model), ("description", hn.description or None),
    ] + [(k, v) for k, v in hn.extra.items()]
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    Console().print(table)


def cmd_convert(args) -> None:
    from pathlib import Path

    from .checkpoint import load, save

    if Path(args.output).resolve() == Path(args.input).resolve():
        raise HnkitError(f"{args.output}: output is the input file; choose another name")
    out = save(load(args.input), args.output, format=args.format)
    print(f"wrote {out}")


def cmd_train_text(args) -> None:
    from .train_text import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hnkit", description="NovelAI-style hypernetworks for LMs and SD.")
    parser.add_argument("--version", action="version", version=f"hnkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from .train_text import add_arguments

    p = sub.add_parser("train-text", help="train a hypernetwork on a text corpus (a style) for a causal LM")
    add_arguments(p)
    p.set_defaults(func=cmd_train_text)
    p = sub.add_parser("inspect", help="print a hypernetwork file's config, widths and metadata")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("convert", help="convert between .safetensors and the web UI's .pt")
    p.add_argument("input")
    p.add_argument("output", help="the suffix picks the format (.pt = web UI) unless --format is given")
    p.add_argument("--format", choices=["hnkit", "a1111"])
    p.set_defaults(func=cmd_convert)
    return parser


def quiet_libraries() -> None:
    """hnkit draws its own progress; the libraries' download/loading bars and notices are noise here."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command.startswith("train"):
            quiet_libraries()
        args.func(args)
    except HnkitError as exc:
        print(f"hnkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hnkit: interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:  # e.g. a path that vanished mid-run
        print(f"hnkit: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
