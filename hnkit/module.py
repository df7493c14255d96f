"""The residual MLP of a hypernetwork (DESIGN.md section 2).

Child order inside ``self.linear`` decides the state-dict key names of the SD web UI's ``.pt``
files, so it follows that format exactly: for each step ``Linear``, then the activation (none for
"linear"/None, none on the last step unless ``activate_output``), then ``LayerNorm`` if enabled,
then ``Dropout`` only where the dropout structure is non-zero.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
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


def is_linear_activation(activation: str | None) -> bool:
    return activation is None or activation == "linear"


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


def check_structure(layer_structure, dropout_structure) -> None:
    ls = list(layer_structure)
    if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1:
        raise HnkitError(f"layer_structure must start and end with 1, got {ls}")
    if any(m <= 0 for m in ls):
        raise HnkitError(f"layer_structure entries must be positive, got {ls}")
    ds = list(dropout_structure)
    if len(ds) != len(ls):
        raise HnkitError(f"dropout_structure {ds} must have as many entries as layer_structure {ls}")
    if ds[0] != 0 or ds[-1] != 0 or any(not 0 <= p < 1 for p in ds):
        raise HnkitError(f"dropout_structure {ds} must start and end with 0, every entry in [0, 1)")


def _collapse_rows(layers, dim: int) -> int | None:
    """For a chain of Linear layers (with Dropout between, identity in eval mode), the number of
    input rows from which multiplying the weights into one ``dim x dim`` matrix first is cheaper
    than applying the layers row by row; None for any other module.

    The web UI's default ``[1, 2, 1]`` linear applies ``4 d^2`` multiply-adds per row; the product
    ``W2 @ W1`` costs ``2 d^3`` once per call and ``d^2`` per row, so from ``2d/3`` rows on (213 rows
    at d = 320: every 64 x 64 latent in SD) it does a quarter of the work, in backward too."""
    if not all(isinstance(m, (nn.Linear, nn.Dropout)) for m in layers):
        return None
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    per_row = sum(m.in_features * m.out_features for m in linears)
    once = sum(m.out_features * m.in_features * dim for m in linears[1:])
    if per_row <= dim * dim:
        return None
    return once // (per_row - dim * dim) + 1


def tensors_key(tensors) -> list:
    """A signature of some tensors that changes whenever one of them does (see
    :meth:`HypernetworkModule.weights_key`): object, in-place version, storage address."""
    return [(id(t), t._version, t.data_ptr()) for t in tensors]


_step_hook = None


def watch_optimizer_steps() -> None:
    """Make every optimizer step count as an in-place change of the parameters it updates, so that
    :meth:`HypernetworkModule.weights_key` sees it. PyTorch's fused optimizers (``AdamW(fused=True)``,
    which hnkit's trainer uses) write the parameters without bumping their version counters, and
    weights kept for calls without gradients would otherwise outlive a training step (a validation
    pass would see the weights of the first one). Registered once, for the whole process, by
    ``hnkit.attach``: after the step of a fused optimizer, or of one from outside ``torch.optim``,
    the version of each of its parameters goes up by one, as PyTorch's own in-place ops do."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_step)


def _count_step(optimizer, args, kwargs) -> None:
    if optimizer.defaults.get("fused") or not type(optimizer).__module__.startswith("torch.optim"):
        torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


class HypernetworkModule(nn.Module):
    """``y = x + strength * mlp(x)`` for inputs of width ``dim``."""

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
        # The same child modules as a plain tuple, for forward(): indexing and iterating a tuple
        # costs nothing, nn.Sequential's __getitem__/__iter__ do. Kept out of _modules, so names,
        # state_dict and .to() see only self.linear (which moves these very objects).
        self.__dict__["_steps"] = tuple(layers)
        self.__dict__["_collapse_rows"] = _collapse_rows(layers, dim)
        self.__dict__["_has_dropout"] = any(isinstance(m, nn.Dropout) for m in layers)
        self.__dict__["_kept"] = None  # (validity key, M, c) from keep_collapsed()
        self.__dict__["_linears"] = tuple(m for m in layers if isinstance(m, nn.Linear))
        self._init_weights(weight_init, activation, zero_init_last)

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
        return self._steps[0].weight.dtype

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """``mlp(h)`` for ``h`` already in the module's dtype (the sum blend adds several of these)."""
        if self.collapses(h):
            m, c = self._kept_collapsed() or self.collapsed()
            return F.linear(h, m, c)
        for layer in self._steps:  # forward(): no nn.Module.__call__ per child
            h = layer.forward(h)
        return h

    def collapsed(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` with ``mlp(x) = x @ M.T + c``, for a module that is a chain of Linear layers
        (activation "linear", no layer norm; dropout counts as the identity, as at inference), in
        ``dtype`` if given. Differentiable: gradients reach every layer."""
        m = c = None
        for layer in self._steps:
            if isinstance(layer, nn.Linear):
                w, b = (layer.weight, layer.bias) if dtype is None else (layer.weight.to(dtype), layer.bias.to(dtype))
                m, c = (w, b) if m is None else (w @ m, torch.addmv(b, w, c))
            elif not isinstance(layer, nn.Dropout):
                raise HnkitError(f"a {type(layer).__name__} layer is not linear: only hypernetworks without "
                                 "activation and layer norm are an affine map")
        return m, c

    @property
    def dropout_active(self) -> bool:
        """Training mode with a Dropout layer (one exists only where the structure's p > 0): a
        call then draws random numbers, and its result depends on more than its input."""
        return self.training and self._has_dropout

    def pays_to_collapse(self, rows: int) -> bool:
        """Whether multiplying the weights together first pays for ``rows`` input rows: a chain of
        Linear layers, no active dropout, and at least the rows of ``_collapse_rows``."""
        threshold = self._collapse_rows
        return threshold is not None and rows >= threshold and not self.dropout_active

    def collapses(self, x: torch.Tensor) -> bool:
        """Whether :meth:`residual` multiplies the weights together first for this input: it pays
        for this many rows, or a product kept by :meth:`keep_collapsed` is still valid (and no
        dropout is active)."""
        if self.pays_to_collapse(x.numel() // self.dim):
            return True
        return self._kept is not None and not self.dropout_active and self._kept_collapsed() is not None

    def keep_collapsed(self) -> None:
        """Compute ``collapsed()`` now and use it in every call until a parameter changes (an
        optimizer step, ``load_state_dict``, ``.to()``), gradients are switched on or off, or
        :meth:`forget_collapsed`. For a caller that knows the module will see many rows in total
        before its weights change, spread over calls that each see too few for the product to pay:
        the UNet's 1280-wide sites, 256 rows each, six per UNet call (hnkit.targets.unet)."""
        self.__dict__["_kept"] = (self._kept_key(), *self.collapsed())

    def forget_collapsed(self) -> None:
        self.__dict__["_kept"] = None

    def __getstate__(self):  # copies and pickles leave a kept product behind (it may carry a graph)
        state = dict(super().__getstate__())
        state["_kept"] = None
        return state

    def weights_key(self) -> list:
        """Changes whenever a weight of this module does, for anything derived from them and kept
        (a kept product here, packed weights in hnkit.packed): an in-place change bumps a
        parameter's version, ``.to()`` or new storage changes its address, and
        ``load_state_dict(assign=True)`` puts in new Parameter objects, and an optimizer's step
        counts as an in-place change (:func:`watch_optimizer_steps`: fused optimizers do not bump
        the versions themselves). Writes through ``.data`` are not counted by PyTorch and are not seen."""
        # _parameters, not layer.weight: nn.Module.__getattr__ would cost more than the rest (hot path).
        return tensors_key(p for layer in self._linears for p in layer._parameters.values())

    def _kept_key(self):
        return torch.is_grad_enabled(), self.weights_key()

    def _kept_collapsed(self):
        kept = self._kept
        if kept is None or kept[0] != self._kept_key():
            return None
        return kept[1], kept[2]

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        # Weights stay in their own dtype (fp32); cast at the edges so a half-precision base works.
        # This runs at every attention layer for every token, so it avoids per-call overhead:
        # no cast when the dtype matches, the children's forward() called directly (no
        # nn.Module.__call__ each), and the strength fused into the residual add.
        dtype = self._steps[0].weight.dtype
        h = x if x.dtype == dtype else x.to(dtype)
        out = torch.add(h, self.residual(h), alpha=strength)
        return out if out.dtype == x.dtype else out.to(x.dtype)
