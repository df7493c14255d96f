"""Attention sites: facts about a model, and the two ways hnkit feeds K and V a different input.

A *site* is one attention layer. Its facts: a stable ``key``, the ``width`` of the tensor that feeds
K and V, how to feed K and V through a kernel (``install``), how to fold a change of that input
into the K/V weights (``fold``, for :func:`hnkit.fuse`), and whether its K/V input is the model
call's shared context (``context``: the SD UNet's cross-attention). A family's row
(hnkit.targets.causal_lm) or file (hnkit.targets.unet) lists its sites with the helpers below;
nothing here keeps state or decides how a kernel computes.

``site.install(kernel)`` makes the layer compute K from ``kernel(x, 0)`` and V from
``kernel(x, 1)``, where ``x`` is the tensor that used to feed both, and returns a function that
undoes it. A kernel returns ``x`` itself (the same object) when it has nothing to do, and the layer
then runs its original code: bit-identical outputs.

- Separate K and V projections get a forward pre-hook each (a small object, no patching).
- A fused QKV projection is swapped, while attached, for :class:`FusedQKV`, which holds the very
  same Parameter objects under the same names (``model.state_dict()`` is unchanged) and computes
  Q, K and V from three inputs with slices of the one weight (where they lie: :class:`QKVLayout`).

``site.fold(which, D, t)`` gives the new tensors of the K (``which`` 0) or V (1) projection when its
input ``x`` becomes ``x + D x + t`` (float64 ``D`` and ``t``): ``[(module, name, tensor)]``, computed
from the tensors the module holds now (so K's and V's folds into one fused weight compose).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Kernel = Callable[[torch.Tensor, int], torch.Tensor]
Fold = Callable[[int, torch.Tensor, torch.Tensor], list]


@dataclass
class Site:
    key: str  # stable name of the attention layer, e.g. "layers.3.self_attn"
    width: int  # last dimension of the tensor that feeds K and V
    install: Callable[[Kernel], Callable[[], None]]
    fold: Fold
    context: bool = False  # K/V input is the model call's context, the same tensor at every such site


@dataclass
class Target:
    """What hnkit knows of one model: its family, its sites, and two facts about a call of the model
    (the root module ``attach`` was given): ``rows(args, kwargs)``, the rows of a site's K/V input in
    that call (an upper bound where sites differ), and ``context(args, kwargs)``, the tensor fed to
    the K/V of every ``context`` site (None where the family has none)."""

    family: str
    sites: list[Site]
    rows: Callable[[tuple, dict], int]
    context: Callable[[tuple, dict], torch.Tensor | None] | None = None


def matching_modules(model: nn.Module, pattern: str):
    """``(key, module)`` for every submodule whose name ends with ``pattern``; the key is the matched
    tail, so a base model and its LM-head wrapper give the same keys."""
    rx = re.compile(rf"(?:^|\.)({pattern})$")
    for name, module in model.named_modules():
        m = rx.search(name)
        if m:
            yield m.group(1), module


def token_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tokens of a causal LM's call: ``input_ids`` (first positional or by name), else
    ``inputs_embeds``."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return ids
    embeds = kwargs.get("inputs_embeds")
    return embeds if isinstance(embeds, torch.Tensor) else None


def token_rows(args: tuple, kwargs: dict) -> int:
    """Rows of every site's K/V input in a call of a causal LM: its tokens."""
    x = token_input(args, kwargs)
    return 0 if x is None else x.shape[0] * x.shape[1]


class _InputHook:
    """Forward pre-hook that replaces a projection's input by ``kernel(input, which)``."""

    def __init__(self, kernel: Kernel, which: int):
        self.kernel = kernel
        self.which = which

    def __call__(self, module, args, kwargs):
        if args:
            x = args[0]
            y = self.kernel(x, self.which)
            return None if y is x else ((y, *args[1:]), kwargs)
        x = kwargs["input"]
        y = self.kernel(x, self.which)
        return None if y is x else (args, {**kwargs, "input": y})


def fold_linear(proj: nn.Linear, D: torch.Tensor, t: torch.Tensor) -> list:
    """``W (x + D x + t) + b = (W + W D) x + (b + W t)`` for a ``nn.Linear``; adds a bias where it had none."""
    w = proj.weight.detach().double()
    b = proj.bias.detach().double() if proj.bias is not None else w.new_zeros(w.shape[0])
    D, t = D.to(w.device), t.to(w.device)
    dtype = proj.weight.dtype
    return [(proj, "weight", torch.addmm(w, w, D).to(dtype)), (proj, "bias", torch.addmv(b, w, t).to(dtype))]


def separate_kv_site(key: str, k_proj: nn.Linear, v_proj: nn.Linear, width: int, context: bool = False) -> Site:
    def install(kernel: Kernel):
        handles = [
            k_proj.register_forward_pre_hook(_InputHook(kernel, 0), with_kwargs=True),
            v_proj.register_forward_pre_hook(_InputHook(kernel, 1), with_kwargs=True),
        ]
        return lambda: [h.remove() for h in handles]

    return Site(key, width, install, lambda which, D, t: fold_linear((k_proj, v_proj)[which], D, t), context)


def separate_kv_sites(model: nn.Module, pattern: str, k: str = "k_proj", v: str = "v_proj") -> list[Site]:
    sites = []
    for key, attn in matching_modules(model, pattern):
        k_proj, v_proj = getattr(attn, k), getattr(attn, v)
        sites.append(separate_kv_site(key, k_proj, v_proj, k_proj.in_features))
    return sites


@dataclass(frozen=True)
class QKVLayout:
    """Where Q, K and V lie among the outputs of a fused projection: ``groups`` equal blocks (1, or
    one per head), each laid out [q | k | v] with ``sizes`` outputs; ``conv1d``: the weight is
    stored (in, out), as by transformers' Conv1D, else (out, in) as by ``nn.Linear``."""

    groups: int
    sizes: tuple[int, int, int]
    conv1d: bool = False

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as (out, in), a view."""
        return weight.t() if self.conv1d else weight

    def part(self, t: torch.Tensor, which: int) -> torch.Tensor:
        """View of Q's (``which`` 0), K's (1) or V's (2) outputs of a bias (out,) or an (out, in)
        weight, shaped (groups, size, ...)."""
        start = sum(self.sizes[:which])
        return t.view(self.groups, -1, *t.shape[1:])[:, start:start + self.sizes[which]]

    def split(self, weight, bias):
        """``[(w, b)] * 3`` for Q, K, V in ``F.linear`` convention."""
        w = self.weight(weight)
        return [(self.part(w, i).reshape(-1, w.shape[1]), None if bias is None else self.part(bias, i).reshape(-1))
                for i in range(3)]

    def merge(self, q, k, v):
        """The three results laid out as the fused projection gives them."""
        return torch.cat([t.unflatten(-1, (self.groups, -1)) for t in (q, k, v)], dim=-1).flatten(-2)


class FusedQKV(nn.Module):
    """Stand-in for a fused QKV projection while a hypernetwork is attached: it holds the very same
    Parameter objects under the same names and computes Q, K, V from three inputs."""

    def __init__(self, base: nn.Module, layout: QKVLayout, kernel: Kernel):
        super().__init__()
        self.weight = base.weight  # the same Parameter objects, under the same names
        self.bias = base.bias
        self.base = [base]  # a list: not a submodule, so state_dict keys stay as they were
        self.layout = layout
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kx, vx = self.kernel(x, 0), self.kernel(x, 1)
        if kx is x and vx is x:
            return self.base[0](x)
        (wq, bq), (wk, bk), (wv, bv) = self.layout.split(self.weight, self.bias)
        return self.layout.merge(F.linear(x, wq, bq), F.linear(kx, wk, bk), F.linear(vx, wv, bv))


def fold_fused(proj: nn.Module, layout: QKVLayout, which: int, D: torch.Tensor, t: torch.Tensor) -> list:
    """:func:`fold_linear` for K's (``which`` 0) or V's (1) outputs of a fused projection."""
    w = proj.weight.detach().double().clone()
    wt = layout.weight(w)  # (out, in), a view of w
    b = proj.bias.detach().double().clone() if proj.bias is not None else w.new_zeros(wt.shape[0])
    D, t = D.to(w.device), t.to(w.device)
    rows, bias = layout.part(wt, 1 + which), layout.part(b, 1 + which)
    bias += rows @ t
    rows[:] = rows + rows @ D
    dtype = proj.weight.dtype
    return [(proj, "weight", w.to(dtype)), (proj, "bias", b.to(dtype))]


def fused_qkv_site(key: str, parent: nn.Module, attr: str, layout: QKVLayout) -> Site:
    def install(kernel: Kernel):
        base = getattr(parent, attr)
        setattr(parent, attr, FusedQKV(base, layout, kernel))
        return lambda: setattr(parent, attr, base)

    def fold(which, D, t):  # reads the tensors the projection holds now: K's and V's folds compose
        return fold_fused(getattr(parent, attr), layout, which, D, t)

    width = layout.weight(getattr(parent, attr).weight).shape[1]
    return Site(key, width, install, fold)
