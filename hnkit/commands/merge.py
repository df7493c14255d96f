"""``hnkit merge``: weighted hypernetworks as one file (:func:`hnkit.merge`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import HnkitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("styles", nargs="+", metavar="FILE[:STRENGTH]",
                        help="hypernetwork files with their strengths (default 1), e.g. noir.safetensors:0.6")
    parser.add_argument("-o", "--output", required=True,
                        help="the merged file: .safetensors (hnkit) or .pt (the web UI's, width-keyed only)")
    parser.add_argument("--blend", choices=["sum", "chain"], default="sum",
                        help="sum: x + sum s_i mlp_i(x) (default); chain: one after the other (linear networks only)")
    parser.add_argument("--name", help="name stored in the file (default: the output's file name)")


def run(args: argparse.Namespace) -> Path:
    from ..checkpoint import save
    from ..merge import merge
    from .common import load_styles, parse_styles

    output = Path(args.output)
    for path, _ in parse_styles(args.styles, bounded=False):
        if path.resolve() == output.resolve():
            raise HnkitError(f"{output}: output is one of the inputs; choose another name")
    styles = load_styles(args.styles, bounded=False)
    merged = merge(styles, blend=args.blend, name=args.name or output.stem)
    out = save(merged, output)
    c = merged.config
    print(f"wrote {out}: {len(styles)} networks merged ({args.blend}), layer structure "
          f"{[round(x, 6) for x in c.layer_structure]}, activation {c.activation or 'linear'}")
    return out
