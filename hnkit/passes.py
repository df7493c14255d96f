"""Per-pass values: the one place where hnkit keeps anything derived from the hypernetworks' weights.

Some kernels need a value computed once per forward pass of the model ``attach`` was given (the
*root*), not at every site: the multiplied-out products of a :class:`hnkit.kernels.Collapsed`
kernel (shared by every site of its width) and the context results of a :class:`hnkit.kernels.Memo`
(the SD UNet hands the same text embeddings to all its cross-attention layers). :class:`Passes`
computes them in a forward pre-hook on the root, from the parameters as they are at that moment.

Why at the root: under gradient checkpointing each block's forward runs again during backward, and
that recomputation must perform the same operations as the original forward. Computed outside every
checkpointed block, the values are plain inputs to all of them, both times.

Each kernel keeps a short list of pending values, newest last, and reads the newest (docs/design.md,
"Caches"):
- a pass pushes its value (None where the product does not pay) at its start;
- a pass that recorded no graph (no gradients) removes its own value at its end, so the values of
  earlier passes with gradients, whose backward has not run yet, are current again;
- a value with a graph is removed once autograd has computed its gradient (a hook on it: every
  recomputation that reads it is done by then);
- values without a graph that outlived their pass (gradients on, the network frozen) are removed
  at the start of the next pass.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from .kernels import Collapsed, Memo

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
        self._open: list = []  # (owner, token) pushed by the passes that are running, innermost last

    def __bool__(self) -> bool:
        return bool(self.owners)

    def open(self, args: tuple, kwargs: dict) -> None:
        """At the start of a root pass: compute this pass's values (the products first: a memo's
        kernel may use them)."""
        for owner in self.owners:  # values without a graph that outlived their pass
            owner.pending = [entry for entry in owner.pending if entry[2] is not None and entry[2].requires_grad]
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
        token = next(_tokens)
        owner.pending.append((token, value, tensor))
        self._open.append((owner, token))
        if tensor is not None and tensor.requires_grad:
            tensor.register_hook(_Drop(owner, token))

    def close(self) -> None:
        """At the end of a root pass: without a graph no backward can need this pass's values."""
        n = len(self.owners)  # open() pushed one value for each
        mine, self._open = self._open[-n:], self._open[:-n]
        if not torch.is_grad_enabled():
            for owner, token in mine:
                _remove(owner, token)

    def clear(self) -> None:
        for owner in self.owners:
            owner.pending = []
        self._open = []


class _Drop:
    """A gradient hook that removes one pending value. It holds the owner weakly and the value not
    at all: autograd keeps hooks in C++, where a reference cycle through the value would never be
    collected."""

    def __init__(self, owner, token: int):
        self.owner, self.token = weakref.ref(owner), token

    def __call__(self, grad) -> None:
        owner = self.owner()
        if owner is not None:
            _remove(owner, self.token)


def _remove(owner, token: int) -> None:
    owner.pending = [entry for entry in owner.pending if entry[0] != token]
