"""A hypernetwork's low-rank K/V factors as a llama.cpp LoRA adapter (GGUF), for the GGUF base model.

The layout is the one llama.cpp's own ``convert_lora_to_gguf.py`` writes and ``src/llama-adapter.cpp``
reads:

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` and
  ``general.architecture``, which must equal the base model's (llama.cpp refuses a mismatch);
- per adapted weight ``W`` of the base (``blk.{i}.attn_k.weight``, ``blk.{i}.attn_v.weight``) two
  tensors ``W.lora_a`` (numpy shape ``[r, D_in]``, ggml ne ``[D_in, r]``) and ``W.lora_b`` (numpy
  ``[D_out, r]``); llama.cpp adds ``scale * B (A x)`` to ``W x`` with ``scale = lora_scale * alpha / r``.
  We write ``alpha = r``, so llama.cpp's LoRA scale is hnkit's strength.
- llama.cpp's llama converter reorders the rows of ``attn_q``/``attn_k`` inside each head (its
  ``LlamaModel.permute``, for its rotary embedding); a LoRA ``B`` of ``attn_k`` gets the same order
  (the converter applies the permute to ``lora_b``). Qwen2/3 and Gemma(2) keep Hugging Face's order.
- There is no bias: the loader accepts only ``.lora_a``/``.lora_b`` tensors (and ignores norms), so a
  constant term ``W c`` cannot be carried. ``bias="error"`` refuses a network with one,
  ``bias="drop"`` leaves it out and marks the file ``hnkit.exact = false``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import HnkitError, first_line

# hnkit family -> (llama.cpp architecture, whether its converter permutes attn_k rows per head).
# Only families whose K and V are separate tensors in llama.cpp (fused QKV ones are not mapped).
ARCHS = {
    "llama": ("llama", True),
    "mistral": ("llama", True),  # HF MistralForCausalLM converts as LlamaModel, arch "llama"
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "gemma": ("gemma", False),
    "gemma2": ("gemma2", False),
}
TENSORS = {"k": "blk.{}.attn_k.weight", "v": "blk.{}.attn_v.weight"}


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise HnkitError("--format gguf needs the gguf package: pip install 'hnkit[export]' (or pip install gguf)") from None
    return gguf


def has_bias(factors) -> bool:
    """Whether any K/V factor carries a nonzero constant term (which a llama.cpp LoRA cannot hold)."""
    return any(f[2] is not None and bool(f[2].any()) for sites in factors.layers.values() for f in sites.values())


def check_family(family: str) -> tuple[str, bool]:
    if family == "sd_unet":
        raise HnkitError("--format gguf: Stable Diffusion UNet styles cannot be exported for llama.cpp, "
                         "which runs language models")
    if family not in ARCHS:
        raise HnkitError(f"--format gguf: no llama.cpp LoRA layout for the {family} family (its K/V are not "
                         f"separate tensors in llama.cpp, or hnkit does not map them); supported: {', '.join(ARCHS)}")
    return ARCHS[family]


def rope_permute(b: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of ``b`` in llama.cpp's order for attn_k: per head, [0, h/2, 1, h/2+1, ...] (its ``permute``)."""
    rows = b.shape[0]
    if head_dim % 2 or rows % head_dim:
        raise HnkitError(f"--format gguf: K has {rows} outputs, which do not split into heads of {head_dim}")
    return b.reshape(rows // head_dim, 2, head_dim // 2, -1).transpose(1, 2).reshape(b.shape)


def read_base(base_gguf: Path, arch: str) -> dict:
    """Shapes of the base's K/V weights (ggml order) and its K head size, checking its architecture."""
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(base_gguf)
        fields = {k: reader.fields[k].contents() for k in reader.fields
                  if k == "general.architecture" or k.startswith(f"{arch}.attention.")}
        shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors
                  if t.name.endswith((".attn_k.weight", ".attn_v.weight"))}
    except Exception as e:  # a damaged or foreign file: gguf raises ValueError, struct and numpy errors
        raise HnkitError(f"--base-gguf {base_gguf}: not a readable GGUF file ({first_line(e)})") from None
    if fields.get("general.architecture") != arch:
        raise HnkitError(f"--base-gguf {base_gguf}: a {fields.get('general.architecture')!r} model, but this "
                         f"network is for llama.cpp architecture {arch!r}")
    kv_heads = fields.get(f"{arch}.attention.head_count_kv") or fields.get(f"{arch}.attention.head_count")
    k0 = shapes.get(TENSORS["k"].format(0))
    head_dim = fields.get(f"{arch}.attention.key_length") or (k0[1] // kv_heads if k0 and kv_heads else None)
    return {"shapes": shapes, "head_dim": head_dim}


def adapter_tensors(factors, permute: bool, head_dim: int | None, shapes: dict | None) -> dict:
    """``{gguf name: float32 array}`` for every K/V factor, checked against the base where known."""
    if permute and not head_dim:
        raise HnkitError("--format gguf: this family's K rows are reordered per head in llama.cpp; "
                         "give the base GGUF (--base-gguf) or the model's head size")
    out = {}
    for layer, sites in sorted(factors.layers.items()):
        for kind, (a, b, _bias) in sorted(sites.items()):
            if kind not in TENSORS:
                raise HnkitError(f"--format gguf: layer {layer} has a {kind!r} factor; only 'k' and 'v' map to llama.cpp")
            name = TENSORS[kind].format(int(layer))
            a, b = a.detach().float().cpu(), b.detach().float().cpu()
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
                raise HnkitError(f"--format gguf: {name}: factors of shapes {tuple(a.shape)} and {tuple(b.shape)} "
                                 "are not A [r, D_in] and B [D_out, r]")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise HnkitError(f"--format gguf: {name}: the factors hold NaN or infinite values")
            if shapes is not None and shapes.get(name) != (a.shape[1], b.shape[0]):
                raise HnkitError(f"--base-gguf: {name} is {shapes.get(name)} there, but this network's factors "
                                 f"need ({a.shape[1]}, {b.shape[0]}): not the base this network was trained on")
            if kind == "k" and permute:
                b = rope_permute(b, head_dim)
            # llama.cpp scales by alpha / r with r this tensor's rank: keep the product B A exact
            b = b * (a.shape[0] / factors.rank)
            out[name + ".lora_a"] = a.contiguous().numpy()
            out[name + ".lora_b"] = b.contiguous().numpy()
    if not out:
        raise HnkitError("--format gguf: the network has no K/V factors to export")
    return out


def write_gguf(factors, output: Path, *, base_gguf: Path | None = None, name: str = "",
               bias: str = "error", head_dim: int | None = None) -> Path:
    """Write ``factors`` (:class:`hnkit.export.LoraFactors`) as a llama.cpp LoRA adapter at ``output``.

    ``base_gguf``: the base model's GGUF, to check the architecture and the K/V shapes and to read the
    head size. ``head_dim``: the head size where no base GGUF is given (needed for llama and mistral).
    ``bias``: ``"error"`` refuses a nonzero constant term, ``"drop"`` leaves it out (approximate)."""
    gguf = import_gguf()
    if bias not in ("error", "drop"):
        raise ValueError(f"bias must be 'error' or 'drop', not {bias!r}")
    if int(factors.rank) < 1:
        raise HnkitError(f"--format gguf: rank {factors.rank}: a LoRA adapter needs a rank of at least 1")
    arch, permute = check_family(factors.family)
    dropped = has_bias(factors)
    if dropped and bias == "error":
        raise HnkitError("--format gguf: this network adds a constant term (bias) to K/V, which a llama.cpp "
                         "LoRA adapter cannot hold; pass --no-bias to drop it (the export is then approximate)")
    base = read_base(Path(base_gguf), arch) if base_gguf is not None else None
    tensors = adapter_tensors(factors, permute, (base or {}).get("head_dim") or head_dim,
                              base["shapes"] if base else None)
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(factors.rank))
    if name:
        writer.add_name(name)
    writer.add_bool("hnkit.exact", bool(factors.exact) and not dropped)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    try:
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, output)
    except OSError as e:
        raise HnkitError(f"--output {output}: cannot write it ({e.strerror or first_line(e)})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return output
