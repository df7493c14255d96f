"""Llama, Mistral, Qwen2: ``layers.i.self_attn`` with ``k_proj`` / ``v_proj``. With grouped-query
attention K and V are narrower than the model, but their input is still the hidden state."""

from .base import Target, separate_kv_sites, token_rows

MODEL_TYPES = ("llama", "mistral", "qwen2")


def target(model) -> Target:
    return Target(model.config.model_type, separate_kv_sites(model, r"layers\.\d+\.self_attn"), token_rows)
