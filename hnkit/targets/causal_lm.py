"""Causal LMs from transformers: the facts about each family's attention layers are one row of
``FAMILIES``, keyed by ``config.model_type``.

A row names the attention modules (a regex for the tail of their names, which is also the site's
key, so a base model and its LM-head wrapper give the same keys) and either their separate K and V
projections (``nn.Linear``, each fed the hidden state: a forward pre-hook each) or their fused QKV
projection (swapped for :class:`~hnkit.targets.base.FusedQKV` while attached). A site's width is the
projection's input width, read from the module itself. Where Q, K and V lie among a fused
projection's outputs follows from the row's ``layout`` and the config's head counts:

- ``"blocks"``: [Q | K | V], Q of ``num_attention_heads`` heads, K and V of ``num_key_value_heads``
  (grouped-query attention) or as many as Q;
- ``"per_head"``: per head [q_h | k_h | v_h] (the model views the output as (..., heads, 3 * head_dim)).

With grouped-query attention K and V are narrower than the model, but their input is still the
hidden state; a norm after K (Qwen3's ``k_norm``) sees the projection's output and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HnkitError
from .base import QKVLayout, Target, fused_qkv_site, matching_modules, separate_kv_sites, token_rows


@dataclass(frozen=True)
class Family:
    attention: str  # regex for the tail of the attention modules' names
    k: str = "k_proj"  # separate K and V projections ...
    v: str = "v_proj"
    qkv: str | None = None  # ... or the name of a fused QKV projection,
    layout: str = "blocks"  # where Q, K, V lie among its outputs ("blocks" or "per_head"),
    conv1d: bool = False  # its weight stored (in, out), as by transformers' Conv1D


SELF_ATTN = r"layers\.\d+\.self_attn"

FAMILIES = {
    "gpt2": Family(r"h\.\d+\.attn", qkv="c_attn", conv1d=True),
    "gpt_neo": Family(r"h\.\d+\.attn\.attention"),
    "gptj": Family(r"h\.\d+\.attn"),  # the block passes the hidden state by keyword; k/v_proj get it positionally
    "gpt_neox": Family(r"layers\.\d+\.attention", qkv="query_key_value", layout="per_head"),
    "llama": Family(SELF_ATTN),
    "mistral": Family(SELF_ATTN),
    "qwen2": Family(SELF_ATTN),
    "qwen3": Family(SELF_ATTN),
    "gemma": Family(SELF_ATTN),
    "gemma2": Family(SELF_ATTN),
    "opt": Family(SELF_ATTN),  # model.decoder.layers.i.self_attn
    "phi3": Family(SELF_ATTN, qkv="qkv_proj"),
}


def qkv_layout(family: Family, config, key: str, proj) -> QKVLayout:
    out = proj.weight.shape[1 if family.conv1d else 0]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if family.layout == "per_head":
        groups, units = heads, (1, 1, 1)
    else:
        groups, units = 1, (heads, kv_heads, kv_heads)
    head_dim = out // (groups * sum(units))
    if head_dim * groups * sum(units) != out:
        raise HnkitError(f"{key}.{family.qkv} has {out} outputs, which do not split into Q, K and V "
                         f"of {heads} and {kv_heads} heads ({type(config).__name__})")
    return QKVLayout(groups, tuple(u * head_dim for u in units), family.conv1d)


def target(model) -> Target:
    config = model.config
    family = FAMILIES[config.model_type]
    if family.qkv is None:
        sites = separate_kv_sites(model, family.attention, family.k, family.v)
    else:
        sites = [fused_qkv_site(key, attn, family.qkv, qkv_layout(family, config, key, getattr(attn, family.qkv)))
                 for key, attn in matching_modules(model, family.attention)]
    return Target(config.model_type, sites, token_rows)
