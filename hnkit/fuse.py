"""Fold a linear hypernetwork into the K/V projection weights, so that inference costs nothing extra.

A hypernetwork module without activation and layer norm is an affine map, ``mlp(x) = A x + c``
(dropout is off at inference), as is a low-rank one (:mod:`hnkit.forms`), so its site computes
``x' = x + D x + t`` with ``D = s A`` and ``t = s c``. Several networks compose the same way
(chain: one after the other; sum: ``D = sum s_i A_i``). A projection ``W x + b`` fed ``x'``
becomes ``(W + W D) x + (b + W t)``: new weights, same code. The arithmetic is done in float64
and rounded once to the weights' dtype.

``fuse`` swaps in new Parameter objects and keeps the originals; ``unfuse`` (or the handle's
``remove()``) puts the very same original Parameters back, and removes the biases it added to
projections that had none, so the model is bit-identical to before.
"""

from __future__ import annotations

import torch
from torch import nn

from .attach import attached_models, fused_models, as_entries, check_blend, check_fits, finite, layer_factors
from .errors import HnkitError
from .hypernetwork import Hypernetwork
from .targets import find_sites


def affine_map(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, c)`` in float64 with ``f(x) = A x + c`` for an affine module of any form (an MLP
    without activation or layer norm, dropout ignored as at inference; a low-rank one)."""
    with torch.no_grad():
        return module.affine(torch.float64)


def require_linear(hn: Hypernetwork, what: str) -> None:
    c = hn.config
    if not c.is_linear:
        why = "layer norm" if c.layer_norm else f"activation {c.activation!r}"
        raise HnkitError(f"hypernetwork {hn.name!r} cannot be {what}: its {why} makes it non-linear; "
                         "only networks with activation 'linear' and no layer norm can be. Attach it instead")


def site_affine(pairs, which: int, blend: str, device, cache: dict | None = None):
    """``(D, t)`` of one site's K (which=0) or V (which=1) input, ``x' = x + D x + t``, from its
    ``[(strength, (k_module, v_module))]``; None when every strength is 0 (nothing to fold).
    Kept as the change from the identity, so that no identity matrix is ever built. ``cache``
    keeps each module's affine map: a width-keyed pair serves every layer."""
    pairs = [(s, pair) for s, pair in pairs if s != 0]
    if not pairs:
        return None
    cache = {} if cache is None else cache
    D = t = None
    for s, pair in pairs:
        module = pair[which]
        if module not in cache:
            cache[module] = tuple(a.to(device) for a in affine_map(module)) if device else affine_map(module)
        A, c = cache[module]
        if D is None:
            D, t = s * A, s * c
        elif blend == "chain":  # y -> y + sA y + sc, applied to y = x + D x + t
            D, t = D + s * A + s * (A @ D), t + s * (A @ t) + s * c
        else:
            D, t = D + s * A, t + s * c
    return D, t


class Fusion:
    """Hypernetworks folded into a model's weights. ``remove()`` (or leaving a ``with`` block)
    restores the original Parameter objects."""

    def __init__(self, model, entries, blend: str, layers):
        self.model = model
        self.hypernetworks = [hn for hn, _ in entries]
        self.strengths = [finite(s, "strength") for _, s in entries]
        self.blend = blend
        self.family, sites = find_sites(model)
        for hn in self.hypernetworks:
            check_fits(hn, sites, self.family)
        factors = layer_factors(layers, len(sites))
        self._saved: list[tuple[nn.Module, str, nn.Parameter | None]] = []
        affine_maps: dict = {}  # a width-keyed pair serves every layer: its maps are computed once
        try:
            for site, f in zip(sites, factors):
                pairs = [(s * f, hn.pair_for(site)) for hn, s in zip(self.hypernetworks, self.strengths)]
                self._fold_site(site, [(s, p) for s, p in pairs if p is not None], affine_maps)
        except BaseException:
            self.remove()
            raise
        self.num_params = len(self._saved)

    @torch.no_grad()
    def _fold_site(self, site, pairs, affine_maps: dict) -> None:
        for which in (0, 1):
            affine = site_affine(pairs, which, self.blend, None, affine_maps)
            if affine is None:
                continue
            for module, name, value in site.fold(which, *affine):
                self._saved.append((module, name, getattr(module, name)))
                setattr(module, name, nn.Parameter(value, requires_grad=False))

    # lifetime -------------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        return fused_models.get(self.model) is self

    def remove(self) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)  # the same Parameter object, or None for an added bias
        self._saved = []
        if fused_models.get(self.model) is self:
            del fused_models[self.model]

    def __enter__(self) -> "Fusion":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(f"{hn.name}@{s:g}" for hn, s in zip(self.hypernetworks, self.strengths))
        return f"Fusion({self.family}, [{names}], blend={self.blend}, {self.num_params} tensors replaced)"


def fuse(model, hypernetwork, strength: float = 1.0, *, blend: str = "chain", layers=None) -> Fusion:
    """Fold a linear hypernetwork (or a list of ``(hypernetwork, strength)`` pairs, combined by
    ``blend``, with optional per-layer factors ``layers``) into the model's K/V projection weights.
    Outputs equal the attached network's up to float rounding, at the base model's speed.
    Inference only. Returns a :class:`Fusion`; ``unfuse(model)`` or ``remove()`` restores the model
    bit-exactly. Non-linear networks are refused (attach them instead)."""
    entries = as_entries(hypernetwork, strength, verb="fuse")
    check_blend(blend)
    for hn, _ in entries:
        require_linear(hn, "fused")
    if model in attached_models:
        raise HnkitError("this model has hypernetworks attached: remove() them before fusing "
                         "(fused and attached together would apply a style twice)")
    if model in fused_models:
        raise HnkitError("this model already has a hypernetwork fused into its weights: unfuse(model) first, "
                         "or fuse a list of (hypernetwork, strength) pairs at once")
    handle = Fusion(model, entries, blend, layers)
    fused_models[model] = handle
    return handle


def unfuse(model) -> None:
    """Put back the model's original K/V weights (the same Parameter objects); remove added biases."""
    handle = fused_models.get(model)
    if handle is None:
        raise HnkitError("this model has no fused hypernetwork")
    handle.remove()
