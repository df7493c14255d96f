"""``hnkit generate-image``: images from a Stable Diffusion pipeline with hypernetworks attached.

    hnkit generate-image --model ./sd15 --hypernetwork ink.pt:0.8 --prompt "a harbour at dusk" \\
        --seed 1 --num-images 2 --grid 0,0.5,1 --output out/

Each ``--hypernetwork FILE[:STRENGTH]`` is attached to ``pipe.unet`` (several are chained, as the web
UI does). With ``--grid`` every image is made once per grid value, which multiplies all strengths,
and a grid PNG shows them side by side: one row per prompt and seed, one column per value.

Everything the user gave is checked before the first image: a bad strength, a missing or damaged
file, a hypernetwork whose widths fit no layer of the UNet are one-line errors and nothing is
written. Existing PNGs are never overwritten: a taken name gets a ``-2``, ``-3``, ... suffix.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import warnings
from pathlib import Path

import torch

from ..errors import HnkitError, first_line
from ..util import choose_device, model_source
from .common import load_styles, parse_factors, parse_styles


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a diffusers pipeline folder (SD 1.x, 2.x or SDXL) or a hub id")
    p.add_argument("--hypernetwork", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a hypernetwork file (.pt or .safetensors), optionally with a strength (default 1); "
                        "repeat to chain several")
    p.add_argument("--prompt", action="append", required=True, help="the prompt; repeat for several")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=30, help="inference steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt, seeds seed, seed+1, ...")
    p.add_argument("--grid", default=None, metavar="STRENGTHS",
                   help="comma-separated factors for all strengths, e.g. 0,0.5,1: one image per factor "
                        "and a grid PNG (rows: prompt and seed, columns: factor)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--output", required=True, help="folder for the PNGs (created if missing)")


# -- parsing ---------------------------------------------------------------------------------------
def _check_numbers(args) -> None:
    if args.steps < 1:
        raise HnkitError(f"--steps {args.steps}: must be at least 1")
    if args.num_images < 1:
        raise HnkitError(f"--num-images {args.num_images}: must be at least 1")
    if not math.isfinite(args.guidance):
        raise HnkitError(f"--guidance {args.guidance}: must be a finite number")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise HnkitError(f"--{name} {value}: must be a positive multiple of 8")


# -- loading ---------------------------------------------------------------------------------------
def _pipeline_class(source: str):
    """StableDiffusionXLPipeline or StableDiffusionPipeline, read from a local folder's
    model_index.json; DiffusionPipeline (which reads it itself) for a hub id. ``source``: what
    :func:`hnkit.util.model_source` returned."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if not Path(source).is_dir():
        return DiffusionPipeline
    index = Path(source) / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HnkitError(f"{index}: unreadable model_index.json ({first_line(exc)})") from None
    return StableDiffusionXLPipeline if "XL" in str(class_name) else StableDiffusionPipeline


def load_pipeline(model: str, device: torch.device):
    """The pipeline of ``--model`` (a folder or a hub id) on ``device``, without a progress bar."""
    source = model_source(model, "model_index.json", "diffusers pipeline")
    cls = _pipeline_class(source)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        with warnings.catch_warnings():  # newer diffusers call it `dtype`; older ones know only `torch_dtype`
            warnings.filterwarnings("ignore", message=".*torch_dtype.*")
            pipe = cls.from_pretrained(source, torch_dtype=dtype)
    except Exception as exc:  # missing parts, wrong files, no network for a hub id: all the user's input
        raise HnkitError(f"{model}: cannot load a Stable Diffusion pipeline ({first_line(exc)})") from None
    if getattr(pipe, "unet", None) is None:
        raise HnkitError(f"{model}: a {type(pipe).__name__} has no UNet; use an SD 1.x, 2.x or SDXL pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# -- output ----------------------------------------------------------------------------------------
def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:limit].strip("-")
    return slug or "image"


def _free_name(folder: Path, stem: str, taken: set) -> Path:
    """``stem.png``, or ``stem-2.png``, ``stem-3.png``, ... when the name is taken on disk or in this run."""
    candidate, n = folder / f"{stem}.png", 1
    while candidate.exists() or candidate in taken:
        n += 1
        candidate = folder / f"{stem}-{n}.png"
    taken.add(candidate)
    return candidate


def _write_png(image, path: Path, info: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    from ..util import atomic_write

    meta = PngInfo()
    meta.add_text("hnkit", json.dumps(info))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def make_grid(rows: list[list]):
    """One PIL image from rows of equally sized images."""
    from PIL import Image

    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * w, r * h))
    return grid


# -- the command -----------------------------------------------------------------------------------
def run(args) -> None:
    grid = _check_arguments(args)
    styles = load_styles(args.hypernetwork, bounded=False)
    files = [str(path) for path, _ in parse_styles(args.hypernetwork, bounded=False)]
    device = choose_device(args.device)
    pipe = load_pipeline(args.model, device)
    _check_fit(pipe, styles, files)
    output, taken = Path(args.output), set()
    output.mkdir(parents=True, exist_ok=True)
    rows = _generate_all(pipe, args, styles, files, grid, output, taken, device)
    if grid is not None:
        path = _free_name(output, "grid", taken)
        _write_png(make_grid(rows), path, {"columns": grid, "prompts": args.prompt,
                                           "seeds": list(range(args.seed, args.seed + args.num_images))})
        print(f"wrote {path} (rows: prompt x seed, columns: strength factor {', '.join(f'{g:g}' for g in grid)})")


def _check_arguments(args) -> list[float] | None:
    """Everything but the files' contents, checked before anything is read or written; the grid."""
    _check_numbers(args)
    grid = parse_factors(args.grid, "--grid") if args.grid is not None else None
    specs = parse_styles(args.hypernetwork, bounded=False)
    if grid is not None and not specs:
        raise HnkitError("--grid varies hypernetwork strengths: give at least one --hypernetwork")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise HnkitError(f"{output}: exists and is not a folder")
    choose_device(args.device)
    # a missing or broken model folder is reported before the hypernetworks are read
    _pipeline_class(model_source(args.model, "model_index.json", "diffusers pipeline"))
    return grid


def _check_fit(pipe, styles, files) -> None:
    """Name the file whose widths fit no layer of the UNet, before anything is generated."""
    from ..attach import attach

    for path, (hn, _) in zip(files, styles):
        try:
            attach(pipe.unet, hn).remove()
        except HnkitError as exc:
            raise HnkitError(f"{path}: {exc}") from None


def _generate_all(pipe, args, styles, files, grid, output: Path, taken: set, device) -> list[list]:
    """Every image, each written as a PNG that records how it was made; one row per prompt and
    seed, one image per grid factor (which multiplies every strength)."""
    from ..attach import attach

    handle = attach(pipe.unet, styles) if styles else None
    rows = []
    try:
        for p_index, prompt in enumerate(args.prompt):
            for seed in range(args.seed, args.seed + args.num_images):
                row = []
                for factor in grid if grid is not None else [1.0]:
                    for i, (_, strength) in enumerate(styles):
                        handle.set_strength(strength * factor, index=i)
                    image = _generate(pipe, args, prompt, seed, device)
                    stem = f"{p_index:02d}-{_slug(prompt)}-seed{seed}" + (f"-x{factor:g}" if grid else "")
                    path = _free_name(output, stem, taken)
                    info = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed,
                            "steps": args.steps, "guidance": args.guidance, "model": args.model,
                            "hypernetworks": [[f, s * factor] for f, (_, s) in zip(files, styles)]}
                    _write_png(image, path, info)
                    print(f"wrote {path}")
                    row.append(image)
                rows.append(row)
    finally:
        if handle is not None:
            handle.remove()
    return rows


def _generate(pipe, args, prompt: str, seed: int, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(seed)
    return pipe(
        prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        guidance_scale=args.guidance, width=args.width, height=args.height, generator=generator,
    ).images[0]
