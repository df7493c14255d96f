"""GPT-J: ``h.i.attn`` with separate ``k_proj`` / ``v_proj`` (the block passes hidden_states by
keyword to the attention module; the projections themselves get it positionally)."""

from .base import Target, separate_kv_sites, token_rows

MODEL_TYPES = ("gptj",)


def target(model) -> Target:
    return Target(model.config.model_type, separate_kv_sites(model, r"h\.\d+\.attn"), token_rows)
