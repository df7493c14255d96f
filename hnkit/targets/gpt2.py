"""GPT-2: ``h.i.attn.c_attn`` is a fused Conv1D (weight stored in x out) laid out [Q | K | V]."""

import torch

from .base import Target, fused_qkv_site, matching_modules, token_rows

MODEL_TYPES = ("gpt2",)


def _split(weight, bias):
    d = weight.shape[1] // 3
    return [(weight[:, i * d:(i + 1) * d].t(), bias[i * d:(i + 1) * d]) for i in range(3)]


def _merge(q, k, v):
    return torch.cat([q, k, v], dim=-1)


def _fold(attn):
    def fold(which, D, t):
        # out = x @ W + b with W of shape (in, 3d): K's or V's columns see x + D x + t.
        conv = attn.c_attn
        d = conv.weight.shape[1] // 3
        cols = slice((1 + which) * d, (2 + which) * d)
        w, b = conv.weight.detach().double().clone(), conv.bias.detach().double().clone()
        D, t = D.to(w.device), t.to(w.device)
        b[cols] += t @ w[:, cols]
        w[:, cols] += D.T @ w[:, cols]
        return [(conv, "weight", w.to(conv.weight.dtype)), (conv, "bias", b.to(conv.bias.dtype))]

    return fold


def target(model) -> Target:
    sites = [fused_qkv_site(key, attn, "c_attn", attn.c_attn.weight.shape[0], _split, _merge, _fold(attn))
             for key, attn in matching_modules(model, r"h\.\d+\.attn")]
    return Target("gpt2", sites, token_rows)
