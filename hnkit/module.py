"""The residual MLP of a hypernetwork: ``y = x + strength * mlp(x)`` (docs/design.md, "The module").

Child order inside ``self.linear`` decides the state-dict key names of the SD web UI's ``.pt``
files, so it follows that format exactly: for each step ``Linear``, then the activation (none for
"linear"/None, none on the last step unless ``activate_output``), then ``LayerNorm`` if enabled,
then ``Dropout`` only where the dropout structure is non-zero.

The module keeps nothing between calls: every output is computed from its parameters.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .errors import HnkitError

# Names the web UI accepts. "swish" is Hardswish there, not SiLU: files depend on that.
_NAMED_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
# ... plus every class of torch.nn.modules.activation under its lowercased name (gelu, silu, mish, ...).
ACTIVATIONS = {
    name.lower(): cls
    for name, cls in vars(torch.nn.modules.activation).items()
    if inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == "torch.nn.modules.activation"
}
ACTIVATIONS.update(_NAMED_ACTIVATIONS)

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def activation_name(activation: str | None) -> str | None:
    """None for no activation, which files and options also spell "linear"; else the name as given."""
    return None if activation in (None, "linear") else activation


def is_linear_activation(activation: str | None) -> bool:
    return activation_name(activation) is None


# Activations that act on each number alone, the same way every time, and hold no parameters: a layer
# of them may run over the hidden units of several networks at once (stacked, or merged side by
# side). An allow-list, so that a new torch activation is not assumed to be one (softmax, GLU and
# PReLU are not; RReLU draws a random slope in training).
ELEMENTWISE = frozenset({
    "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "gelu", "silu", "mish", "softplus", "hardtanh",
    "relu6", "selu", "celu", "softsign", "tanhshrink", "hardsigmoid", "logsigmoid", "hardswish", "softshrink",
    "hardshrink"})


def is_elementwise(activation: str | None) -> bool:
    """The one rule for stacking and merging: no activation, or one of ELEMENTWISE."""
    return is_linear_activation(activation) or activation in ELEMENTWISE


def break_even(per_row: int, once: int, d: int) -> int | None:
    """Rows (over a whole pass) from which multiplying an affine module out to one ``d x d`` matrix
    (``once`` multiply-adds) costs less than running it at ``per_row`` multiply-adds a row; None
    where it never pays (``per_row`` no more than ``d^2``)."""
    if per_row <= d * d:
        return None
    return once // (per_row - d * d) + 1


def make_activation(activation: str) -> nn.Module:
    cls = ACTIVATIONS.get(activation)
    if cls is None:
        raise HnkitError(f"unknown activation {activation!r}; known: linear, " + ", ".join(sorted(ACTIVATIONS)))
    try:
        return cls()
    except TypeError as exc:  # e.g. Threshold, MultiheadAttention need arguments
        raise HnkitError(f"activation {activation!r} cannot be used in a hypernetwork: {exc}") from None


def legacy_dropout_structure(layer_structure, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """Dropout placement of files that predate ``dropout_structure``."""
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


# Bounds far beyond any real network (the web UI's are at most [1, 4, 4, 1]): a file declaring more is
# refused before anything is built from it.
MAX_LAYERS, MAX_MULTIPLIER, MAX_WIDTH = 16, 64, 65536


def check_structure(layer_structure, dropout_structure) -> None:
    ls = list(layer_structure)
    if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1:
        raise HnkitError(f"layer_structure must start and end with 1, got {ls}")
    if any(m <= 0 for m in ls):
        raise HnkitError(f"layer_structure entries must be positive, got {ls}")
    if len(ls) > MAX_LAYERS or max(ls) > MAX_MULTIPLIER:
        raise HnkitError(f"layer_structure {ls[:8]}{'...' if len(ls) > 8 else ''} is too large (at most "
                         f"{MAX_LAYERS} entries, each at most {MAX_MULTIPLIER})")
    ds = list(dropout_structure)
    if len(ds) != len(ls):
        raise HnkitError(f"dropout_structure {ds} must have as many entries as layer_structure {ls}")
    if ds[0] != 0 or ds[-1] != 0 or any(not 0 <= p < 1 for p in ds):
        raise HnkitError(f"dropout_structure {ds} must start and end with 0, every entry in [0, 1)")


def residual_forward(module, x: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``x + strength * module.residual(x)``, every form's forward: ``strength`` a number, or a tensor
    broadcast against ``x`` (one per row: ``[B, 1, ..., 1]``). Weights stay in their own dtype (fp32);
    the input is cast at the edges, so a half-precision base works."""
    h = x if x.dtype == module.dtype else x.to(module.dtype)
    if isinstance(strength, torch.Tensor):
        out = torch.addcmul(h, strength.to(module.dtype), module.residual(h))
    else:
        out = torch.add(h, module.residual(h), alpha=strength)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class HypernetworkModule(nn.Module):
    """``y = x + strength * mlp(x)`` for inputs of width ``dim``: the form "mlp", the web UI's
    (the interface every form provides: :mod:`hnkit.forms`)."""

    form = "mlp"
    webui_format = True  # the web UI's .pt holds it
    is_stack = False

    def __init__(
        self,
        dim: int,
        layer_structure=(1, 2, 1),
        activation: str | None = None,
        layer_norm: bool = False,
        dropout_structure=None,
        activate_output: bool = False,
        weight_init: str = "Normal",
        zero_init_last: bool = False,
    ):
        super().__init__()
        if dropout_structure is None:
            dropout_structure = [0.0] * len(layer_structure)
        check_structure(layer_structure, dropout_structure)
        if weight_init not in WEIGHT_INITS:
            raise HnkitError(f"unknown weight initialization {weight_init!r}; known: {', '.join(WEIGHT_INITS)}")
        if not is_linear_activation(activation):
            make_activation(activation)  # an unknown name is an error even where no layer uses it
        self.dim = dim
        n = len(layer_structure) - 1
        layers: list[nn.Module] = []
        for i in range(n):
            d_out = int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(int(dim * layer_structure[i]), d_out))
            if not is_linear_activation(activation) and (i < n - 1 or activate_output):
                layers.append(make_activation(activation))
            if layer_norm:
                layers.append(nn.LayerNorm(d_out))
            if dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=float(dropout_structure[i + 1])))
        self.linear = nn.Sequential(*layers)
        self._init_weights(weight_init, activation, zero_init_last)

    # -- what a config says about the form (hnkit.forms) ------------------------------------------
    @classmethod
    def from_config(cls, config, width: int) -> "HypernetworkModule":
        return cls(width, config.layer_structure, config.activation, config.layer_norm, config.dropout_structure,
                   config.activate_output, config.weight_init, config.zero_init_last)

    @staticmethod
    def config_is_linear(config) -> bool:
        return is_linear_activation(config.activation) and not config.layer_norm

    @staticmethod
    def signature(config) -> tuple:
        """What two configs must share for their modules to compute alike (given the width)."""
        return (list(config.layer_structure), activation_name(config.activation), config.layer_norm,
                config.activate_output)

    @staticmethod
    def stack_problem(config) -> str | None:
        """Why networks of this config cannot be stacked, or None."""
        if len(config.layer_structure) != 3 or config.layer_norm or config.activate_output:
            return "only two-layer networks ([1, m, 1]) without layer norm or an activated output can"
        if not is_elementwise(config.activation):
            return f"its activation {config.activation!r} does not act on each hidden unit alone"
        return None

    @torch.no_grad()
    def _init_weights(self, weight_init: str, activation: str | None, zero_init_last: bool) -> None:
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if isinstance(layer, nn.LayerNorm) or (isinstance(layer, nn.Linear) and weight_init == "Normal"):
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            elif isinstance(layer, nn.Linear) and weight_init == "XavierUniform":
                nn.init.xavier_uniform_(layer.weight)
            elif isinstance(layer, nn.Linear) and weight_init == "XavierNormal":
                nn.init.xavier_normal_(layer.weight)
            elif isinstance(layer, nn.Linear) and weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
            elif isinstance(layer, nn.Linear) and weight_init == "KaimingNormal":
                nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
            else:
                continue
            nn.init.zeros_(layer.bias)
        if zero_init_last:
            last = [m for m in self.linear if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.linear[0].weight.dtype

    @property
    def is_affine(self) -> bool:
        """Only Linear layers (and Dropout, the identity at inference): ``mlp(x) = x @ M.T + c``."""
        return all(isinstance(m, (nn.Linear, nn.Dropout)) for m in self.linear)

    @property
    def has_dropout(self) -> bool:
        return any(isinstance(m, nn.Dropout) for m in self.linear)

    @property
    def stack_activation(self) -> str | None:
        """The name of the activation between the layers (None: none), as ``stack_weights()`` needs it."""
        acts = [m for m in self.linear if not isinstance(m, (nn.Linear, nn.LayerNorm, nn.Dropout))]
        return type(acts[0]).__name__.lower() if acts else None

    def linear_layers(self) -> list[nn.Linear]:
        """The Linear layers, in order (what an MLP merge puts side by side: hnkit.merge)."""
        return [m for m in self.linear if isinstance(m, nn.Linear)]

    def break_even_rows(self) -> int | None:
        """Rows over a pass from which multiplying the layers out first pays (:func:`break_even`):
        the product costs a ``d x d`` product per layer after the first. None where not affine."""
        if not self.is_affine:
            return None
        linears, d = self.linear_layers(), self.dim
        per_row = sum(m.in_features * m.out_features for m in linears)
        once = sum(m.out_features * m.in_features * d for m in linears[1:])
        return break_even(per_row, once, d)

    def stack_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1 [H, D], b1 [H], w2 [D, H], b2 [D])`` with ``mlp(x) = w2 act(w1 x + b1) + b2``, ``act``
        the ``stack_activation`` (dropout left out, as at inference)."""
        layers, linears = list(self.linear), self.linear_layers()
        after_last = layers[layers.index(linears[-1]) + 1:]
        if (len(linears) != 2 or any(isinstance(m, nn.LayerNorm) for m in layers)
                or not all(isinstance(m, nn.Dropout) for m in after_last)):
            raise HnkitError("only two-layer modules ([1, m, 1]) without layer norm or an activated output can "
                             "be stacked")
        first, last = linears
        return first.weight, first.bias, last.weight, last.bias

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """``mlp(h)`` for ``h`` already in the module's dtype."""
        for layer in self.linear:
            h = layer.forward(h)  # forward(): runs at every layer and token, no nn.Module.__call__ per child
        return h

    def forward(self, x: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``x + strength * mlp(x)``; ``strength`` a number, or a tensor broadcast against ``x``
        (a strength per row: ``[B, 1, ..., 1]``)."""
        return residual_forward(self, x, strength)

    def affine(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` with ``mlp(x) = x @ M.T + c``, for a module of Linear layers only (dropout
        counts as the identity, as at inference), in ``dtype`` if given. Differentiable: gradients
        reach every layer."""
        m = c = None
        for layer in self.linear:
            if isinstance(layer, nn.Linear):
                w, b = (layer.weight, layer.bias) if dtype is None else (layer.weight.to(dtype), layer.bias.to(dtype))
                m, c = (w, b) if m is None else (w @ m, torch.addmv(b, w, c))
            elif not isinstance(layer, nn.Dropout):
                raise HnkitError(f"a {type(layer).__name__} layer is not linear: only hypernetworks without "
                                 "activation and layer norm are an affine map")
        return m, c
