"""The image task's data: a folder of images with captions, and the prompts made from them.

    image folder -> (file, caption) records (``.txt`` sidecars, ``metadata.jsonl`` or the file name)
    file -> RGB pixels resized and center-cropped to the training resolution
    caption -> prompt template (``[name]``, ``[filewords]``), tag dropout and shuffling

No model here: :mod:`hnkit.sd_model` encodes what this module reads.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HnkitError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEMPLATES = Path(__file__).parent / "templates"


# -- data --------------------------------------------------------------------------------------
@dataclass
class ImageRecord:
    path: Path
    name: str  # path relative to the data folder, for messages
    caption: str


def caption_from_name(path: Path) -> str:
    """The web UI's caption for an image without one: the file name without its extension and
    without a leading run of digits and dashes ("00012-a red fox.png" -> "a red fox")."""
    return re.sub(r"^[-\d]+\s*", "", path.stem)


def read_image_folder(data: str | os.PathLike, caption_field: str = "text") -> list[ImageRecord]:
    """Every image under ``data`` (sorted), captioned from ``metadata.jsonl`` (``file_name`` and
    ``caption_field``), else from a ``.txt`` file of the same stem beside it, else from its name."""
    folder = Path(data)
    if not folder.exists():
        raise HnkitError(f"{data}: no such folder")
    if not folder.is_dir():
        raise HnkitError(f"{data}: not a folder (--data takes a folder of images with captions)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise HnkitError(f"{data}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
    captions = _metadata_captions(folder, caption_field)
    records = []
    for f in files:
        rel = f.relative_to(folder).as_posix()
        if rel in captions:
            caption = captions[rel]
        elif f.with_suffix(".txt").is_file():
            caption = f.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
        else:
            caption = caption_from_name(f)
        records.append(ImageRecord(f, rel, caption))
    for rel in sorted(set(captions) - {r.name for r in records}):
        warn(f"{folder / 'metadata.jsonl'}: {rel} is listed but is not an image in the folder; skipped")
    return records


def warn(message: str) -> None:
    """A warning for the user: one line on stderr (from the main process only)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"hnkit: warning: {message}", file=sys.stderr)


def _metadata_captions(folder: Path, caption_field: str) -> dict[str, str]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    from datasets import load_dataset

    try:
        ds = load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises several types for malformed JSON
        raise HnkitError(f"{path}: unreadable JSON lines ({first_line(exc)})") from None
    for column in ("file_name", caption_field):
        if column not in ds.column_names:
            raise HnkitError(f"{path}: no {column!r} field (fields: {', '.join(ds.column_names)})")
    return {Path(f).as_posix(): str(t or "").strip() for f, t in zip(ds["file_name"], ds[caption_field])}


def load_image(path: Path, resolution: int):
    """RGB pixels in [-1, 1], shape (3, r, r): the shorter side resized to ``resolution``, then a
    center crop. Also returns SDXL's size conditioning: (original h, w, crop top, left)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, (h, w, top, left)


# -- captions ----------------------------------------------------------------------------------
def read_templates(spec: str) -> list[str]:
    """Prompt templates, one per line: a file, or the name of one that ships with hnkit
    (``filewords``, ``style_filewords``, ``subject_filewords``)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        shipped = TEMPLATES / f"{spec}.txt"
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.txt")))
            raise HnkitError(f"{spec}: no such template file (or shipped template: {names})")
        path = shipped
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise HnkitError(f"{spec}: the template file has no templates")
    return lines


def process_tags(caption: str, shuffle: bool, dropout: float, generator: torch.Generator) -> str:
    """Comma-separated tags, each dropped with probability ``dropout``, then shuffled."""
    if not shuffle and not dropout:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if dropout:
        keep = torch.rand(len(tags), generator=generator) >= dropout
        tags = [t for t, k in zip(tags, keep.tolist()) if k]
    if shuffle:
        tags = [tags[i] for i in torch.randperm(len(tags), generator=generator).tolist()]
    return ", ".join(tags)


def render_prompt(template: str, caption: str, name: str) -> str:
    """``[name]`` -> the hypernetwork's name, ``[filewords]`` -> the caption."""
    return template.replace("[name]", name).replace("[filewords]", caption)
