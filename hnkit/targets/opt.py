"""OPT: ``decoder.layers.i.self_attn`` with ``k_proj`` / ``v_proj``."""

from .base import Target, separate_kv_sites, token_rows

MODEL_TYPES = ("opt",)


def target(model) -> Target:
    return Target(model.config.model_type, separate_kv_sites(model, r"layers\.\d+\.self_attn"), token_rows)
