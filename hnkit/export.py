"""A hypernetwork as a LoRA on the K/V projections: the factors (written by :mod:`hnkit.export_peft`
and :mod:`hnkit.export_gguf`).

A hypernetwork rewrites the input of K and V: ``k = W (x + s f(x)) + b_W``, so the change of K's
output is ``s W f(x)``. Which networks export how:

- *exactly*: every affine form (``module.is_affine``: "lowrank", and "mlp" without activation or
  layer norm), where ``f(x) = M x + c``. The update is ``delta_W = s W M`` with the constant term
  ``s W c``: a LoRA ``B A`` plus a bias on B. The factors come from the form's own structure
  (``stack_weights()``: ``A = w1``, ``B = s W w2``, rank ``H``: a low-rank module's rank, a linear
  ``[1, m, 1]`` MLP's hidden width), or, where that is wider than the projection (or for a deeper
  linear MLP), ``s W M`` itself with an identity on the narrower side. No SVD, nothing fitted.
- *fitted*: every other form (ReLU and friends, layer norm). On the user's text, the inputs ``x``
  of each K/V projection are collected with the network attached (the regime the export stands in
  for), with the target ``t = s W f(x)``; a linear map and bias ``t ~ L x + b`` is fitted by least
  squares (a tiny ridge), and ``L`` cut to ``rank`` by reduced-rank regression: the top right
  singular vectors ``V_r`` of the fitted outputs ``X L^T`` give ``B = V_r``, ``A = V_r^T L``. This
  is the rank-r map with the least error on the inputs the model actually sees (the same as
  truncating the SVD of ``L C^(1/2)``, ``C`` the input covariance), without forming ``C^(1/2)``.

The constant term (``s W c``, from a network's biases) is ``lora_B.bias`` in PEFT
(``LoraConfig(lora_bias=True)``, written only where some term is nonzero). With ``bias=False`` there
is none: an affine export is then exact only where its biases are zero, and a fit goes through the
origin (the best map without an intercept, not the biased fit with its intercept cut off).

Module names come from the model's own ``named_modules()``. Fused QKV families (gpt2's ``c_attn``,
gpt_neox's ``query_key_value``, phi3's ``qkv_proj``) get one LoRA on the fused projection whose
B has K's and V's rows filled and Q's rows zero (``LoraFactors.fused_rows`` says which rows).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .attach import attach, check_fits
from .errors import HnkitError
from .strengths import finite
from .targets import causal_lm, find_sites, model_family, unet

DEFAULT_FIT_RANK = 16  # vLLM's default --max-lora-rank: a fitted export loads there without options
RIDGE = 1e-6  # of the mean input variance: keeps the least squares solvable on short texts
WHICH = ("k", "v")


@dataclass
class LoraFactors:
    """Per attention layer (index in model order) and projection ("k" or "v"): (A [r, D_in], B [D_out, r], bias [D_out] or None),
    with delta_W = B @ A (scale 1: alpha == r), bias = the constant term the update adds to the projection's output."""
    layers: dict          # {layer_index: {"k": (A, B, bias_or_None), "v": (...)}} float32 CPU tensors
    rank: int
    exact: bool           # True when B @ A (+ bias) reproduces the hypernetwork exactly
    family: str           # hnkit family name of the model (e.g. "llama")
    module_names: dict    # {layer_index: {"k": "model.layers.0.self_attn.k_proj", "v": ...}} the model's own module names
    # Fused QKV families only: {layer_index: {"k": LongTensor, "v": LongTensor}}, the rows of the fused
    # projection's output (in its (out, in) view) that K's and V's D_out rows are; empty otherwise.
    fused_rows: dict = field(default_factory=dict)
    fused_out: dict = field(default_factory=dict)  # {layer_index: outputs of the fused projection (Q, K and V)}
    num_layers: int = 0  # attention layers the model has (layers the network leaves alone are not in `layers`)
    # Fitted exports only: {layer_index: {"k": relative error, "v": ...}}, sqrt(residual / target energy).
    fit_errors: dict = field(default_factory=dict)


@dataclass
class Projection:
    """One K or V projection of an attention layer: its module name, its weight as (D_out, D_in)
    float64 (K's or V's rows of a fused projection), and those rows' indices where fused."""
    name: str
    weight: torch.Tensor
    rows: torch.Tensor | None = None
    fused_out: int | None = None


# -- the model's K/V projections -----------------------------------------------------------------
def kv_projections(model) -> tuple[str, list, list[dict]]:
    """``(family, sites, [{"k": Projection, "v": Projection}] per site)``, in model order."""
    family = model_family(model)
    if family == unet.FAMILY:
        raise HnkitError("an SD UNet style cannot be exported as a LoRA of a language model: export covers "
                         "causal LMs (peft, gguf) only")
    _, sites = find_sites(model)
    row = causal_lm.FAMILIES[family]
    rx = re.compile(rf"(?:^|\.)({row.attention})$")
    found = [(name, m) for name, m in model.named_modules() if rx.search(name)]
    if [rx.search(name).group(1) for name, _ in found] != [s.key for s in sites]:
        raise HnkitError(f"the attention layers of this {family} model do not match its sites; cannot name them")
    projections = []
    for name, attn in found:
        if row.qkv is None:
            projections.append({w: Projection(f"{name}.{attr}", getattr(attn, attr).weight.detach().double())
                                 for w, attr in zip(WHICH, (row.k, row.v))})
        else:
            projections.append(fused_projections(row, model.config, f"{name}.{row.qkv}", getattr(attn, row.qkv)))
    return family, sites, projections


def fused_projections(row, config, name: str, proj) -> dict:
    """K's and V's rows of a fused QKV projection, where its layout puts them (hnkit.targets.causal_lm)."""
    layout = causal_lm.qkv_layout(row, config, name, proj)
    weight = layout.weight(proj.weight.detach().double())  # (out, in)
    index = torch.arange(weight.shape[0])
    return {w: Projection(name, layout.part(weight, i + 1).reshape(-1, weight.shape[1]),
                          layout.part(index, i + 1).reshape(-1), weight.shape[0]) for i, w in enumerate(WHICH)}


# -- exact factors ---------------------------------------------------------------------------------
@torch.no_grad()
def affine_factors(module, weight: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, bias)`` in float64 with ``s W f(x) = B A x + bias`` exactly, for an affine module,
    of the smallest rank its structure gives (see the module docstring)."""
    m, c = module.affine(torch.float64)
    bias = s * weight @ c
    d_out, d_in = weight.shape
    try:
        w1, _, w2, _ = module.stack_weights()
        hidden = w1.shape[0]
    except HnkitError:  # a deeper linear MLP: no two-factor structure of its own
        hidden = None
    if hidden is not None and hidden <= min(d_out, d_in):
        return w1.double().clone(), s * weight @ w2.double(), bias
    delta = s * weight @ m
    if d_out <= d_in:
        return delta, torch.eye(d_out, dtype=torch.float64), bias
    return torch.eye(d_in, dtype=torch.float64), delta, bias


def truncated(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``B A`` (plain SVD), as ``(A', B')``."""
    u, sv, vh = torch.linalg.svd(b @ a, full_matrices=False)
    return vh[:rank], u[:, :rank] * sv[:rank]


# -- fitted factors --------------------------------------------------------------------------------
class FitStats:
    """Sums over one attention layer's K/V inputs ``x`` (rows of width D_in) and the targets ``t = s W f(x)``
    of K and V, in float64: all that the least squares and the reduced-rank cut need."""

    def __init__(self):
        self.n, self.sx, self.sxx = 0, None, None
        self.st, self.sxt, self.stt = {}, {}, {}

    def add(self, x: torch.Tensor, targets: dict) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if self.sxx is None:
            self.sx, self.sxx = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1], x.shape[1])
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sxx += x.T @ x
        for w, t in targets.items():
            t = t.reshape(-1, t.shape[-1])
            self.st[w] = self.st.get(w, 0) + t.sum(0)
            self.sxt[w] = self.sxt.get(w, 0) + x.T @ t
            self.stt[w] = self.stt.get(w, 0) + (t * t).sum()

    def fit(self, w: str, rank: int, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(A, B, bias, relative error)``: the rank-``rank`` map and bias (without ``bias``: a map alone,
        through the origin) with the least squared error on the collected rows (reduced-rank
        regression); the error is sqrt(residual / target energy)."""
        mu, nu = (self.sx / self.n, self.st[w] / self.n) if bias else (self.sx * 0, self.st[w] * 0)
        cxx = (self.sxx - self.n * torch.outer(mu, mu)).cpu()
        cxt = (self.sxt[w] - self.n * torch.outer(mu, nu)).cpu()
        ridge = RIDGE * cxx.trace() / cxx.shape[0] + 1e-12
        lt = torch.linalg.solve(cxx + ridge * torch.eye(cxx.shape[0], dtype=cxx.dtype), cxt)  # L^T [D_in, D_out]
        _, vecs = torch.linalg.eigh(cxt.T @ lt)  # covariance of the fitted outputs X L^T, ascending
        b = vecs[:, -rank:].flip(1)  # V_r [D_out, r]
        a = b.T @ lt.T  # V_r^T L [r, D_in]
        l_r = b @ a
        c = nu.cpu() - l_r @ mu.cpu()
        ctt = self.stt[w].cpu() - self.n * (nu.cpu() @ nu.cpu())
        rss = ctt - 2 * (l_r * cxt.T).sum() + (l_r @ cxx * l_r).sum()
        error = math.sqrt(max(rss.item(), 0.0) / max(self.stt[w].item(), 1e-30))
        return a, b, (c if bias else None), error


class _Collect:
    """Forward pre-hook on one layer's K projection (registered before hnkit's own): the raw K/V input,
    and the targets ``s W f(x)`` of K and V from the layer's modules."""

    def __init__(self, stats: FitStats, pair, projs: dict, s: float):
        self.stats, self.pair, self.projs, self.s = stats, pair, projs, s

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        targets = {}
        for w, m in zip(WHICH, self.pair):
            f = m.residual(x.to(m.dtype)).double()
            targets[w] = self.s * f @ self.projs[w].weight.to(f.device).T
        self.stats.add(x, targets)


def token_batches(texts, tokenizer, model) -> list[torch.Tensor]:
    """Batches of token ids: ``texts`` is a [n, T] tensor of ids (8 rows a batch) or a list of strings
    (one a batch, cut to the model's context)."""
    if isinstance(texts, torch.Tensor):
        return [texts[i:i + 8] for i in range(0, len(texts), 8)]
    if tokenizer is None:
        raise HnkitError("texts given as strings need the model's tokenizer (tokenizer=...)")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    batches = [tokenizer(t, return_tensors="pt").input_ids[:, :limit] for t in texts if t.strip()]
    if not batches:
        raise HnkitError("the texts to fit the export on are empty")
    return batches


@torch.no_grad()
def collect_stats(model, hn, s: float, chosen: dict, batches) -> dict:
    """``{layer: FitStats}`` over the batches, run with ``hn`` attached at ``s``."""
    stats = {i: FitStats() for i in chosen}
    device = next(model.parameters()).device
    was_training = hn.training
    hn.eval()
    try:
        with attach(model, hn, s):
            handles = [model.get_submodule(projs["k"].name).register_forward_pre_hook(
                _Collect(stats[i], pair, projs, s), with_kwargs=True, prepend=True)
                for i, (pair, projs) in chosen.items()]
            try:
                for ids in batches:
                    model(input_ids=ids.to(device), use_cache=False)
            finally:
                for h in handles:
                    h.remove()
    finally:
        hn.train(was_training)
    return stats


# -- the factors -----------------------------------------------------------------------------------
def lora_factors(hn, model, strength: float = 1.0, *, rank: int | None = None, texts=None,
                 tokenizer=None, bias: bool = True) -> LoraFactors:
    """The K/V LoRA that stands in for ``hn`` attached to ``model`` at ``strength``: exact for affine
    forms (``rank`` None: the form's own rank; a smaller ``rank`` cuts it by SVD, no longer exact),
    fitted on ``texts`` (a list of strings with ``tokenizer``, or a [n, T] tensor of token ids) at
    ``rank`` (default :data:`DEFAULT_FIT_RANK`) for the others. ``bias=False``: no constant term
    (every bias None; a fit then goes through the origin; an affine network with biases is no longer
    exact). See the module docstring."""
    s = finite(strength, "strength")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise HnkitError(f"rank must be a positive integer, got {rank!r}")
    family, sites, projections = kv_projections(model)
    check_fits(hn, sites, family)
    chosen = {i: (hn.pair_for(site), projections[i]) for i, site in enumerate(sites) if hn.pair_for(site) is not None}
    errors = {}
    if all(m.is_affine for pair, _ in chosen.values() for m in pair):
        layers, exact = exact_layers(chosen, s, rank, bias)
    elif texts is None:
        raise HnkitError(f"hypernetwork {hn.name!r} is not an affine map (activation {hn.config.activation!r}"
                         f"{', layer norm' if hn.config.layer_norm else ''}): its LoRA is fitted on text; "
                         "give some (hnkit export --data FILE)")
    else:
        stats = collect_stats(model, hn, s, chosen, token_batches(texts, tokenizer, model))
        layers, exact = {}, False
        for i, (_, projs) in chosen.items():
            fits = {w: stats[i].fit(w, min(rank or DEFAULT_FIT_RANK, *projs[w].weight.shape), bias) for w in WHICH}
            layers[i] = {w: fit[:3] for w, fit in fits.items()}
            errors[i] = {w: fit[3] for w, fit in fits.items()}
    fused = {i: projs["k"] for i, (_, projs) in chosen.items() if projs["k"].rows is not None}
    return LoraFactors(
        layers=padded(layers), rank=max(a.shape[0] for per in layers.values() for a, _, _ in per.values()),
        exact=exact, family=family,
        module_names={i: {w: projs[w].name for w in WHICH} for i, (_, projs) in chosen.items()},
        fused_rows={i: {w: projections[i][w].rows for w in WHICH} for i in fused},
        fused_out={i: k.fused_out for i, k in fused.items()}, fit_errors=errors, num_layers=len(sites))


def exact_layers(chosen: dict, s: float, rank: int | None, bias: bool) -> tuple[dict, bool]:
    """``({layer: {"k": (A, B, bias), "v": ...}}, exact)`` of affine modules: exact unless cut to a
    smaller ``rank`` or a nonzero constant term is left out (``bias=False``)."""
    layers = {i: {w: affine_factors(m, projs[w].weight, s) for w, m in zip(WHICH, pair)}
              for i, (pair, projs) in chosen.items()}
    exact = True
    if rank is not None and any(a.shape[0] > rank for per in layers.values() for a, _, _ in per.values()):
        layers = {i: {w: (*truncated(a, b, rank), c) for w, (a, b, c) in per.items()} for i, per in layers.items()}
        exact = False
    if not bias:
        exact = exact and not any(bool(c.any()) for per in layers.values() for _, _, c in per.values())
        layers = {i: {w: (a, b, None) for w, (a, b, _) in per.items()} for i, per in layers.items()}
    return layers, exact


def padded(layers: dict) -> dict:
    """Every factor as float32 on the CPU, padded with zeros to the largest rank (one rank per adapter:
    what vLLM and LoRAX serve)."""
    r = max(a.shape[0] for per in layers.values() for a, _, _ in per.values())
    return {i: {w: (*(t.float().cpu().contiguous() for t in pad(a, b, r)), None if c is None else c.float().cpu())
                for w, (a, b, c) in per.items()} for i, per in layers.items()}


def pad(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` padded with zeros to rank ``r``: the same ``B A``."""
    a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
    return a, torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], 1)
