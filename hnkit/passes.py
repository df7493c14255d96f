"""Per-pass values: the one place where hnkit keeps anything derived from the hypernetworks' weights.

Some kernels need a value computed once per forward pass of the model ``attach`` was given (the
*root*), not at every site: the multiplied-out products of a :class:`hnkit.kernels.Collapsed`
kernel (shared by every site of its width) and the context results of a :class:`hnkit.kernels.Memo`
(the SD UNet hands the same text embeddings to all its cross-attention layers). :class:`Passes`
computes them in a forward pre-hook on the root, from the parameters as they are at that moment.

Why at the root: under gradient checkpointing each block's forward runs again during backward, and
that recomputation must perform the same operations as the original forward. Computed outside every
checkpointed block, the values are plain inputs to all of them, both times.

Each kernel lists the values of the passes that may still read them, newest last, and reads the
newest (docs/design.md, "Caches"). It lists them weakly (:class:`hnkit.kernels.PassValue`): what
keeps a value alive is what may still need it, so a value lives no longer than that:
- a pass holds its values while it runs (None where the product does not pay);
- then the graph of every output made from a value holds it (:func:`hnkit.kernels.held`), so a
  backward's recomputation finds it, and a pass whose outputs are dropped unused (gradients on, no
  backward) leaves nothing behind; a pass without gradients records no graph;
- a value with a graph is unlisted once autograd has computed its gradient (a hook on it: every
  recomputation that reads it is done by then), so the values of earlier passes whose backward
  has not run yet are the newest again;
- values without a graph (gradients on, the network frozen) are also held until the next pass
  starts.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from .kernels import Collapsed, Memo, PassValue

_tokens = itertools.count()


class Passes:
    def __init__(self, target, kernels):
        self.target = target
        self.memos = [k for k in kernels if isinstance(k, Memo)]
        memo_kernels = {id(m.kernel) for m in self.memos}
        # Collapsed kernels at sites fed the hidden state, and those a Memo runs once on the context.
        self.collapsed = [k for k in kernels if isinstance(k, Collapsed) and id(k) not in memo_kernels]
        self.memo_collapsed = [m.kernel for m in self.memos if isinstance(m.kernel, Collapsed)]
        self.owners = self.collapsed + self.memo_collapsed + self.memos  # every kernel with pending values
        self._open: list = []  # (value, has a graph) pushed by the passes that are running, innermost last
        self._kept: list = []  # the last pass's values without a graph (gradients on, the network frozen)

    def __bool__(self) -> bool:
        return bool(self.owners)

    def open(self, args: tuple, kwargs: dict) -> None:
        """At the start of a root pass: compute this pass's values (the products first: a memo's
        kernel may use them)."""
        self._kept = []  # the last pass's values without a graph
        for owner in self.owners:
            owner.refs = [ref for ref in owner.refs if ref() is not None]
        rows = self.target.rows(args, kwargs)
        context = self.target.context(args, kwargs) if self.target.context is not None else None
        context_rows = context.shape[:-1].numel() if context is not None else 0
        for kernel in self.collapsed:
            products = kernel.make(rows)
            self._push(kernel, products, products[0][0] if products is not None else None)
        for kernel in self.memo_collapsed:
            products = kernel.make(context_rows, sites=1)  # the memo runs it once per pass
            self._push(kernel, products, products[0][0] if products is not None else None)
        for memo in self.memos:
            results = memo.make(context)
            self._push(memo, results, results[1][0] if results is not None else None)

    def _push(self, owner, value, tensor) -> None:
        entry = PassValue(next(_tokens), value)
        ref = weakref.ref(entry)
        owner.refs.append(ref)
        graph = tensor is not None and tensor.requires_grad
        self._open.append((entry, graph))
        if graph:
            tensor.register_hook(_Drop(owner, ref))

    def close(self) -> None:
        """At the end of a root pass: its values are no longer held by the pass (without a graph,
        with gradients on: until the next pass starts)."""
        n = len(self.owners)  # open() pushed one value for each
        mine, self._open = self._open[-n:], self._open[:-n]
        if torch.is_grad_enabled():
            self._kept += [entry for entry, graph in mine if not graph]

    def clear(self) -> None:
        for owner in self.owners:
            owner.refs = []
        self._open, self._kept = [], []


class _Drop:
    """A gradient hook that unlists one pass value (its weak reference ``ref``). It holds the owner
    weakly and the value not at all: autograd keeps hooks in C++, where a reference cycle through
    the value would never be collected."""

    def __init__(self, owner, ref: weakref.ref):
        self.owner, self.ref = weakref.ref(owner), ref

    def __call__(self, grad) -> None:
        owner = self.owner()
        if owner is not None:
            owner.refs = [ref for ref in owner.refs if ref is not self.ref]
