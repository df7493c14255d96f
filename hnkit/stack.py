"""Several styles of one shape as one network, for serving them to different batch rows at once.

A :class:`Stack` copies N hypernetworks with the same two-layer modules (any form whose
``stack_weights()`` give ``f(x) = w2 act(w1 x + b1) + b2``, :mod:`hnkit.forms`: an MLP ``[1, m, 1]``
with an element-wise activation and no layer norm, or a low-rank module) into one tensor per layer
and site: ``w1 [N, H, D]``, ``b1 [N, H]``, ``w2 [N, H, D]`` (the second layer transposed) and ``b2 [N, D]``.
Attached with ``blend="sum"``, a site then computes ``x + sum_i s_i * mlp_i(x)`` for every row and
member with two matrix products over the active members, instead of two small products per member
(:class:`hnkit.kernels.Stacked`): the cost of 8 styles on 8 rows approaches that of one network
8 times as wide (docs/benchmarks.md, Serving).

The stack owns its weights: it is a copy, made once, and reads nothing of the networks it was made
from afterwards (change one of those and make a new stack). Dropout layers of the members are left
out, as at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HnkitError
from .forms import FORMS
from .hypernetwork import Hypernetwork, pair_name
from .module import is_elementwise, make_activation


def check_stackable(networks: list[Hypernetwork], names: list[str]) -> None:
    """Refuse networks that cannot share one stack, saying which and why."""
    if not networks:
        raise HnkitError("a stack needs at least one hypernetwork")
    for hn in networks:
        if not isinstance(hn, Hypernetwork):
            raise HnkitError(f"a stack is made of Hypernetwork objects, got {type(hn).__name__}")
    if len(set(names)) != len(names):
        raise HnkitError(f"stack members need distinct names, got {names}")
    first = networks[0]
    c = first.config
    form = FORMS[c.form]
    problem = form.stack_problem(c)
    if problem:
        raise HnkitError(f"hypernetwork {names[0]!r} cannot be stacked: {problem}")
    for name, hn in zip(names, networks):
        h = hn.config
        same = (h.form == c.form and form.signature(h) == form.signature(c)
                and h.per_site == c.per_site and hn.keys() == first.keys()
                and all(hn.width_of(k) == first.width_of(k) for k in first.keys())
                and {(p.dtype, p.device) for p in hn.parameters()} == {(p.dtype, p.device) for p in first.parameters()})
        if not same:
            raise HnkitError(f"hypernetwork {name!r} cannot share a stack with {names[0]!r}: their forms, layer "
                             "structures, activations, sites, dtypes or devices differ")


class StackedModule(nn.Module):
    """One site's K (or V) modules of N networks, stacked; ``mix`` computes their weighted sum."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        weights = [module.stack_weights() for module in modules]  # (w1, b1, w2, b2) each: hnkit.forms
        with torch.no_grad():  # torch.stack copies: the stack owns its weights
            self.w1 = nn.Parameter(torch.stack([w[0] for w in weights]))  # [N, H, D]
            self.b1 = nn.Parameter(torch.stack([w[1] for w in weights]))  # [N, H]
            self.w2 = nn.Parameter(torch.stack([w[2].t() for w in weights]))  # [N, H, D], contiguous
            self.b2 = nn.Parameter(torch.stack([w[3] for w in weights]))  # [N, D]
        activation = modules[0].stack_activation
        if not is_elementwise(activation):
            raise HnkitError(f"activation {activation!r} does not act on each hidden unit alone: it cannot be stacked")
        self.activation = None if activation is None else make_activation(activation)
        self.dim = modules[0].dim

    has_dropout = False  # left out of a stack, as at inference
    is_stack = True  # the kernels run it as a stack's members (hnkit.kernels.Stacked)

    @property
    def dtype(self) -> torch.dtype:
        return self.w1.dtype

    def mix(self, h: torch.Tensor, s: torch.Tensor, lo: int, hi: int, members: torch.Tensor | None = None
            ) -> torch.Tensor:
        """``sum_i s[:, i] * mlp_{lo + i}(h)`` over members ``lo..hi-1``, for ``h`` ``[M, ..., D]`` in
        the module's dtype and ``s`` ``[M, hi - lo]`` (or ``[1, hi - lo]``: the same for every row).
        With ``members`` (positions, on the weights' device), over those members instead, ``s``
        ``[M, len(members)]``: only their weights are read (a few members of a large stack)."""
        if members is None:
            w1, b1, w2, b2 = self.w1[lo:hi], self.b1[lo:hi], self.w2[lo:hi], self.b2[lo:hi]
        else:
            w1, b1, w2, b2 = (p.index_select(0, members) for p in (self.w1, self.b1, self.w2, self.b2))
        k, width = w1.shape[0], w1.shape[1]
        s = s if s.dtype == w1.dtype else s.to(w1.dtype)
        a = F.linear(h, w1.reshape(k * width, -1), b1.reshape(-1))  # every member at once
        if self.activation is not None:
            a = self.activation(a)
        row_shape = (s.shape[0],) + (1,) * (h.dim() - 2)
        a = (a.view(*a.shape[:-1], k, width) * s.view(*row_shape, k, 1)).view(*a.shape[:-1], k * width)
        y = torch.matmul(a, w2.reshape(k * width, -1))  # sums over the members
        return y + (s @ b2).view(*row_shape, -1)


class Stack(nn.Module):
    """N hypernetworks of one shape, copied into stacked tensors (see the module's docstring).

    ``Stack([noir, whimsy])`` names the members by ``hn.name``; ``names=`` overrides. It has the
    keys and ``pair_for(site)`` of a :class:`Hypernetwork`, so :func:`hnkit.attach` installs it like
    one; its strength is one per member (see :class:`hnkit.strengths.Members`)."""

    def __init__(self, networks: list[Hypernetwork], names: list[str] | None = None):
        super().__init__()
        networks = list(networks)
        names = [getattr(hn, "name", None) for hn in networks] if names is None else list(names)
        if len(names) != len(networks):
            raise HnkitError(f"{len(names)} names for {len(networks)} stack members")
        check_stackable(networks, names)
        first = networks[0]
        self.names = names
        self.positions = {name: i for i, name in enumerate(names)}
        self.name = "stack(" + ", ".join(names) + ")"
        self.config = first.config
        self._keys = first.keys()
        self._widths = {key: first.width_of(key) for key in self._keys}
        self.pairs = nn.ModuleDict()
        for key in self._keys:
            self.pairs[pair_name(key)] = nn.ModuleList(
                [StackedModule([hn[key][which] for hn in networks]) for which in (0, 1)])

    def keys(self) -> list:
        return list(self._keys)

    def width_of(self, key) -> int:
        return self._widths[key]

    def pair_for(self, site):
        key = site.key if self.config.per_site else site.width
        if key not in self._widths:
            return None
        k, v = self.pairs[pair_name(key)]
        return k, v

    def index(self, member: int | str) -> int:
        """A member's position from its position or name."""
        if isinstance(member, str):
            if member not in self.positions:
                raise HnkitError(f"the stack has no member {member!r}; members: {', '.join(self.names)}")
            return self.positions[member]
        if isinstance(member, bool) or not isinstance(member, int):
            raise HnkitError(f"name a stack member by its name or position, not a {type(member).__name__}")
        if not 0 <= member < len(self.names):
            raise HnkitError(f"stack member {member!r} is out of range: the stack has {len(self.names)}")
        return member

    def __repr__(self) -> str:
        return f"Stack({len(self.names)} members: {', '.join(self.names)})"
