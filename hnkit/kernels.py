"""Site kernels: what one attention site does to its K/V input while hypernetworks are attached.

A kernel is called as ``kernel(x, which)`` with ``which`` 0 for K's input and 1 for V's, and
returns ``x + s * mlp(x)`` (or ``x`` itself when every effective strength is 0, so the site runs the
model's own code). The effective strength of a network at a site is its strength (changed in place
through the Attachment), times the site's layer factor, times the schedule's factor of the current
pass. The kind of kernel is chosen once, when attaching (:func:`make_kernel`):

- :class:`Chain`: the networks one after the other (the web UI's way; also one network alone);
- :class:`Sum`: ``x + sum_i s_i * mlp_i(x)``, each network on the unmodified input;
- :class:`Collapsed`: one affine network whose modules say multiplying out pays
  (``break_even_rows()``, :mod:`hnkit.forms`; the web UI's ``[1, 2, 1]`` linear): in a forward
  pass with enough rows, ``mlp(x) = x @ M.T + c`` with ``M`` multiplied out once for the whole
  pass (:mod:`hnkit.passes`), a quarter of the arithmetic at every row;
- :class:`Stacked`: the members of a :class:`hnkit.stack.Stack`, summed with two matrix products
  over the members that some row uses (strengths per member: :class:`hnkit.strengths.Members`);
- :class:`Memo` wraps the kernel of a site fed the model call's context (the SD UNet's
  cross-attention): its result for that tensor is computed once per pass (:mod:`hnkit.passes`).

Kernels are pure functions of the parameters, the strengths and what the pass machinery set for the
current pass, so gradient checkpointing can run them again in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .strengths import PerRow, Strengths, check_rows


def run_rows(module, x: torch.Tensor, strength: PerRow, factor: float) -> torch.Tensor:
    """``module.forward`` on the rows of ``x`` whose strength is not 0, each at its own strength
    times ``factor``; the other rows are returned untouched (gathered and scattered, as multi-LoRA
    servers do)."""
    check_rows(len(strength.s), x)
    if strength.empty or factor == 0:
        return x
    s = strength.scaled(factor, x.dim())
    if strength.rows is None:
        return module.forward(x, s)
    return x.index_copy(0, strength.rows, module.forward(x.index_select(0, strength.rows), s))


class Chain:
    """Computes ``x <- x + s_i * f_i(x)`` for each network ``i`` in turn (its K or V module).

    ``s_i`` is the network's strength times the layer factor and the schedule's factor; a network
    at 0 is skipped, and one with a strength per row runs on its rows only (:func:`run_rows`)."""

    def __init__(self, entries, strengths: Strengths):
        self.entries = entries  # [(index of the network, (k_module, v_module), layer factor)]
        self.strengths = strengths
        self.by_network = {entry[0]: entry for entry in entries}

    def active(self) -> list:
        """The entries whose strength is not 0 (a per-row strength counts as not 0), in order:
        found from the site's entries or from the strengths not 0, whichever are fewer."""
        nonzero = self.strengths.values.nonzero
        if len(nonzero) >= len(self.entries):
            return [entry for entry in self.entries if entry[0] in nonzero]
        return [self.by_network[i] for i in sorted(nonzero) if i in self.by_network]

    def __call__(self, x: torch.Tensor, which: int) -> torch.Tensor:
        values, scale = self.strengths.values, self.strengths.scale
        for i, pair, factor in self.active():
            if isinstance(values[i], PerRow):
                x = run_rows(pair[which], x, values[i], factor * scale)
                continue
            s = values[i] * factor * scale
            if s != 0:
                x = pair[which].forward(x, s)  # forward(): no nn.Module.__call__ at every layer and token
        return x


class Sum(Chain):
    """Computes ``x + sum_i s_i * f_i(x)``, every ``f_i`` on the unmodified ``x``.

    Added left to right in the first module's dtype (fp32) and cast back at the end, as a module's
    forward does (hnkit.forms)."""

    def __call__(self, x: torch.Tensor, which: int) -> torch.Tensor:
        values, scale = self.strengths.values, self.strengths.scale
        entries = self.active()
        if any(isinstance(values[i], PerRow) for i, _, _ in entries):
            return self.per_row(x, which)
        active = [(pair[which], values[i] * factor * scale) for i, pair, factor in entries]
        active = [(module, s) for module, s in active if s != 0]
        if not active:
            return x
        dtype = active[0][0].dtype
        h = x if x.dtype == dtype else x.to(dtype)
        out = h
        for module, s in active:
            y = module.residual(h if module.dtype == dtype else h.to(module.dtype))
            out = torch.add(out, y if y.dtype == dtype else y.to(dtype), alpha=s)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def per_row(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """As above with some strengths given per row: each network's residual is computed on the
        rows that use it and added to those rows only."""
        values, scale = self.strengths.values, self.strengths.scale
        dtype = self.entries[0][1][which].dtype
        h = x if x.dtype == dtype else x.to(dtype)
        out = None  # a copy of h, made when a first residual is added to it
        for i, pair, factor in self.active():
            module, v, f = pair[which], values[i], factor * scale
            if isinstance(v, PerRow):
                check_rows(len(v.s), x)
                if v.empty or f == 0:
                    continue
                s, rows = v.scaled(f, x.dim()), v.rows
            elif v * f != 0:
                s, rows = v * f, None
            else:
                continue
            hm = h if module.dtype == dtype else h.to(module.dtype)
            y = module.residual(hm if rows is None else hm.index_select(0, rows))
            y = y if y.dtype == dtype else y.to(dtype)
            out = h.clone() if out is None else out
            if isinstance(s, torch.Tensor):
                y, s = y * s, 1.0
            if rows is None:
                out.add_(y, alpha=s)
            else:
                out.index_add_(0, rows, y, alpha=s)
        if out is None:
            return x
        return out if out.dtype == x.dtype else out.to(x.dtype)


class PassValue:
    """One pass's value for one kernel (:mod:`hnkit.passes`): ``value``, None where the kernel
    computes without one in that pass. Kernels list theirs weakly (``refs``); the pass holds it while
    it runs, then the graph of each output that read it (:func:`held`)."""

    def __init__(self, token: int, value):
        self.token, self.value = token, value


def live(refs: list):
    """The PassValues still alive among the weak references ``refs``, newest first."""
    for ref in reversed(refs):
        entry = ref()
        if entry is not None:
            yield entry


def pending_values(refs: list) -> list:
    """``[(token, value)]`` of the live PassValues, newest last (to inspect a kernel)."""
    return [(entry.token, entry.value) for entry in reversed(list(live(refs)))]


def held(y: torch.Tensor, entry: PassValue) -> torch.Tensor:
    """``y`` (read from ``entry``'s value), or where it records a graph a view of it whose backward
    node holds ``entry``: a value then lives as long as the graph of any output made from it, which
    is as long as a backward may recompute with it (gradient checkpointing), and no longer."""
    if not (y.requires_grad and torch.is_grad_enabled()):
        return y
    y = y.view_as(y)
    y.grad_fn.register_prehook(_Hold(entry))
    return y


class _Hold:
    """A backward pre-hook that does nothing: it holds ``entry`` for as long as its node lives."""

    def __init__(self, entry: PassValue):
        self.entry = entry

    def __call__(self, grad_outputs) -> None:
        return None


class Collapsed(Chain):
    """Computes ``x + s * (x @ M.T + c)`` for one affine network, ``(M, c)`` multiplied out once per pass.

    For a network whose layers widen its input. Its value for a pass (:mod:`hnkit.passes`)
    is ``((M_k, c_k), (M_v, c_v))`` when the pass's rows times ``sites`` (the sites that share this
    kernel) reach ``break_even``, None otherwise: then the modules run as in Chain."""

    def __init__(self, entries, strengths: Strengths):
        super().__init__(entries, strengths)
        (_, pair, _), = entries
        self.pair = pair
        self.break_even = pair[0].break_even_rows()
        self.sites = 1  # set by attach
        self.refs = []  # weak references to the PassValues of passes that may still read them, newest last

    @property
    def pending(self) -> list:  # [(token, value)], newest last
        return pending_values(self.refs)

    def make(self, rows: int, sites: int | None = None):
        """This kernel's value for a pass of ``rows`` rows per site: the products if they pay."""
        if rows * (self.sites if sites is None else sites) < self.break_even:
            return None
        return tuple(m.affine() for m in self.pair)

    def __call__(self, x: torch.Tensor, which: int) -> torch.Tensor:
        (i, pair, factor), = self.entries
        if isinstance(self.strengths.values[i], PerRow):
            return Chain.__call__(self, x, which)  # the layers row by row: the products serve one strength
        s = self.strengths.values[i] * factor * self.strengths.scale
        if s == 0:
            return x
        entry = next(live(self.refs), None)  # the newest
        if entry is None or entry.value is None:
            return pair[which].forward(x, s)
        m, c = entry.value[which]
        h = x if x.dtype == m.dtype else x.to(m.dtype)
        out = torch.add(h, F.linear(h, m, c), alpha=s)
        return held(out if out.dtype == x.dtype else out.to(x.dtype), entry)


class Stacked:
    """Computes ``x + f * sum_i s_i * f_i(x)`` over a stack's members with two matrix products.

    ``s_i`` is member ``i``'s strength on each row, ``f`` the layer factor times the schedule's;
    only the rows that use any member are computed, the others are returned untouched."""

    def __init__(self, entries, strengths: Strengths):
        (self.index, self.pair, self.factor), = entries
        self.entries = entries
        self.strengths = strengths

    def __call__(self, x: torch.Tensor, which: int) -> torch.Tensor:
        members, f = self.strengths.values[self.index], self.factor * self.strengths.scale
        if members.empty or f == 0:
            return x
        if members.batch is not None:
            check_rows(members.batch, x)
        module = self.pair[which]
        h = x if x.dtype == module.dtype else x.to(module.dtype)
        part = h if members.rows is None else h.index_select(0, members.rows)
        out = torch.add(part, module.mix(part, members.s, members.lo, members.hi, members.members), alpha=f)
        if members.rows is not None:
            out = h.index_copy(0, members.rows, out)
        return out if out.dtype == x.dtype else out.to(x.dtype)


class Memo:
    """Computes ``kernel(context)`` once per pass, for the sites fed the model call's context.

    Its value for a pass (:mod:`hnkit.passes`)
    is ``(context, (k_input, v_input))``, returned when the site's input *is* that tensor; any other
    input is computed by the kernel."""

    def __init__(self, kernel: Chain, width: int):
        self.kernel = kernel
        self.width = width
        self.refs = []  # weak references to PassValues, newest last

    @property
    def pending(self) -> list:  # [(token, value)], newest last
        return pending_values(self.refs)

    def make(self, context: torch.Tensor | None):
        """K's and V's input for the context, computed once for the pass, unless a module would draw
        random numbers (dropout in training: each layer draws its own mask, as in the web UI)."""
        if context is None or context.shape[-1] != self.width:
            return None
        if any(m.training and m.has_dropout for _, pair, _ in self.kernel.entries for m in pair):
            return None
        return context, (self.kernel(context, 0), self.kernel(context, 1))

    def __call__(self, x: torch.Tensor, which: int) -> torch.Tensor:
        for entry in live(self.refs):
            if entry.value is not None and entry.value[0] is x:
                return held(entry.value[1][which], entry)
        return self.kernel(x, which)


def make_kernel(entries, strengths: Strengths, blend: str, fast: bool = True) -> Chain:
    """The kernel for a site's ``[(index, (k_module, v_module), factor)]``, chosen once. With
    ``fast=False`` a single network runs its modules' own forward (Chain), never Collapsed."""
    if entries[0][1][0].is_stack:
        return Stacked(entries, strengths)
    if len(entries) > 1:
        return Sum(entries, strengths) if blend == "sum" else Chain(entries, strengths)
    (_, (k, v), _), = entries
    if (fast and not (k.has_dropout or v.has_dropout)
            and k.break_even_rows() is not None and v.break_even_rows() is not None):
        return Collapsed(entries, strengths)
    return Chain(entries, strengths)
