"""Module forms: what one K or V module of a hypernetwork is (docs/design.md, "Module forms").

A form is an ``nn.Module`` class that turns an input ``x`` of width ``dim`` into ``x + s * f(x)``.
``HypernetworkConfig.form`` names it in :data:`FORMS`, and every other file asks the module (or, for
what a config implies, its class), never its class name or its layers. A module provides:

- ``dim``; ``dtype`` (its weights'); ``has_dropout``; ``is_affine`` (``f(x) = M x + c``);
  ``is_stack`` (False: only :class:`hnkit.stack.StackedModule` is a stack's members);
- ``residual(h)``: ``f(h)`` for ``h`` already in the module's dtype;
- ``forward(x, strength=1.0)``: ``x + strength * f(x)``, cast to the weights' dtype and back at the
  edges; ``strength`` a number or a tensor broadcast against ``x`` (one per row: ``[B, 1, ..., 1]``);
- ``affine(dtype=None)``: ``(M [D, D], c [D])``, differentiable (fuse, merge, the Collapsed
  kernel); HnkitError where the form is not affine;
- ``break_even_rows()``: rows over a forward pass from which multiplying ``M`` out first costs less
  than running the module row by row (the Collapsed kernel); None = never;
- ``stack_weights()``: ``(w1 [H, D], b1 [H], w2 [D, H], b2 [D])`` with ``f(x) = w2 act(w1 x + b1) +
  b2``, ``act`` the activation named by ``stack_activation`` (None: none); HnkitError where the
  module has no such form. :class:`hnkit.stack.Stack` is built from these, for any form;
- saving: its ``state_dict()`` names follow ``<key>.<k|v>.`` in hnkit's ``.safetensors``;
  ``webui_format`` says whether the web UI's ``.pt`` can hold it (only "mlp").

and its class, what a :class:`hnkit.HypernetworkConfig` implies:

- ``from_config(config, width)``: the module for an input width;
- ``config_is_linear(config)``: whether its modules are affine (fuse and merge check networks by it);
- ``signature(config)``: what two configs of the form must share for their modules to compute alike;
- ``stack_problem(config)``: why networks of that config cannot be stacked, or None.

The forms: "mlp" (:class:`hnkit.module.HypernetworkModule`, the web UI's residual MLP) and
"lowrank" (:class:`LowRankModule`, ``f(x) = B (A x) + c``, LoRA's shape with a bias).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import HnkitError
from .module import MAX_WIDTH, HypernetworkModule, break_even, residual_forward


class LowRankModule(nn.Module):
    """``y = x + strength * (B (A x) + c)`` for inputs of width ``dim``: ``A [rank, dim]``
    (``down.weight``), ``B [dim, rank]`` (``up.weight``), ``c [dim]`` (``up.bias``). ``A`` starts as
    LoRA's (``nn.Linear``'s Kaiming-uniform), ``B`` and ``c`` at zero: the exact identity. It is
    affine, has no dropout and stacks with ``H = rank`` and no activation."""

    form = "lowrank"
    webui_format = False
    is_stack = False
    has_dropout = False
    is_affine = True
    stack_activation = None

    def __init__(self, dim: int, rank: int):
        super().__init__()
        check_rank(rank)
        if rank > dim:
            raise HnkitError(f"rank {rank} is larger than the input width {dim}; a rank is at most the width")
        self.dim, self.rank = dim, rank
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        with torch.no_grad():
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    @classmethod
    def from_config(cls, config, width: int) -> "LowRankModule":
        return cls(width, config.rank)

    @staticmethod
    def config_is_linear(config) -> bool:
        return True

    @staticmethod
    def signature(config) -> tuple:
        return (config.rank,)

    @staticmethod
    def stack_problem(config) -> str | None:
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self.down.weight.dtype

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        return self.up.forward(self.down.forward(h))

    def forward(self, x: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
        return residual_forward(self, x, strength)

    def affine(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, c = self.down.weight, self.up.weight, self.up.bias
        if dtype is not None:
            a, b, c = a.to(dtype), b.to(dtype), c.to(dtype)
        return b @ a, c

    def break_even_rows(self) -> int | None:
        """Two products of ``rank x dim`` a row against one ``dim x dim``: pays only above half the width."""
        d, r = self.dim, self.rank
        return break_even(2 * r * d, d * r * d, d)

    def stack_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.down.weight
        return a, a.new_zeros(self.rank), self.up.weight, self.up.bias


def check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= MAX_WIDTH:
        raise HnkitError(f"rank {rank!r} is not an integer from 1 to {MAX_WIDTH} (at most the input width)")


FORMS = {"mlp": HypernetworkModule, "lowrank": LowRankModule}


def check_form(form, rank) -> None:
    """A config's ``form`` and ``rank``, checked: a rank is given for "lowrank" and only for it."""
    if not isinstance(form, str) or form not in FORMS:
        raise HnkitError(f"unknown module form {form!r}; known: {', '.join(FORMS)}")
    if form == "lowrank":
        if rank is None:
            raise HnkitError("form 'lowrank' needs a rank (an integer from 1 to the input width)")
        check_rank(rank)
    elif rank is not None:
        raise HnkitError(f"rank is an option of form 'lowrank' only, not of form {form!r}")


def make_module(config, width: int) -> nn.Module:
    """The K or V module of a config's form for an input of width ``width``."""
    return FORMS[config.form].from_config(config, width)
