"""GPT-J: ``h.i.attn`` with separate ``k_proj`` / ``v_proj`` (the block passes hidden_states by
keyword to the attention module; the projections themselves get it positionally)."""

from .base import separate_kv_sites

MODEL_TYPES = ("gptj",)


def sites(model):
    return separate_kv_sites(model, r"h\.\d+\.attn")
