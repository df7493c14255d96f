"""GPT-Neo: ``h.i.attn.attention`` with separate ``k_proj`` / ``v_proj``."""

from .base import Target, separate_kv_sites, token_rows

MODEL_TYPES = ("gpt_neo",)


def target(model) -> Target:
    return Target(model.config.model_type, separate_kv_sites(model, r"h\.\d+\.attn\.attention"), token_rows)
