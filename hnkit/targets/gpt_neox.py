"""GPT-NeoX (Pythia): ``layers.i.attention.query_key_value`` is a fused Linear whose output is
laid out per head as [q_h | k_h | v_h] (the model views it as (..., heads, 3 * head_dim))."""

import functools

import torch

from .base import Target, fused_qkv_site, matching_modules, token_rows

MODEL_TYPES = ("gpt_neox",)


def _split(heads, weight, bias):
    d = weight.shape[1]
    w = weight.view(heads, 3, -1, d)
    b = bias.view(heads, 3, -1) if bias is not None else None
    return [(w[:, i].reshape(-1, d), b[:, i].reshape(-1) if b is not None else None) for i in range(3)]


def _merge(heads, q, k, v):
    return torch.stack([t.unflatten(-1, (heads, -1)) for t in (q, k, v)], dim=-2).flatten(-3)


def _fold(attn, heads):
    def fold(which, D, t):
        # K's or V's rows of each head see x + D x + t.
        qkv = attn.query_key_value
        w = qkv.weight.detach().double().clone()
        b = qkv.bias.detach().double().clone() if qkv.bias is not None else w.new_zeros(w.shape[0])
        D, t = D.to(w.device), t.to(w.device)
        wv, bv = w.view(heads, 3, -1, w.shape[1]), b.view(heads, 3, -1)
        rows = wv[:, 1 + which]
        bv[:, 1 + which] += rows @ t
        wv[:, 1 + which] = rows + rows @ D
        return [(qkv, "weight", w.to(qkv.weight.dtype)), (qkv, "bias", b.to(qkv.weight.dtype))]

    return fold


def target(model) -> Target:
    heads = model.config.num_attention_heads
    split, merge = functools.partial(_split, heads), functools.partial(_merge, heads)
    sites = []
    for key, attn in matching_modules(model, r"layers\.\d+\.attention"):
        qkv = attn.query_key_value
        sites.append(fused_qkv_site(key, attn, "query_key_value", qkv.in_features, split, merge, _fold(attn, heads)))
    return Target("gpt_neox", sites, token_rows)
