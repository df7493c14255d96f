"""Stable Diffusion UNet (diffusers ``UNet2DConditionModel``: SD 1.x, SD 2.x, SDXL).

Sites are the ``Attention`` modules of the transformer blocks, ``...transformer_blocks.j.attn1``
(self-attention) and ``...attn2`` (cross-attention), with separate ``to_k`` / ``to_v`` projections.
diffusers' processors call ``attn.to_k(context)`` and ``attn.to_v(context)`` with the tensor alone,
where ``context`` is the hidden state for attn1 and the text embeddings for attn2: exactly the
tensor the web UI feeds its hypernetwork (``k = to_k(hn_k(context))``), so a forward pre-hook on
each projection is all it takes, whatever processor diffusers installs.

Facts for the per-pass machinery (hnkit.passes): every attn2 is fed the ``encoder_hidden_states``
of the UNet call (``context``), and a site's K/V input has at most ``batch * height * width`` rows
of the latent (the self-attention sites of the first level; lower levels have fewer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import HnkitError
from .base import Target, matching_modules, separate_kv_site

FAMILY = "sd_unet"

# The transformer blocks of down, mid and up blocks; the key is this tail of the module name.
_SITE_PATTERN = r"(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]"


def is_unet(model) -> bool:
    """A diffusers UNet: it has no ``config.model_type``, so it is recognised by its block layout."""
    return isinstance(model, nn.Module) and all(
        isinstance(getattr(model, name, None), nn.Module) for name in ("down_blocks", "up_blocks", "mid_block"))


def is_pipeline(obj) -> bool:
    """A diffusers pipeline (not a module itself) that holds a UNet: attach to ``pipe.unet``."""
    return not isinstance(obj, nn.Module) and is_unet(getattr(obj, "unet", None))


def _rows(args: tuple, kwargs: dict) -> int:
    sample = kwargs.get("sample", args[0] if args else None)
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        return 0
    batch, _, height, width = sample.shape
    return batch * height * width


def _context(args: tuple, kwargs: dict) -> torch.Tensor | None:
    context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    return context if isinstance(context, torch.Tensor) else None


def target(model) -> Target:
    sites = []
    for key, attn in matching_modules(model, _SITE_PATTERN):
        if getattr(attn, "fused_projections", False):
            raise HnkitError(f"{key} has fused QKV projections (fuse_qkv_projections()); hypernetworks need "
                             "separate to_k/to_v: call unet.unfuse_qkv_projections() first")
        cross = bool(getattr(attn, "is_cross_attention", False))
        sites.append(separate_kv_site(key, attn.to_k, attn.to_v, attn.to_k.in_features, context=cross))
    return Target(FAMILY, sites, _rows, _context)
