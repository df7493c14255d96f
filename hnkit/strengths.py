"""Strengths: the values an attachment's kernels read, and how they are checked and built.

A strength is a finite number, or one per batch row (a list, tuple or 1-D tensor: :class:`PerRow`).
An attachment holds one :class:`Strengths` object, chosen once when attaching
(:func:`strengths_for`):

- :class:`NetworkStrengths`: one strength per attached network, picked by position or by the
  Hypernetwork object;
- :class:`MemberStrengths`: a :class:`hnkit.Stack`'s, one per member (:class:`Members`), picked by
  name or position, several at once with a dict.

Both have one interface: ``values`` and ``scale`` (what the kernels read at call time, see
:mod:`hnkit.kernels`), ``as_list()``, ``one()``, ``set(value, index)`` and ``labels``.
"""

from __future__ import annotations

import math

import torch

from .errors import HnkitError
from .stack import Stack


def finite(value, what: str) -> float:
    """``value`` as a finite float (a strength, or a factor on strengths); else one line naming ``what``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise HnkitError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise HnkitError(f"{what} must be a finite number, got {value}")
    return value


def checked_strength(value) -> float | torch.Tensor:
    """A strength checked: a finite number, or one per batch row as a 1-D float32 CPU tensor."""
    if not isinstance(value, (list, tuple, torch.Tensor)) or isinstance(value, torch.Tensor) and value.dim() == 0:
        return finite(value, "strength")
    try:
        s = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise HnkitError(f"per-row strengths must be numbers, got {value!r}") from None
    if s.dim() != 1 or len(s) == 0:
        raise HnkitError(f"per-row strengths are one number per batch row (a 1-D list), got shape {list(s.shape)}")
    if not torch.isfinite(s).all():
        raise HnkitError(f"per-row strengths must be finite numbers, got {s.tolist()}")
    return s


def strength_value(value, device=None):
    """A checked strength: a number, or one per batch row kept as a :class:`PerRow` on ``device``."""
    checked = checked_strength(value)
    return checked if isinstance(checked, float) else PerRow(checked, device)


def member_strengths(stack: Stack, value, device=None) -> "Members":
    """A stack's strengths from one number (every member), a list (one per member) or a dict
    ``{member name or position: value}`` (members not named are 0); each value a number or one
    per batch row."""
    if isinstance(value, dict):
        values = [0.0] * len(stack.names)
        for member, v in value.items():
            values[stack.index(member)] = v
    elif isinstance(value, (list, tuple)):
        if len(value) != len(stack.names):
            raise HnkitError(f"{len(value)} strengths for a stack of {len(stack.names)} members "
                             "(give one per member, or a dict {member: strength})")
        values = list(value)
    else:
        values = [value] * len(stack.names)
    return Members([checked_strength(v) for v in values], device)  # on the CPU: Members works the rows out once


# -- what the kernels read -----------------------------------------------------------------------
class Strengths:
    """The values the kernels of one attachment read at call time, changed in place: one strength
    per network (``values``: a float, a :class:`PerRow` for a strength per batch row, or a stack's
    :class:`Members`) and the schedule's factor for the current forward pass (``scale``)."""

    def __init__(self, values: list):
        self.values = Values(values)
        self.scale = 1.0


class Values:
    """One strength per network, read and set by index, that knows which are not 0 (``nonzero``,
    their indices): a kernel of many networks looks at those only, so its cost does not grow with the
    networks at 0. Not a list: setting by index is the only change, so ``nonzero`` stays true."""

    def __init__(self, values: list):
        self._values = list(values)
        self.nonzero = {i for i, v in enumerate(self._values) if not is_zero(v)}

    def __getitem__(self, index: int):
        return self._values[index]

    def __setitem__(self, index: int, value) -> None:
        index = range(len(self._values))[index]  # -1 is the last; IndexError past the end
        self._values[index] = value
        if is_zero(value):
            self.nonzero.discard(index)
        else:
            self.nonzero.add(index)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self):
        return iter(self._values)


def is_zero(value) -> bool:  # per-row strengths count as set: their rows are checked even at 0
    return not isinstance(value, (PerRow, Members)) and value == 0


class PerRow:
    """A strength per batch row: ``s`` (``[B]``, float32, on the model's device) and the rows whose
    strength is not 0 (``rows``; None when all are), worked out once when the strengths are set, so a
    kernel never asks the device which rows are active. Rows at 0 are never computed: they leave the
    site bit-identical to the bare model."""

    def __init__(self, s: torch.Tensor, device=None):
        active = (s != 0).nonzero().flatten()  # on the CPU, once
        values = s[active]
        self.s = s.to(device) if device is not None else s
        self.rows = None if len(active) == len(s) else active.to(self.s.device)
        self.empty = len(active) == 0
        # the active rows' strengths: one number when they share it (no per-row multiply), else [n]
        self.same = float(values[0]) if len(values) and bool((values == values[0]).all()) else None
        self.active = values.to(self.s.device)

    def scaled(self, factor: float, dims: int):
        """The active rows' strengths times ``factor``: a number, or a tensor shaped to broadcast
        against a ``dims``-dimensional input (``[n, 1, ..., 1]``)."""
        if self.same is not None:
            return self.same * factor
        return (self.active * factor).view(-1, *[1] * (dims - 1))


class Members:
    """The strengths of a stack's members (:class:`hnkit.stack.Stack`): a number, or a ``[B]``
    float32 CPU tensor (one per row), each. Worked out once when they are set: ``lo..hi-1``, the
    members some row uses, and ``members``: None when all of ``lo..hi-1`` are used, else the used
    ones' positions (the others are never computed, however many there are); ``s``, their strengths
    on the rows that use any (``[n, used]``, or ``[1, used]`` when no strength is per row), on the
    model's device; ``rows``, those rows (None when all are); ``batch``, the rows the per-row
    strengths are given for (None when none are)."""

    def __init__(self, values: list, device=None):
        self.values = values
        lengths = sorted({len(v) for v in values if isinstance(v, torch.Tensor)})
        if len(lengths) > 1:
            raise HnkitError(f"per-row strengths of a stack's members must be given for the same rows, got "
                             f"{' and '.join(map(str, lengths))} rows (set them together, as a dict)")
        self.batch = lengths[0] if lengths else None
        used = [i for i, v in enumerate(values) if (bool(v.any()) if isinstance(v, torch.Tensor) else v != 0)]
        self.empty = not used
        self.lo, self.hi = (used[0], used[-1] + 1) if used else (0, 0)
        contiguous = len(used) == self.hi - self.lo
        self.members = None if contiguous else torch.tensor(used, device=device)
        columns = [values[i] if isinstance(values[i], torch.Tensor)
                   else torch.full((self.batch or 1,), float(values[i])) for i in used]
        full = torch.stack(columns, dim=1) if used else torch.zeros(self.batch or 1, 0)  # [rows, used], on the CPU
        active = (full != 0).any(1).nonzero().flatten()
        self.rows = None if self.batch is None or len(active) == self.batch else active.to(device)
        self.s = (full if self.rows is None else full[active]).to(device)


def check_rows(n: int, x: torch.Tensor) -> None:
    if n != x.shape[0]:
        raise HnkitError(f"per-row strengths are given for {n} rows, but the batch has "
                         f"{x.shape[0]} (num_return_sequences, beams and classifier-free guidance "
                         "multiply the rows: give a strength for each)")


# -- an attachment's strengths, in one of two modes ---------------------------------------------
class NetworkStrengths(Strengths):
    """One strength per attached network (``values[i]`` for ``networks[i]``)."""

    def __init__(self, networks: list, values: list, device=None):
        super().__init__([strength_value(v, device) for v in values])
        self.networks = list(networks)
        self.device = device

    @property
    def labels(self) -> list[str]:
        return [hn.name for hn in self.networks]

    def as_list(self) -> list:
        """A float per network, or its ``[B]`` tensor where it is given per row."""
        return [v.s if isinstance(v, PerRow) else v for v in self.values]

    def one(self):
        if len(self.networks) != 1:
            raise HnkitError("several hypernetworks are attached: use strengths / set_strength(s, index)")
        return self.as_list()[0]

    def set(self, value, index=None) -> None:
        """Set the strength of the network at position ``index``, or of the Hypernetwork ``index``
        itself; ``index`` may be left out when only one is attached."""
        self.values[self.position(index)] = strength_value(value, self.device)

    def position(self, index) -> int:
        n = len(self.networks)
        if index is None:
            if n != 1:
                raise HnkitError("several hypernetworks are attached: name which one with index=")
            return 0
        if isinstance(index, int) and not isinstance(index, bool):
            if not -n <= index < n:
                raise HnkitError(f"index={index} is out of range: {n} hypernetwork{'s' * (n != 1)} attached")
            return index % n
        found = [i for i, hn in enumerate(self.networks) if hn is index]
        if not found:
            what = f"hypernetwork {index.name!r}" if hasattr(index, "name") else f"index={index!r}"
            raise HnkitError(f"{what} is not attached here: name a network by its position or the "
                             "Hypernetwork object attached")
        return found[0]


class MemberStrengths(Strengths):
    """A stack's strengths: ``values[0]`` is its :class:`Members`, one strength per member."""

    def __init__(self, stack: Stack, value, device=None):
        super().__init__([member_strengths(stack, value, device)])
        self.stack = stack
        self.device = device

    @property
    def labels(self) -> list[str]:
        return list(self.stack.names)

    def as_list(self) -> list:
        """A float per member, or its ``[B]`` tensor where it is given per row."""
        return list(self.values[0].values)

    def one(self):
        raise HnkitError("a stack has a strength per member: use strengths / set_strength(s, member)")

    def set(self, value, index=None) -> None:
        """Set every member (a number, or a list of one per member), the member ``index`` (a name or
        position), or those a dict ``{member: value}`` names; the others keep their strengths."""
        if index is not None:
            value = {self.stack.index(index): value}
        if isinstance(value, dict):
            value = {**dict(enumerate(self.as_list())), **{self.stack.index(k): v for k, v in value.items()}}
        self.values[0] = member_strengths(self.stack, value, self.device)


def strengths_for(entries: list, device=None) -> NetworkStrengths | MemberStrengths:
    """The strengths of ``[(hypernetwork, strength), ...]``, or of ``[(stack, strength)]``."""
    if isinstance(entries[0][0], Stack):
        (stack, value), = entries
        return MemberStrengths(stack, value, device)
    return NetworkStrengths([hn for hn, _ in entries], [s for _, s in entries], device)
