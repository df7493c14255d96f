"""Inference fast path: a site's K and V modules in two kernels instead of eight.

Generating text at batch 1 runs every hypernetwork module on one token at a time, where the cost
is the number of operator calls, not arithmetic: ``Linear, ReLU, Linear, add`` for K and again for
V, at every layer, for every token. When both modules of a pair are ``Linear -> [ReLU] -> Linear``
(the per-site bottleneck ``[1, m, 1]`` and the web UI's default ``[1, 2, 1]``, relu or linear),
:class:`PackedPair` computes K's and V's inputs together::

    a      = act(x @ W1.T + b1)          W1 = [W1_k; 0; W1_v; 0]   b1 = [b1_k; 1; b1_v; 1]
    (k, v) = x + s * a_pair @ W2_pair    W2_pair = [[W2_k | b2_k].T, [W2_v | b2_v].T]

one ``addmm`` and one batched ``baddbmm``. The constant column (a zero weight row with bias 1, and
act(1) = 1 for relu and linear) carries each second layer's bias through the product. The values
are the modules' own up to float rounding (the bias is summed inside the product).

The packed weights are built from the modules' parameters and rebuilt whenever one of them changes
(an optimizer step, ``load_state_dict``, a move to another device or dtype).
"""

from __future__ import annotations

import torch
from torch import nn


def _layers(module) -> tuple[nn.Linear, nn.Linear, bool] | None:
    """``(first, last, relu)`` for a module of the form Linear -> [ReLU] -> [Dropout] -> Linear."""
    steps = [m for m in module._steps if not isinstance(m, nn.Dropout)]  # identity in eval mode
    if len(steps) == 2 and all(type(m) is nn.Linear for m in steps):
        return steps[0], steps[1], False
    if len(steps) == 3 and type(steps[0]) is nn.Linear and type(steps[1]) is nn.ReLU and type(steps[2]) is nn.Linear:
        return steps[0], steps[2], True
    return None


class PackedPair:
    """K's and V's modules of one pair, packed for no-grad forward passes. ``PackedPair.of(k, v)``
    gives None when the modules do not have the supported form."""

    def __init__(self, k_layers, v_layers, relu: bool):
        self.relu = relu
        (k1, k2), (v1, v2) = k_layers, v_layers
        self.params = (k1.weight, k1.bias, k2.weight, k2.bias, v1.weight, v1.bias, v2.weight, v2.bias)
        self.width = k1.out_features + 1  # the hidden width and the constant column
        self._key = None

    @classmethod
    def of(cls, k_module, v_module) -> "PackedPair | None":
        k, v = _layers(k_module), _layers(v_module)
        if k is None or v is None or k[2] != v[2]:
            return None
        if k[0].out_features != v[0].out_features or k[0].in_features != v[0].in_features:
            return None
        return cls(k[:2], v[:2], k[2])

    def _weights(self):
        # In-place changes bump a tensor's version counter; .to() or a new storage changes the
        # address (all parameters of a module move together: one address per module is checked).
        # Writes through ``.data`` are not counted by PyTorch, and are not seen here either.
        params = self.params
        key = [p._version for p in params]
        key += (params[0].data_ptr(), params[4].data_ptr())
        if key != self._key:
            with torch.no_grad():
                w1k, b1k, w2k, b2k, w1v, b1v, w2v, b2v = self.params
                zero, one = w1k.new_zeros(1, w1k.shape[1]), b1k.new_ones(1)
                self.w1t = torch.cat([w1k, zero, w1v, zero]).t()  # [d, 2 * width]
                self.b1 = torch.cat([b1k, one, b1v, one])
                self.w2 = torch.stack([torch.cat([w2k, b2k[:, None]], 1).t(),
                                       torch.cat([w2v, b2v[:, None]], 1).t()]).contiguous()  # [2, width, d]
            self._key = key
        return self.w1t, self.b1, self.w2

    def __call__(self, x: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + strength * mlp_k(x), x + strength * mlp_v(x))``, computed in the modules' dtype
        and returned in ``x``'s."""
        w1t, b1, w2 = self._weights()
        h = x if x.dtype == w1t.dtype else x.to(w1t.dtype)
        flat = h.reshape(-1, h.shape[-1])
        a = torch.addmm(b1, flat, w1t)
        if self.relu:
            a = a.relu_()
        out = torch.baddbmm(flat, a.view(-1, 2, self.width).transpose(0, 1), w2, alpha=strength)
        k, v = out.view(2, *h.shape).unbind(0)
        if k.dtype != x.dtype:
            k, v = k.to(x.dtype), v.to(x.dtype)
        return k, v
