"""Per-pass values: the one place where hnkit keeps anything derived from the hypernetworks' weights.

Some kernels need a value computed once per forward pass of the model ``attach`` was given (the
*root*), not at every site: the multiplied-out products of a :class:`hnkit.kernels.Collapsed`
kernel (shared by every site of its width) and the context results of a :class:`hnkit.kernels.Memo`
(the SD UNet hands the same text embeddings to all its cross-attention layers). :class:`Passes`
computes them in a forward pre-hook on the root, from the parameters as they are at that moment.

Why at the root: under gradient checkpointing each block's forward runs again during backward, and
that recomputation must perform the same operations as the original forward. Computed outside every
checkpointed block, the values are plain inputs to all of them, both times.

Their lifetime (docs/design.md, "Caches"):
- made at the start of a root pass, from the current parameters and strengths;
- dropped at the end of that pass when it recorded no graph (no gradients: inference, generation);
- with gradients, kept for the backward's recomputations and dropped once autograd has computed their
  gradient (a hook on the value), or at the start of the next pass, whichever comes first.
Weights cannot change between a forward and its backward (autograd itself would refuse the
in-place change), so no value outlives the weights it was made from.
"""

from __future__ import annotations

import torch

from .kernels import Collapsed, Memo


class Passes:
    def __init__(self, target, kernels):
        self.target = target
        self.collapsed = [k for k in kernels if isinstance(k, Collapsed)]
        self.memos = [k for k in kernels if isinstance(k, Memo)]
        self.collapsed += [m.kernel for m in self.memos if isinstance(m.kernel, Collapsed)
                           and m.kernel not in self.collapsed]

    def __bool__(self) -> bool:
        return bool(self.collapsed or self.memos)

    def open(self, args: tuple, kwargs: dict) -> None:
        """At the start of a root pass: compute this pass's values (the products first: a memo's
        kernel may use them)."""
        rows = self.target.rows(args, kwargs)
        for kernel in self.collapsed:
            kernel.prepare(rows)
            if kernel.products is not None:
                _drop_after_backward(kernel, "products", kernel.products, kernel.products[0][0])
        context = self.target.context(args, kwargs) if self.target.context is not None else None
        for memo in self.memos:
            memo.prepare(context)
            if memo.results is not None:
                _drop_after_backward(memo, "results", memo.results, memo.results[1][0])

    def close(self) -> None:
        """At the end of a root pass: without a graph no backward can need the values."""
        if not torch.is_grad_enabled():
            self.clear()

    def clear(self) -> None:
        for kernel in self.collapsed:
            kernel.products = None
        for memo in self.memos:
            memo.results = None


def _drop_after_backward(owner, name: str, value, tensor: torch.Tensor) -> None:
    """Set ``owner.<name>`` to None once autograd has computed the gradient of ``tensor`` (all
    recomputations that read ``value`` are done by then), unless it holds another value by then."""
    if not tensor.requires_grad:
        return

    def drop(grad):
        if getattr(owner, name) is value:
            setattr(owner, name, None)

    tensor.register_hook(drop)
