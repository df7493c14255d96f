"""A LoRA of a hypernetwork as a PEFT adapter folder (``adapter_config.json``,
``adapter_model.safetensors``), which PEFT, vLLM, LoRAX and TGI read (see :mod:`hnkit.export` for
what the factors are and which networks export exactly).

The constant term is ``lora_B.bias`` (``LoraConfig(lora_bias=True)``), written only where some term
is nonzero; every module gets one rank (zeros pad the smaller), not PEFT's ``rank_pattern``, so that
servers which take one ``--max-lora-rank`` load it. The folder is written beside the output and
renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import HnkitError
from .export import WHICH, LoraFactors, pad
from .targets import causal_lm
from .util import _umask


def peft_modules(factors: LoraFactors, bias: bool = True) -> dict:
    """``{module name: (A, B, bias or None)}``: one LoRA per targeted module. A fused QKV projection gets
    K's and V's factors side by side (rank r_k + r_v), Q's rows of B zero."""
    modules = {}
    for i, per in factors.layers.items():
        names, rows = factors.module_names[i], factors.fused_rows.get(i)
        if rows is None:
            modules.update({names[w]: per[w] for w in WHICH})
            continue
        (ak, bk, ck), (av, bv, cv) = per["k"], per["v"]
        b = bk.new_zeros(factors.fused_out[i], ak.shape[0] + av.shape[0])
        b[rows["k"], :ak.shape[0]], b[rows["v"], ak.shape[0]:] = bk, bv
        c = None
        if ck is not None or cv is not None:
            c = bk.new_zeros(factors.fused_out[i])
            c[rows["k"]] = ck if ck is not None else 0
            c[rows["v"]] = cv if cv is not None else 0
        modules[names["k"]] = (torch.cat([ak, av]), b, c)
    if not bias:
        modules = {name: (a, b, None) for name, (a, b, _) in modules.items()}
    return modules


def has_bias(modules: dict) -> bool:
    return any(c is not None and bool(c.abs().max() > 0) for _, _, c in modules.values())


def peft_config(factors: LoraFactors, modules: dict, base_model: str | None, rank: int):
    from peft import LoraConfig

    names = list(modules)
    # the names' last parts (k_proj, v_proj) where every attention layer is exported, the full names otherwise
    every_layer = len(factors.layers) == factors.num_layers
    targets = sorted({name.rsplit(".", 1)[-1] for name in names}) if every_layer else names
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none",
                      lora_bias=has_bias(modules), task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                      fan_in_fan_out=causal_lm.FAMILIES[factors.family].conv1d, inference_mode=True)


def peft_tensors(modules: dict) -> dict:
    """PEFT's key names for the factors (``base_model.model.<module>.lora_A.weight``, ...)."""
    tensors = {}
    for name, (a, b, c) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        if c is not None:
            tensors[f"base_model.model.{name}.lora_B.bias"] = c.contiguous()
    return tensors


def check_output_folder(output, force: bool) -> Path:
    """An adapter folder may be written to ``output``: new, empty, or (``force``) replaced."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise HnkitError(f"{out}: is a file; an adapter is a folder, name a new one")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise HnkitError(f"{out}: already exists and is not empty; choose another folder or add --force to replace it")
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise HnkitError(f"{out}: cannot write there ({folder} is not a writable folder)")
    return out


def write_peft(factors: LoraFactors, output, *, base_model: str | None = None, bias: bool = True,
               force: bool = False) -> Path:
    """A PEFT LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``) of ``factors``, written
    beside ``output`` and renamed into place; nothing replaced without ``force``. ``bias=False`` drops the
    constant term. Returns the folder."""
    from safetensors.torch import save_file

    out = check_output_folder(output, force)
    modules = peft_modules(factors, bias)
    rank = max(a.shape[0] for a, _, _ in modules.values())
    modules = {name: (*pad(a, b, rank), c) for name, (a, b, c) in modules.items()}
    config = peft_config(factors, modules, base_model, rank)
    if not config.lora_bias:
        modules = {name: (a, b, None) for name, (a, b, _) in modules.items()}

    def fill(folder: Path) -> None:
        config.save_pretrained(str(folder))
        save_file(peft_tensors(modules), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    return replace_folder(out, fill)


def replace_folder(out: Path, fill) -> Path:
    """``fill(folder)`` on a new folder beside ``out``, then renamed to ``out`` (an old ``out`` moved aside
    first and removed after): a reader sees the old folder or the new one, never half of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "replaced")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old / "replaced", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out

