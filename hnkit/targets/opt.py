"""OPT: ``decoder.layers.i.self_attn`` with ``k_proj`` / ``v_proj``."""

from .base import separate_kv_sites

MODEL_TYPES = ("opt",)


def sites(model):
    return separate_kv_sites(model, r"layers\.\d+\.self_attn")
