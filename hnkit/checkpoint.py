"""Save and load hypernetworks: hnkit's ``.safetensors`` and the SD web UI's ``.pt``.

Native file: one ``.safetensors``; tensors are named ``<key>.<k|v>.<param>`` (``768.k.linear.0.weight``,
``layers.3.self_attn.v.linear.2.bias``; a low-rank module's ``768.k.down.weight``, ``768.k.up.weight``,
``768.k.up.bias``: :mod:`hnkit.forms`) and the header's metadata holds one entry, ``"hnkit"``, a
JSON object: format version, key list, module config (with ``form`` and ``rank`` for a form other
than "mlp"), target family, base model, step, ...

Web UI file: a ``torch.save``d dict, integer widths -> ``(k_state_dict, v_state_dict)``, plus the
metadata keys listed in docs/design.md. It is a pickle, so it is only ever read with
``torch.load(weights_only=True)``; a file that needs anything more is refused.

Optimizer sidecar: the web UI keeps an optimizer's state beside ``x.pt`` in ``x.pt.optim``, a dict
``{'optimizer_name', 'hash', 'optimizer_state_dict'}`` whose ``hash`` is the first 10 hex digits
of the SHA-256 of ``x.pt`` (so a stale sidecar is recognised). ``load`` reads it (weights_only,
like the ``.pt``) into ``hn.optimizer_state``; saving a ``.pt`` writes it back with the new file's hash.

Every write is atomic (:func:`hnkit.util.atomic_write`): a temporary file in the same folder, fsync,
then rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .compat import warn_if_not_portable
from .errors import HnkitError, HnkitWarning, first_line
from .forms import FORMS
from .hypernetwork import MAX_SITE_KEYS, MAX_WIDTH_KEYS, Hypernetwork, HypernetworkConfig
from .safe_load import load_plain, parse_metadata
from .util import atomic_write

FORMAT_VERSION = 1
A1111_SUFFIXES = (".pt", ".pth", ".ckpt")  # read as the web UI's format
WRITE_SUFFIXES = {".safetensors": "hnkit", ".pt": "a1111", ".pth": "a1111"}  # the format a file is written in
# hnkit's facts about a network that the web UI's dict has no field for, kept under keys it ignores
_A1111_HNKIT = ("family", "base_model", "base_model_hash", "description")
_A1111_EXTRA = ("sd_checkpoint", "sd_checkpoint_name", "optional_info")


# -- save ----------------------------------------------------------------------------------------
def save(hn: Hypernetwork, path: str | os.PathLike, format: str | None = None) -> Path:
    """Write ``hn`` to ``path``: ``format="hnkit"`` (``.safetensors``) or ``"a1111"`` (the web UI's
    ``.pt``). Without ``format`` the suffix decides (``.pt``/``.pth``/``.ckpt`` mean a1111)."""
    path = Path(path)
    if not isinstance(hn, Hypernetwork):
        raise HnkitError(f"{path}: save() writes a Hypernetwork, got a {type(hn).__name__} (a Stack is a "
                         "serving copy: save the networks it was made from)")
    by_suffix = WRITE_SUFFIXES.get(path.suffix)
    if by_suffix is None:
        raise HnkitError(f"{path}: unknown extension {path.suffix or '(none)'}; use .safetensors (hnkit's format) "
                         "or .pt (the web UI's)")
    if format not in (None, by_suffix) and format in ("hnkit", "a1111"):
        raise HnkitError(f"{path}: format {format!r} does not match the extension {path.suffix} ({by_suffix}); "
                         "use .safetensors for hnkit, .pt for a1111")
    format = format or by_suffix
    if format == "a1111":
        data = to_a1111(hn, path)
        state = _sidecar_state(hn, path)  # checked before anything is written
        buffer = io.BytesIO()
        torch.save(data, buffer)
        blob = buffer.getvalue()
        atomic_write(path, lambda f: f.write(blob))
        warn_if_not_portable(path, data)  # one line where the web UI or ComfyUI will not load it as is
        if state is not None:
            # Written after the .pt: a crash in between leaves an old sidecar whose hash no longer
            # matches, which readers (hnkit and the web UI) ignore.
            state = {**state, "hash": _short_hash(blob)}
            atomic_write(optim_sidecar(path), lambda f: torch.save(state, f))
    elif format == "hnkit":
        blob = st_save(_tensors(hn), metadata={"hnkit": json.dumps(_metadata(hn))})
        atomic_write(path, lambda f: f.write(blob))
    else:
        raise HnkitError(f"{path}: unknown format {format!r}; use 'hnkit' or 'a1111'")
    return path


def _tensors(hn: Hypernetwork) -> dict:
    out = {}
    for key in hn.keys():
        for tag, module in zip("kv", hn[key]):
            for name, t in module.state_dict().items():
                out[f"{key}.{tag}.{name}"] = t.detach().cpu().contiguous()
    return out


def _metadata(hn: Hypernetwork) -> dict:
    return {
        "format": "hnkit.hypernetwork",
        "format_version": FORMAT_VERSION,
        "name": hn.name,
        "step": hn.step,
        "keyed_by": hn.keyed_by,
        "keys": hn.keys(),
        "widths": [hn.width_of(k) for k in hn.keys()],
        "config": hn.config.to_dict(),
        "family": hn.family,
        "base_model": hn.base_model,
        "base_model_hash": hn.base_model_hash,
        "description": hn.description,
        "extra": hn.extra,
    }


def to_a1111(hn: Hypernetwork, path: Path | str = "hypernetwork.pt") -> dict:
    """The dict the web UI itself would ``torch.save`` for this network. A linear network's
    ``activation_func`` is ``"linear"``, as the web UI's create tab writes it (ComfyUI refuses
    ``None``); reading ``None`` still works, so a file that had it is written back with ``"linear"``."""
    c = hn.config
    if not FORMS[c.form].webui_format:
        raise HnkitError(f"{path}: a {c.form!r} hypernetwork cannot be written as a web UI .pt (the web UI knows "
                         f"only the MLP form); save it as {Path(path).with_suffix('.safetensors').name}")
    if c.per_site:
        raise HnkitError(f"{path}: a per-site hypernetwork cannot be written as a web UI .pt (it is keyed by width)")
    data: dict = {key: (hn[key][0].state_dict(), hn[key][1].state_dict()) for key in hn.keys()}
    data.update({
        "step": hn.step,
        "name": hn.name,
        "layer_structure": list(c.layer_structure),
        "activation_func": c.activation or "linear",
        "is_layer_norm": c.layer_norm,
        "weight_initialization": c.weight_init,
        "sd_checkpoint": hn.extra.get("sd_checkpoint"),
        "sd_checkpoint_name": hn.extra.get("sd_checkpoint_name"),
        "activate_output": c.activate_output,
        "use_dropout": c.use_dropout,
        "dropout_structure": list(c.dropout_structure),
        "last_layer_dropout": c.dropout_structure[-2] != 0,
        "optional_info": hn.extra.get("optional_info") or None,
    })
    data.update({f"hnkit_{attr}": getattr(hn, attr) for attr in _A1111_HNKIT if getattr(hn, attr)})
    return data


# -- load ----------------------------------------------------------------------------------------
def load(path: str | os.PathLike) -> Hypernetwork:
    """Read a hypernetwork from hnkit's ``.safetensors`` or the web UI's ``.pt``, in eval mode (no
    dropout: ready for inference, as the web UI uses it; call ``.train()`` to train it further)."""
    path = Path(path)
    if path.is_dir():
        raise HnkitError(f"{path}: is a directory, expected a hypernetwork file (.safetensors or .pt)")
    if not path.exists():
        raise HnkitError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise HnkitError(f"{path}: file is empty")
    if _looks_like_safetensors(head):
        return _load_safetensors(path).eval()
    if path.suffix == ".safetensors":
        raise HnkitError(f"{path}: corrupt safetensors file (bad header)")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a .pt is a zip archive, or a pickle (older torch)
        kind = "it holds text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "unknown format"
        raise HnkitError(f"{path}: corrupt or not a hypernetwork file (neither .pt nor .safetensors: {kind})")
    hn = from_a1111(_safe_load_pt(path), path)
    hn.optimizer_state = read_optim_sidecar(path)
    return hn.eval()


def _looks_like_safetensors(head: bytes) -> bool:
    n = int.from_bytes(head[:8], "little")
    return len(head) > 8 and head[8:9] == b"{" and 0 < n < 100_000_000


def _safe_load_pt(path: Path):
    try:
        return load_plain(path)
    except HnkitError:
        raise
    except pickle.UnpicklingError as exc:
        # The safe unpickler met something that is not tensors and plain data: code to run, or noise.
        detail = _unpickling_detail(exc)
        raise HnkitError(f"{path}: refused: not loadable as plain tensors and data with weights_only=True "
                         f"(it holds objects that would run code, or it is corrupt: {detail})") from None
    except Exception as exc:  # zip/stream errors, EOF, bad magic: all mean a damaged file
        raise HnkitError(f"{path}: corrupt or truncated .pt file ({first_line(exc)})") from None


# -- the web UI's optimizer sidecar ------------------------------------------------------------
def optim_sidecar(path: str | os.PathLike) -> Path:
    """``x.pt`` -> ``x.pt.optim``."""
    path = Path(path)
    return path.with_name(path.name + ".optim")


def _short_hash(data: bytes) -> str:
    """The web UI's short hash of a hypernetwork file: 10 hex digits of its SHA-256."""
    return hashlib.sha256(data).hexdigest()[:10]


def _legacy_hash(data: bytes) -> str:
    """The hash older web UI versions wrote: 8 hex digits of the SHA-256 of 64 KiB at offset 1 MiB."""
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def read_optim_sidecar(path: str | os.PathLike) -> dict | None:
    """The optimizer state stored beside a ``.pt`` (``{'optimizer_name', 'hash',
    'optimizer_state_dict'}``), or None when there is no sidecar. A sidecar whose hash does not
    match the ``.pt`` belongs to another version of the file: it is ignored with a warning, as the
    web UI does. A damaged one is an error that names it."""
    path = Path(path)
    sidecar = optim_sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        data = load_plain(sidecar)
    except HnkitError:
        raise
    except pickle.UnpicklingError as exc:
        raise HnkitError(f"{sidecar}: refused optimizer state: not loadable as plain tensors and data with "
                         f"weights_only=True (it holds objects that would run code, or it is corrupt: "
                         f"{_unpickling_detail(exc)})") from None
    except Exception as exc:
        raise HnkitError(f"{sidecar}: corrupt or truncated optimizer state file ({first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("optimizer_state_dict"), dict):
        raise HnkitError(f"{sidecar}: not an optimizer state file (expected a dict with 'optimizer_state_dict')")
    blob = path.read_bytes()
    if data.get("hash") not in (_short_hash(blob), _legacy_hash(blob)):
        warnings.warn(f"{sidecar}: optimizer state is for another version of {path.name} "
                      f"(hash {data.get('hash')!r} does not match); ignored", HnkitWarning, stacklevel=3)
        return None
    return {"optimizer_name": data.get("optimizer_name") or "AdamW", "hash": data["hash"],
            "optimizer_state_dict": data["optimizer_state_dict"]}


def _sidecar_state(hn: Hypernetwork, path: Path) -> dict | None:
    state = getattr(hn, "optimizer_state", None)
    if state is None:
        return None
    if not isinstance(state, dict) or not isinstance(state.get("optimizer_state_dict"), dict):
        raise HnkitError(f"{path}: hn.optimizer_state must be a dict with an 'optimizer_state_dict' "
                         "(e.g. {'optimizer_name': 'AdamW', 'optimizer_state_dict': optimizer.state_dict()})")
    return {"optimizer_name": state.get("optimizer_name") or "AdamW",
            "optimizer_state_dict": state["optimizer_state_dict"]}


def _unpickling_detail(exc: Exception) -> str:
    """The informative line of a weights_only unpickling error (torch puts advice lines around it)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or ["unpickling error"]
    return next((ln for ln in lines if re.search(r"GLOBAL|Unsupported|load key", ln)), lines[0])


def _load_safetensors(path: Path) -> Hypernetwork:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise HnkitError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    if "hnkit" not in meta:
        raise HnkitError(f"{path}: a safetensors file without hnkit metadata (not an hnkit hypernetwork)")
    m = parse_metadata(meta["hnkit"], path)
    try:
        if m.get("format_version", 0) > FORMAT_VERSION:
            raise HnkitError(f"format version {m['format_version']} is newer than this hnkit "
                             f"reads ({FORMAT_VERSION}); upgrade hnkit")
        config = HypernetworkConfig.from_dict(m["config"])
        keys, widths = m["keys"], m["widths"]
        if not (isinstance(keys, list) and isinstance(widths, list) and len(keys) == len(widths)
                and all(isinstance(k, (int, str)) for k in keys)):
            raise ValueError("'keys' and 'widths' must be lists of the same length, keys integers or names")
        if len(keys) > MAX_SITE_KEYS:
            raise HnkitError(f"refused: {len(keys):,} keys; a hypernetwork has at most {MAX_SITE_KEYS}")
    except HnkitError as exc:
        raise HnkitError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HnkitError(f"{path}: bad hnkit metadata ({first_line(exc)})") from None
    weights = {}
    for key in keys:
        prefix = f"{key}."
        weights[key] = [{n[len(prefix) + 2:]: t for n, t in tensors.items() if n.startswith(f"{prefix}{tag}.")}
                        for tag in "kv"]
    return _build_checked(path, weights, lambda: Hypernetwork(
        config, keys, widths=dict(zip(keys, widths)), name=m.get("name") or path.stem, step=m.get("step", 0),
        family=m.get("family"), base_model=m.get("base_model"), base_model_hash=m.get("base_model_hash"),
        description=m.get("description", ""), extra=m.get("extra"),
    ))


def _build_checked(path: Path, weights: dict, make) -> Hypernetwork:
    """``make()`` the hypernetwork a file declares and load ``weights`` (key -> [k, v] state dicts)
    into it. It is first built on the meta device, which allocates nothing, and checked against the
    file's tensors: a file that declares sizes its tensors do not have is refused before any memory
    is spent on them, and a tensor that is not finite floating point is refused too."""
    try:
        with torch.device("meta"):
            probe = make()
    except HnkitError as exc:
        raise HnkitError(f"{path}: {exc}") from None
    except (RuntimeError, ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise HnkitError(f"{path}: bad hypernetwork description ({first_line(exc)})") from None
    if set(weights) != set(probe.keys()):
        raise HnkitError(f"{path}: the weights do not match the declared keys")
    for key, pair in weights.items():
        for tag, module, sd in zip("kv", probe[key], pair):
            _check_module(module, sd, path, f"{key}/{tag}")
    hn = make()
    for key, pair in weights.items():
        for module, sd in zip(hn[key], pair):
            module.load_state_dict(sd)
    return hn


def _check_module(module, sd: dict, path: Path, where: str) -> None:
    expected = module.state_dict()
    if set(sd) != set(expected):
        raise HnkitError(f"{path}: {where}: weights {sorted(sd)} do not match the layer structure, "
                         f"which needs {sorted(expected)}")
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor) or t.shape != expected[name].shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise HnkitError(f"{path}: {where}: {name} has shape {shape}, expected {tuple(expected[name].shape)}")
        if not t.is_floating_point():
            raise HnkitError(f"{path}: {where}: {name} holds {t.dtype} values, expected floating point")
        if not torch.isfinite(t).all():
            raise HnkitError(f"{path}: {where}: {name} holds NaN or infinite values")


_OLDEST_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
                "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


def from_a1111(data, path: Path | str = "hypernetwork.pt") -> Hypernetwork:
    """Build a Hypernetwork from the dict of a web UI ``.pt``, with the web UI's defaults."""
    path = Path(path)
    if not isinstance(data, dict):
        raise HnkitError(f"{path}: not a hypernetwork file (holds a {type(data).__name__}, expected a dict)")
    widths = [k for k in data if isinstance(k, int)]
    if not widths:
        raise HnkitError(f"{path}: not a hypernetwork file (no integer width keys)")
    if len(widths) > MAX_WIDTH_KEYS:
        raise HnkitError(f"{path}: refused: {len(widths):,} width keys; a hypernetwork has one per attention "
                         f"input width of its model (a few), at most {MAX_WIDTH_KEYS}")
    def make():
        ours = {attr: data.get(f"hnkit_{attr}") for attr in _A1111_HNKIT}
        ours = {k: v for k, v in ours.items() if isinstance(v, str)}  # anything else is not ours: ignored
        return Hypernetwork(config, widths, name=data.get("name") or path.stem, step=data.get("step") or 0,
                            extra={k: data.get(k) for k in _A1111_EXTRA}, **ours)

    try:
        dropout_structure = data.get("dropout_structure")
        config = HypernetworkConfig(
            layer_structure=list(data.get("layer_structure") or [1, 2, 1]),
            activation=data.get("activation_func"),
            layer_norm=bool(data.get("is_layer_norm", False)),
            dropout_structure=list(dropout_structure) if dropout_structure is not None else None,
            use_dropout=bool(data.get("use_dropout", False)),  # the config derives it from the structure too
            last_layer_dropout=bool(data.get("last_layer_dropout", False)),
            activate_output=bool(data.get("activate_output", True)),
            weight_init=data.get("weight_initialization") or "Normal",
        )
    except HnkitError as exc:
        raise HnkitError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise HnkitError(f"{path}: bad hypernetwork description ({first_line(exc)})") from None
    weights = {}
    for width in widths:
        pair = data[width]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise HnkitError(f"{path}: width {width}: expected a (k, v) pair of state dicts")
        weights[width] = [{_OLDEST_KEYS.get(n, n): t for n, t in sd.items()} for sd in pair]
    return _build_checked(path, weights, make)
