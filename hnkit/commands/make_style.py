"""``hnkit make-style``: a style from one example paragraph, written by a style generator
(:mod:`hnkit.generator`) in one forward pass of the base model; the file is an ordinary style."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import HnkitError
from ..generator import MAX_EXAMPLE_CHARS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model: a hub id or a local folder")
    parser.add_argument("--example", required=True, metavar="FILE|-",
                        help="the example text (UTF-8; '-' reads standard input); about 2 KB is the target case")
    parser.add_argument("--output", "-o", required=True, help="the style file: .safetensors (hnkit) or .pt (the web UI's)")
    parser.add_argument("--generator", help="a style generator file (default: the one hnkit ships, for "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--name", help="name stored in the style (default: the output's file name)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")


def read_example(source: str) -> str:
    """The example's text from a file or standard input ('-'), refused in one line where it is not
    UTF-8 text or is far too large to be an example."""
    where = "standard input" if source == "-" else source
    limit = 4 * MAX_EXAMPLE_CHARS  # bytes: a UTF-8 character is at most four
    if source == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        path = Path(source)
        if not path.is_file():
            raise HnkitError(f"{source}: no such example file")
        with path.open("rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise HnkitError(f"{where}: the example is too long: more than {limit:,} bytes; at most "
                         f"{MAX_EXAMPLE_CHARS:,} characters (about 2 KB is what a style needs)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HnkitError(f"{where}: the example is not UTF-8 text (byte {exc.start})") from None
    return text


def run(args: argparse.Namespace) -> Path:
    from ..checkpoint import save
    from ..generator import StyleGenerator, check_example
    from ..text import load_causal_lm

    output = Path(args.output)
    if output.exists() and not args.force:
        raise HnkitError(f"{output}: already exists; choose another name or add --force to replace it")
    text = read_example(args.example)
    try:
        check_example(text)
    except HnkitError as exc:
        raise HnkitError(f"{'standard input' if args.example == '-' else args.example}: {exc}") from None
    generator = StyleGenerator.load(args.generator)
    model, tokenizer = load_causal_lm(args.model)
    start = time.perf_counter()
    hn = generator.make_style(model, text, tokenizer, name=args.name or output.stem)
    seconds = time.perf_counter() - start
    out = save(hn, output)
    print(f"wrote {out}: a style generated from {hn.extra['generated']['example_tokens']} tokens of the example "
          f"by {generator.name} in {seconds:.2f} s")
    return out
