"""Fast path for a site's K and V modules: a few large kernels instead of many small ones.

Every attention layer runs its K and V modules on the same tensor: ``Linear, act, Linear, add`` for
K and again for V. When both modules of a pair are ``Linear -> [ReLU] -> Linear`` (the per-site
bottleneck ``[1, m, 1]`` and the web UI's default ``[1, 2, 1]``, relu or linear), :class:`PackedPair`
computes K's and V's inputs together::

    a = act(x @ W1.T + b1)          W1 = [W1_k; 0; W1_v; 0]   b1 = [b1_k; 1, 0..; b1_v; 1, 0..]
    k = x + s * a_k @ W2_k          W2_k = [W2_k | b2_k | 0..].T      (and v from a_v, W2_v)

- one ``addmm`` covers both first layers; a constant column (a zero weight row with bias 1, and
  act(1) = 1 for relu and linear) carries each second layer's bias through its product;
- each half of ``a`` is padded with zero columns to a multiple of 16: BLAS kernels run several
  times faster on such shapes than on odd ones (on a CPU a [512, 576] x [576, 11] product takes
  3.5x the time of a [576, 16] one), as nanoGPT pads its vocabulary;
- without gradients, one batched ``baddbmm`` covers both second layers and the packed weights are
  kept, rebuilt whenever a parameter changes (an optimizer step, ``load_state_dict``, ``.to()``:
  ``HypernetworkModule.weights_key``);
- with gradients, the packed weights are built from the parameters in every call (a few small
  ``cat``s), so gradients reach every parameter, and each second layer is one ``addmm``.

The values are the modules' own up to float rounding (the bias is summed inside the product).
"""

from __future__ import annotations

import torch
from torch import nn

ALIGN = 16  # each half of the packed hidden width is a multiple of this


def _layers(module) -> tuple[nn.Linear, nn.Linear, bool] | None:
    """``(first, last, relu)`` for a module of the form Linear -> [ReLU] -> [Dropout] -> Linear."""
    steps = [m for m in module._steps if not isinstance(m, nn.Dropout)]  # identity in eval mode
    if len(steps) == 2 and all(type(m) is nn.Linear for m in steps):
        return steps[0], steps[1], False
    if len(steps) == 3 and type(steps[0]) is nn.Linear and type(steps[1]) is nn.ReLU and type(steps[2]) is nn.Linear:
        return steps[0], steps[2], True
    return None


class PackedPair:
    """K's and V's modules of one pair, packed. ``PackedPair.of(k, v)`` gives None when the modules
    do not have the supported form. The caller checks that no dropout is active (see ``usable``)."""

    def __init__(self, k_module, v_module, k_layers, v_layers, relu: bool):
        self.modules = (k_module, v_module)
        self.relu = relu
        self.layers = (*k_layers, *v_layers)  # the Linear layers; their parameters are read per call
        k1 = k_layers[0]
        hidden = k1.out_features + 1  # the hidden width and the constant column
        self.width = -(-hidden // ALIGN) * ALIGN
        self._key = None

    @classmethod
    def of(cls, k_module, v_module) -> "PackedPair | None":
        k, v = _layers(k_module), _layers(v_module)
        if k is None or v is None or k[2] != v[2]:
            return None
        if k[0].out_features != v[0].out_features or k[0].in_features != v[0].in_features:
            return None
        return cls(k_module, v_module, k[:2], v[:2], k[2])

    def usable(self) -> bool:
        """False while a module is in training mode with dropout: that needs the modules' own forward."""
        return not any(m.dropout_active for m in self.modules)

    def _build(self):
        """``(W1.T, b1, W2_k, W2_v)`` from the parameters: differentiable when gradients are on."""
        w1k, b1k, w2k, b2k, w1v, b1v, w2v, b2v = (p for layer in self.layers for p in layer._parameters.values())
        pad = self.width - w1k.shape[0]  # >= 1: the constant column and the zero padding
        zeros = w1k.new_zeros(pad, w1k.shape[1])
        const = b1k.new_zeros(pad)
        const[0] = 1
        w1t = torch.cat([w1k, zeros, w1v, zeros]).t()  # [d, 2 * width]
        b1 = torch.cat([b1k, const, b1v, const])
        cols = w2k.new_zeros(w2k.shape[0], pad - 1)
        w2k = torch.cat([w2k, b2k[:, None], cols], 1).t()  # [width, d]
        w2v = torch.cat([w2v, b2v[:, None], cols], 1).t()
        return w1t, b1, w2k, w2v

    def _kept(self):
        key = [m.weights_key() for m in self.modules]  # see HypernetworkModule.weights_key
        if key != self._key:
            with torch.no_grad():
                w1t, b1, w2k, w2v = self._build()
                self.w1t, self.b1 = w1t, b1
                self.w2 = torch.stack([w2k, w2v])  # [2, width, d], for one baddbmm
            self._key = key
        return self.w1t, self.b1, self.w2

    def __call__(self, x: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + strength * mlp_k(x), x + strength * mlp_v(x))``, computed in the modules' dtype
        and returned in ``x``'s."""
        grad = torch.is_grad_enabled()
        if grad:
            w1t, b1, w2k, w2v = self._build()
        else:
            w1t, b1, w2 = self._kept()
        h = x if x.dtype == w1t.dtype else x.to(w1t.dtype)
        flat = h.reshape(-1, h.shape[-1])
        width = self.width
        a = torch.addmm(b1, flat, w1t)
        if self.relu:
            a = a.relu_()  # in place is fine for autograd too: addmm keeps its inputs, not its output
        if grad:
            k = torch.addmm(flat, a[:, :width], w2k, alpha=strength).view(h.shape)
            v = torch.addmm(flat, a[:, width:], w2v, alpha=strength).view(h.shape)
        else:
            out = torch.baddbmm(flat, a.view(-1, 2, width).transpose(0, 1), w2, alpha=strength)
            k, v = out.view(2, *h.shape).unbind(0)
        if k.dtype != x.dtype:
            k, v = k.to(x.dtype), v.to(x.dtype)
        return k, v
