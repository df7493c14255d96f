"""Llama, Mistral, Qwen2: ``layers.i.self_attn`` with ``k_proj`` / ``v_proj``. With grouped-query
attention K and V are narrower than the model, but their input is still the hidden state."""

from .base import separate_kv_sites

MODEL_TYPES = ("llama", "mistral", "qwen2")


def sites(model):
    return separate_kv_sites(model, r"layers\.\d+\.self_attn")
