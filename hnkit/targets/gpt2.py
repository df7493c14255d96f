"""GPT-2: ``h.i.attn.c_attn`` is a fused Conv1D (weight stored in x out) laid out [Q | K | V]."""

import torch

from .base import fused_qkv_site, matching_modules

MODEL_TYPES = ("gpt2",)


def _split(weight, bias):
    d = weight.shape[1] // 3
    return [(weight[:, i * d:(i + 1) * d].t(), bias[i * d:(i + 1) * d]) for i in range(3)]


def _merge(q, k, v):
    return torch.cat([q, k, v], dim=-1)


def sites(model):
    found = []
    for key, attn in matching_modules(model, r"h\.\d+\.attn"):
        found.append(fused_qkv_site(key, attn, "c_attn", attn.c_attn.weight.shape[0], _split, _merge))
    return found
