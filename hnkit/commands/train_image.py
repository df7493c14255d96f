"""``hnkit train-image``: a hypernetwork for a Stable Diffusion UNet from a folder of captioned images."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from ..errors import HnkitError
from . import options as shared
from .options import MODULE, TEXTS, TRAINING

# option name -> (type, default, help). The YAML recipes use the same names with underscores.
# Defaults follow the SD web UI: batch 1, lr 1e-5, a shared [1, 2, 1] linear network keyed by width.
OPTIONS = {
    "model": (str, None, "diffusers Stable Diffusion pipeline: local folder or hub id (SD1.x, SD2.x, SDXL)"),
    "data": (str, None, "folder of images with captions (.txt beside each image, or metadata.jsonl)"),
    **shared.with_defaults(TRAINING, output="runs/image", batch_size=1, max_steps=2000, lr="1e-5",
                           eval_batches=4),
    "resolution": (int, 512, "images are resized (shorter side) and center-cropped to this square size"),
    "caption_field": (str, "text", "caption field of metadata.jsonl"),
    "template": (str, "filewords", "prompt templates, one per line ([name], [filewords]): a file, or "
                                   "filewords | style_filewords | subject_filewords"),
    "shuffle_tags": (bool, False, "shuffle the comma-separated tags of each caption every step"),
    "tag_dropout": (float, 0.0, "drop each tag with this probability every step"),
    "latent_sampling": (str, "once", "once (one VAE sample per image) | deterministic (the mean) | "
                                     "random (a new sample every step)"),
    "disk_cache": (bool, True, "keep encoded latents under $HNKIT_CACHE/image for the next run"),
    "val_fraction": (float, 0.0, "share of images held out for validation (0: evaluate on training images "
                                 "with fixed noise)"),
    "sample_every": (int, 0, "write preview images every N steps (0: off)"),
    "sample_prompts": (TEXTS, None, "prompts for previews (default: the first two captions)"),
    "sample_steps": (int, 20, "sampling steps per preview (DPM-Solver++)"),
    "sample_guidance": (float, 7.0, "classifier-free guidance scale of previews"),
    "save_pt": (bool, False, "also write NAME.pt in the SD web UI's format"),
    **MODULE,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_arguments(parser, OPTIONS)


def check_resolution(resolution: int) -> None:
    """SD's VAEs scale by 8; the UNet itself takes any latent size (diffusers pads its upsampling)."""
    if resolution < 8 or resolution % 8:
        raise HnkitError(f"--resolution {resolution}: must be a positive multiple of 8")


def split_images(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and held-out image indices; with no held-out share, evaluation uses the training images."""
    import torch

    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train, val = sorted(order[n_val:]), sorted(order[:n_val])
    return train, val or train


def images_fingerprint(records) -> str:
    """sha256 of what the run reads of its data: each image's name (relative to the folder) and
    size, and its caption (from a .txt file, metadata.jsonl or the name). No file times, no path:
    the same images at another path, or copied with new times, are the same data."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.name, r.path.stat().st_size, r.caption]).encode() + b"\n")
    return h.hexdigest()


def run(args: argparse.Namespace) -> Path:
    import torch
    from accelerate import PartialState

    from .. import Hypernetwork, load, save
    from ..image import ImageTask
    from ..image_data import read_image_folder, read_templates
    from ..sd_model import encode_images, load_sd
    from ..train_config import check_resume, config_options, task_options
    from ..trainer import Trainer

    o = shared.resolve_options(args, OPTIONS)  # defaults <- recipe YAML <- command line
    output = shared.check_output(o)
    module = shared.module_config(o)  # the network's options (and --save-pt) checked before anything loads
    check_resolution(o["resolution"])
    if not 0 <= o["val_fraction"] < 1:
        raise HnkitError(f"--val-fraction must be at least 0 and below 1, got {o['val_fraction']}")
    records = read_image_folder(o["data"], o["caption_field"])
    templates = read_templates(o["template"])
    config = shared.train_config(o, output)
    options = {**config_options(config), **task_options(o), "data_images": images_fingerprint(records),
               "template_lines": hashlib.sha256(json.dumps(templates).encode()).hexdigest()}  # recorded in checkpoints
    if o["resume"]:
        check_resume(o["resume"], options)  # refused before the model is loaded and the images encoded
    sd = load_sd(o["model"])
    images = encode_images(sd, records, o["resolution"], PartialState().device, disk_cache=o["disk_cache"])
    captions = {r.name: r.caption for r in records}
    captions = [captions[name] for name in images.names]
    if o["resume"]:
        hn = load(shared.checkpoint_file(Path(o["resume"])))  # the structure it was trained with
    else:
        torch.manual_seed(o["seed"])
        hn = Hypernetwork.for_model(sd.unet, module, name=o["name"])
        hn.extra["sd_checkpoint_name"] = Path(o["model"]).name  # shown by the web UI for .pt files
    train, val = split_images(len(images), o["val_fraction"], o["seed"])
    task = ImageTask(sd, hn, images, captions, name=o["name"], templates=templates, shuffle_tags=o["shuffle_tags"],
                     tag_dropout=o["tag_dropout"], latent_sampling=o["latent_sampling"], seed=o["seed"],
                     train_indices=train, eval_indices=val, resolution=o["resolution"],
                     sample_steps=o["sample_steps"], sample_guidance=o["sample_guidance"])
    task.sample_prompts = o["sample_prompts"] or list(dict.fromkeys(task.prompt(i) for i in train))[:2]
    trainer = Trainer(task, config, options)
    task.prepare(trainer.accelerator.device)
    if o["resume"]:
        trainer.resume(o["resume"])
    final = trainer.train()
    if trainer.accelerator.is_main_process:
        written = [final]
        if o["save_pt"]:
            written.append(save(hn, final.with_suffix(".pt"), format="a1111"))
        print(f"wrote {', '.join(map(str, written))}: {trainer.summary()}, {len(train)} images; "
              f"metrics, samples and loss.png in {output}")
    return final
