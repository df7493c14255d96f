"""Attention sites and the two ways hnkit feeds K and V a different input.

A *site* is one attention layer. ``site.install(transform)`` makes the layer compute K from
``transform(x, 0)`` and V from ``transform(x, 1)``, where ``x`` is the tensor that used to feed
both, and returns a function that undoes it. ``transform`` returns ``x`` itself (the same object)
when it has nothing to do, and the layer then runs its original code: bit-identical outputs.

- Separate K and V projections get a forward pre-hook each (a small object, no patching).
- Where K and V are plain ``nn.Linear`` layers narrower than their input (grouped-query attention),
  the site also has ``projections`` (:class:`Projections`): ``projections.install(fn)`` swaps them,
  while attached, for :class:`KVProjection` stand-ins, so that a call may add to the projection's
  output instead (:class:`hnkit.packed.FoldedKV`).
- A fused QKV projection is swapped, while attached, for :class:`FusedQKV`, which holds the very
  same Parameter objects under the same names (``model.state_dict()`` is unchanged) and computes
  Q, K and V from three inputs with slices of the one weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Transform = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Site:
    key: str  # stable name of the attention layer, e.g. "layers.3.self_attn"
    width: int  # last dimension of the tensor that feeds K and V
    install: Callable[[Transform], Callable[[], None]]
    projections: Projections | None = None  # separate K and V Linear layers narrower than their input


@dataclass
class Projections:
    """A site's K and V projections, plain ``nn.Linear`` layers that ``parent`` holds under ``names``.
    ``install(fn)`` swaps them, while attached, for :class:`KVProjection` stand-ins computing
    ``fn(x, linear, which)``, and returns a function that puts them back."""

    k: nn.Linear
    v: nn.Linear
    parent: nn.Module
    names: tuple[str, str]

    def install(self, fn) -> Callable[[], None]:
        linears = (self.k, self.v)
        for which, (name, linear) in enumerate(zip(self.names, linears)):
            setattr(self.parent, name, KVProjection(linear, fn, which))
        return lambda: [setattr(self.parent, name, linear) for name, linear in zip(self.names, linears)]


def matching_modules(model: nn.Module, pattern: str):
    """``(key, module)`` for every submodule whose name ends with ``pattern``; the key is the matched
    tail, so a base model and its LM-head wrapper give the same keys."""
    rx = re.compile(rf"(?:^|\.)({pattern})$")
    for name, module in model.named_modules():
        m = rx.search(name)
        if m:
            yield m.group(1), module


class _InputHook:
    """Forward pre-hook that replaces a projection's input by ``transform(input, which)``."""

    def __init__(self, transform: Transform, which: int):
        self.transform = transform
        self.which = which

    def __call__(self, module, args, kwargs):
        if args:
            x = args[0]
            y = self.transform(x, self.which)
            return None if y is x else ((y, *args[1:]), kwargs)
        x = kwargs["input"]
        y = self.transform(x, self.which)
        return None if y is x else (args, {**kwargs, "input": y})


class KVProjection(nn.Module):
    """Stand-in for a separate K or V projection (a plain ``nn.Linear``) while attached, for sites that
    sometimes add to the projection's output instead of changing its input (:class:`hnkit.packed.FoldedKV`).
    It holds the very same Parameter objects under the same names (``model.state_dict()`` is
    unchanged), and ``forward(x)`` is ``fn(x, linear, which)``. A stand-in, not a forward hook: a
    module with a forward hook costs PyTorch more per call than one with a pre-hook, enough to show in
    ``generate()``."""

    def __init__(self, linear: nn.Linear, fn, which: int):
        super().__init__()
        self.weight = linear.weight  # the same Parameter objects, under the same names
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.__dict__["linear"] = linear  # not a submodule: state_dict keys stay as they were
        self.__dict__["fn"] = fn
        self.__dict__["which"] = which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.linear, self.which)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, hypernetwork attached"


def separate_kv_site(key: str, k_proj: nn.Module, v_proj: nn.Module, width: int,
                     parent: nn.Module | None = None, names: tuple[str, str] = ("k_proj", "v_proj")) -> Site:
    def install(transform: Transform):
        handles = [
            k_proj.register_forward_pre_hook(_InputHook(transform, 0), with_kwargs=True),
            v_proj.register_forward_pre_hook(_InputHook(transform, 1), with_kwargs=True),
        ]
        return lambda: [h.remove() for h in handles]

    narrow = parent is not None and all(
        type(p) is nn.Linear and p.out_features < p.in_features and getattr(parent, n) is p
        for n, p in zip(names, (k_proj, v_proj)))
    return Site(key, width, install, Projections(k_proj, v_proj, parent, names) if narrow else None)


def separate_kv_sites(model: nn.Module, pattern: str, k: str = "k_proj", v: str = "v_proj") -> list[Site]:
    sites = []
    for key, attn in matching_modules(model, pattern):
        k_proj, v_proj = getattr(attn, k), getattr(attn, v)
        sites.append(separate_kv_site(key, k_proj, v_proj, k_proj.in_features, attn, (k, v)))
    return sites


class FusedQKV(nn.Module):
    """Stand-in for a fused QKV projection while a hypernetwork is attached.

    ``split(weight, bias)`` gives ``[(w, b)] * 3`` in ``F.linear`` convention for Q, K, V;
    ``merge(q, k, v)`` lays the three results out as the fused projection would.
    """

    def __init__(self, base: nn.Module, split, merge, transform: Transform):
        super().__init__()
        self.weight = base.weight  # the same Parameter objects, under the same names
        self.bias = base.bias
        self.__dict__["base"] = base  # not a submodule: state_dict keys stay as they were
        self.__dict__["split"] = split
        self.__dict__["merge"] = merge
        self.__dict__["transform"] = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kx, vx = self.transform(x, 0), self.transform(x, 1)
        if kx is x and vx is x:
            return self.base(x)
        (wq, bq), (wk, bk), (wv, bv) = self.split(self.weight, self.bias)
        return self.merge(F.linear(x, wq, bq), F.linear(kx, wk, bk), F.linear(vx, wv, bv))


def fused_qkv_site(key: str, parent: nn.Module, attr: str, width: int, split, merge) -> Site:
    def install(transform: Transform):
        base = getattr(parent, attr)
        setattr(parent, attr, FusedQKV(base, split, merge, transform))
        return lambda: setattr(parent, attr, base)

    return Site(key, width, install)
