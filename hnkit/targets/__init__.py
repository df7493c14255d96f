"""Where the attention sites are, per model family: one row of a table for transformers' causal LMs
(hnkit.targets.causal_lm), a file of its own for the SD UNet (hnkit.targets.unet); each gives
``target(model) -> Target`` (hnkit.targets.base)."""

from __future__ import annotations

from ..errors import HnkitError
from . import causal_lm, unet
from .base import Site, Target


def supported_families() -> list[str]:
    return sorted([*causal_lm.FAMILIES, unet.FAMILY])


def model_family(model) -> str:
    if unet.is_unet(model):  # diffusers models have no config.model_type
        return unet.FAMILY
    if unet.is_pipeline(model):
        raise HnkitError(f"got a {type(model).__name__}, not a model: attach to its UNet (pipe.unet)")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in causal_lm.FAMILIES:
        what = f"model type {model_type!r}" if model_type else f"model class {type(model).__name__}"
        raise HnkitError(f"unsupported {what}; supported families: {', '.join(supported_families())}")
    return model_type


def find_target(model) -> Target:
    family = model_family(model)
    target = unet.target(model) if family == unet.FAMILY else causal_lm.target(model)
    if not target.sites:
        raise HnkitError(f"found no attention layers in this {family} model ({type(model).__name__})")
    return target


def find_sites(model) -> tuple[str, list[Site]]:
    target = find_target(model)
    return target.family, target.sites


def model_name(model) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None  # diffusers keeps a Path when loaded from one
