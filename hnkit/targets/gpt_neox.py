"""GPT-NeoX (Pythia): ``layers.i.attention.query_key_value`` is a fused Linear whose output is
laid out per head as [q_h | k_h | v_h] (the model views it as (..., heads, 3 * head_dim))."""

import functools

import torch

from .base import fused_qkv_site, matching_modules

MODEL_TYPES = ("gpt_neox",)


def _split(heads, weight, bias):
    d = weight.shape[1]
    w = weight.view(heads, 3, -1, d)
    b = bias.view(heads, 3, -1) if bias is not None else None
    return [(w[:, i].reshape(-1, d), b[:, i].reshape(-1) if b is not None else None) for i in range(3)]


def _merge(heads, q, k, v):
    return torch.stack([t.unflatten(-1, (heads, -1)) for t in (q, k, v)], dim=-2).flatten(-3)


def sites(model):
    heads = model.config.num_attention_heads
    split, merge = functools.partial(_split, heads), functools.partial(_merge, heads)
    found = []
    for key, attn in matching_modules(model, r"layers\.\d+\.attention"):
        qkv = attn.query_key_value
        found.append(fused_qkv_site(key, attn, "query_key_value", qkv.in_features, split, merge))
    return found
