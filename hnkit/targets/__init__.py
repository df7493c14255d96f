"""Where the attention sites are, per model family: one small file each."""

from __future__ import annotations

from ..errors import HnkitError
from . import gpt2, gpt_neo, gpt_neox, gptj, llama, opt
from .base import Site

FAMILIES = {t: mod for mod in (gpt2, gpt_neo, gptj, gpt_neox, llama, opt) for t in mod.MODEL_TYPES}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def model_family(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        what = f"model type {model_type!r}" if model_type else f"model class {type(model).__name__}"
        raise HnkitError(f"unsupported {what}; supported families: {', '.join(supported_families())}")
    return model_type


def find_sites(model) -> tuple[str, list[Site]]:
    family = model_family(model)
    sites = FAMILIES[family].sites(model)
    if not sites:
        raise HnkitError(f"found no attention layers in this {family} model ({type(model).__name__})")
    return family, sites


def model_name(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
