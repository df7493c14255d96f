"""Merge weighted hypernetworks into one file that reproduces their blend when attached at strength 1.

The sum blend ``x + sum_i s_i * mlp_i(x)`` is itself one residual MLP when the networks have the
same depth and the same element-wise activation: put their hidden layers side by side.

    first Linear   rows stacked        [W1_a; W1_b]            (each network's hidden units, own block)
    middle Linears block-diagonal      [[W_a, 0], [0, W_b]]    (no unit sees another network's)
    last Linear    columns, scaled     [s_a W3_a, s_b W3_b],   bias s_a b3_a + s_b b3_b

An element-wise activation acts on each block separately, so the result is exact up to float
rounding. What has no such form is refused: layer norm (it normalizes across the whole hidden
layer), an activated output (the sum of two activated outputs is not one), different depths or
activations, and a chain of non-linear networks. Linear networks (no activation, no layer norm)
are affine maps; when their depths differ, or when side by side would be larger than a square
``[1, 1]`` layer, they are folded into one ``[1, 1]`` network instead, for either blend.
"""

from __future__ import annotations

import torch

from .errors import HnkitError
from .fuse import site_affine
from .hypernetwork import Hypernetwork, HypernetworkConfig
from .module import activation_name, is_elementwise


def merge(styles, *, blend: str = "sum", name: str = "merged", library=None) -> Hypernetwork:
    """One Hypernetwork equal to ``styles`` (a mapping ``{style: strength}`` or a list of pairs;
    styles as in :func:`hnkit.steer`) blended with ``blend``, when attached at strength 1."""
    from .attach import check_blend
    from .steer import resolve_styles

    check_blend(blend)
    entries = resolve_styles(styles, library=library)
    nets = [hn for hn, _ in entries]
    keyed_by = {hn.keyed_by for hn in nets}
    if len(keyed_by) > 1:
        raise HnkitError("cannot merge a per-site network with a width-keyed one: the sites a width applies to "
                         "depend on the model. Attach them together with blend='sum' instead")
    widths: dict = {}
    for hn in nets:
        for key in hn.keys():
            if widths.setdefault(key, hn.width_of(key)) != hn.width_of(key):
                raise HnkitError(f"cannot merge: key {key!r} has width {widths[key]} in one network and "
                                 f"{hn.width_of(key)} in {hn.name!r}")
    keys = list(widths)
    all_linear = all(hn.config.is_linear for hn in nets)
    if blend == "chain" and not all_linear:
        bad = next(hn for hn in nets if not hn.config.is_linear)
        raise HnkitError(f"a chain through {bad.name!r} (non-linear) is not one residual MLP; merge with "
                         "blend='sum', or attach the networks with blend='chain'")
    per_site = nets[0].config.per_site
    if all_linear and (blend == "chain" or not _side_by_side_is_smaller(nets)):  # low-rank forms too
        merged = _folded(entries, keys, widths, blend, per_site, name)
    else:
        merged = _side_by_side(entries, keys, widths, per_site, name)
    families = {hn.family for hn in nets}
    bases = {hn.base_model for hn in nets}
    merged.family = families.pop() if len(families) == 1 else None
    merged.base_model = bases.pop() if len(bases) == 1 else None
    joiner = " + " if blend == "sum" else " then "
    merged.description = f"hnkit merge ({blend}): " + joiner.join(f"{hn.name}*{s:g}" for hn, s in entries)
    return merged


def _side_by_side_is_smaller(nets) -> bool:
    """Whether the side-by-side network has fewer weights than a square ``[1, 1]`` layer (per d^2).
    Only MLPs go side by side: other (affine) forms are folded."""
    if any(hn.config.form != "mlp" for hn in nets):
        return False
    depths = {len(hn.config.layer_structure) for hn in nets}
    if len(depths) > 1:
        return False
    structures = [hn.config.layer_structure for hn in nets]
    merged = [sum(ls[j] for ls in structures) for j in range(len(structures[0]))]
    merged[0] = merged[-1] = 1
    return sum(a * b for a, b in zip(merged, merged[1:])) < 1


@torch.no_grad()
def _folded(entries, keys, widths, blend, per_site, name) -> Hypernetwork:
    merged = Hypernetwork(HypernetworkConfig(layer_structure=[1, 1], per_site=per_site), keys,
                          widths=widths, name=name)
    for key in keys:
        pairs = [(s, hn[key]) for hn, s in entries if key in hn]
        for which in (0, 1):
            lin, = merged[key][which].linear_layers()
            affine = site_affine(pairs, which, blend, torch.device("cpu"))
            if affine is None:  # only zero strengths: the identity
                lin.weight.zero_()
                lin.bias.zero_()
            else:
                D, t = affine  # x' = x + D x + t: D and t are the [1, 1] layer itself
                lin.weight.copy_(D)
                lin.bias.copy_(t)
    return merged


def _check_side_by_side(nets) -> None:
    first = nets[0]
    act = activation_name(first.config.activation)
    for hn in nets:
        c = hn.config
        if c.form != "mlp":
            raise HnkitError(f"cannot merge {hn.name!r} (form {c.form!r}) with non-linear networks exactly: only "
                             "linear networks fold into one; attach them together with blend='sum' instead")
        if c.layer_norm:
            raise HnkitError(f"cannot merge {hn.name!r} exactly: layer norm normalizes across the whole hidden "
                             "layer, so networks side by side would change each other's output")
        if len(c.layer_structure) != len(first.config.layer_structure):
            raise HnkitError(f"cannot merge networks of different depths exactly ({first.name!r} has "
                             f"{first.config.layer_structure}, {hn.name!r} {c.layer_structure}) unless both are "
                             "linear")
        this = activation_name(c.activation)
        if this != act:
            raise HnkitError(f"cannot merge networks with different activations exactly ({first.name!r}: "
                             f"{act or 'linear'}, {hn.name!r}: {this or 'linear'})")
        if act is not None and c.activate_output:
            raise HnkitError(f"cannot merge {hn.name!r} exactly: its output is activated (activate_output), and a "
                             "sum of activated outputs is not one activated output")
    if not is_elementwise(act):
        raise HnkitError(f"cannot merge networks with activation {act!r} exactly: it is not element-wise")


def _hidden_ratio(parts: list[float], widths) -> float:
    """A layer_structure entry whose hidden width is the sum of the parts' at every width."""
    targets = {d: sum(int(d * m) for m in parts) for d in widths}
    candidates = [sum(parts)] + [(t + 0.5) / d for d, t in targets.items()]
    for ratio in candidates:
        if all(int(d * ratio) == t for d, t in targets.items()):
            return ratio
    raise HnkitError(f"cannot merge exactly: no single layer_structure entry gives the hidden widths "
                     f"{sorted(targets.values())} at widths {sorted(targets)}")


@torch.no_grad()
def _side_by_side(entries, keys, widths, per_site, name) -> Hypernetwork:
    nets = [hn for hn, _ in entries]
    _check_side_by_side(nets)
    structures = [hn.config.layer_structure for hn in nets]
    n = len(structures[0])
    distinct_widths = set(widths.values())
    ls = [1] + [_hidden_ratio([s[j] for s in structures], distinct_widths) for j in range(1, n - 1)] + [1]
    dropout = [max(hn.config.dropout_structure[j] for hn in nets) for j in range(n)]
    activation = activation_name(nets[0].config.activation)
    config = HypernetworkConfig(layer_structure=ls, activation=activation, dropout_structure=dropout,
                                per_site=per_site)
    merged = Hypernetwork(config, keys, widths=widths, name=name)
    for key in keys:
        d = widths[key]
        sizes = [[int(d * s[j]) for j in range(n)] for s in structures]  # layer widths per network
        for which in (0, 1):
            linears = [hn[key][which].linear_layers() if key in hn else None for hn in nets]
            target = merged[key][which].linear_layers()
            for j, lin in enumerate(target):
                blocks_w, blocks_b = [], []
                for (hn, s), layers, size in zip(entries, linears, sizes):
                    if layers is None:  # this network has no module here: a zero block adds nothing
                        w = torch.zeros(size[j + 1], size[j], dtype=torch.float64)
                        b = torch.zeros(size[j + 1], dtype=torch.float64)
                    else:
                        w, b = layers[j].weight.double(), layers[j].bias.double()
                    if j == n - 2:  # the last Linear carries the strength
                        w, b = s * w, s * b
                    blocks_w.append(w)
                    blocks_b.append(b)
                if n == 2:  # one Linear: first and last at once, a plain weighted sum
                    weight, bias = sum(blocks_w), sum(blocks_b)
                elif j == 0:
                    weight, bias = torch.cat(blocks_w, 0), torch.cat(blocks_b)
                elif j == n - 2:
                    weight, bias = torch.cat(blocks_w, 1), sum(blocks_b)
                else:
                    weight, bias = torch.block_diag(*blocks_w), torch.cat(blocks_b)
                lin.weight.copy_(weight)
                lin.bias.copy_(bias)
    return merged
