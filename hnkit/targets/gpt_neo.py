"""GPT-Neo: ``h.i.attn.attention`` with separate ``k_proj`` / ``v_proj``."""

from .base import separate_kv_sites

MODEL_TYPES = ("gpt_neo",)


def sites(model):
    return separate_kv_sites(model, r"h\.\d+\.attn\.attention")
