"""``attach(model, hypernetwork, strength)``: the adapter core's one verb, and its handle.

Besides the strengths, an attachment has three knobs for steering generation:

- ``blend``: how several networks combine at one site. ``"chain"`` (the default, the web UI's way)
  feeds K's input through each network's k module in order; ``"sum"`` adds the residuals,
  ``x + sum_i s_i * mlp_i(x)``, so each network sees the unmodified input.
- ``layers``: a factor per attention layer (a list in model order, or a function of the layer
  index) that multiplies every strength at that layer.
- ``schedule``: a function of the token index that multiplies every strength while the model
  generates (see :class:`Attachment` for what the index counts).
"""

from __future__ import annotations

import collections
import functools
import math
import warnings
import weakref

import torch

from .errors import HnkitError
from .hypernetwork import Hypernetwork
from .module import watch_optimizer_steps
from .packed import FoldedKV, PackedPair
from .targets import find_sites

BLENDS = ("chain", "sum")

_attached: "weakref.WeakKeyDictionary[torch.nn.Module, Attachment]" = weakref.WeakKeyDictionary()
# Models whose K/V weights have a hypernetwork folded in (hnkit.fuse); attach() refuses them.
_fused: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


class _Live:
    """The values a transform reads at call time, shared by all transforms of one attachment and
    changed in place: the strengths, the schedule's factor for the current forward pass, and whether
    the weights kept for calls without gradients were checked at the start of that pass."""

    def __init__(self, strengths: list[float]):
        self.strengths = strengths
        self.scale = 1.0
        self.checked = False  # in a forward pass whose kept weights are known to be current
        self.checked_sequence = False  # the last pass without gradients checked them


class _SiteTransform:
    """What one attention site does to its K/V input. Pure: it reads the strengths, its layer
    factors and the schedule factor and nothing else, so gradient checkpointing can run it again in
    backward. Returns ``x`` itself when every effective strength is 0, and the site then runs the
    model's own code.

    Fast path: with one network at the site, a supported module form and no active dropout
    (:mod:`hnkit.packed`), the first call computes K's and V's inputs together and keeps the other
    one for the next call, which gets it when it passes the very same tensor (the model computes K
    and V from one hidden state) with gradients recorded as before. Same values up to float
    rounding, in inference and in training alike."""

    def __init__(self, pairs, live: _Live, blend: str = "chain", factors=None):
        self.pairs = pairs  # [(index into strengths, (k_module, v_module))]
        self.live = live
        self.strengths = live.strengths  # shared with the Attachment, changed in place
        self.blend = blend
        self.factors = list(factors) if factors is not None else [1.0] * len(pairs)  # layer factor per pair
        self.packed = PackedPair.of(*pairs[0][1]) if len(pairs) == 1 else None
        self._pending = None  # (x, which, grad mode, result) computed ahead by the fast path

    def __call__(self, x: torch.Tensor, which: int) -> torch.Tensor:
        # The fast path runs at every layer for every generated token: few lookups, no extra calls.
        grad = torch.is_grad_enabled()
        pending = self._pending
        if pending is not None:
            self._pending = None
            if pending[0] is x and pending[1] == which and pending[2] == grad:
                return pending[3]
        packed = self.packed
        if packed is not None and packed.usable():
            s = self.strength_now()
            if s == 0:
                return x
            # Many rows of a linear module with gradients: collapsed (HypernetworkModule.residual);
            # without gradients the pair collapses itself (PackedPair.collapses). A ReLU never is.
            if packed.relu or not grad or not packed.modules[0].collapses(x):
                kx, vx = packed(x, s, self.live.checked)
                self._pending = (x, 1 - which, grad, vx if which == 0 else kx)
                return kx if which == 0 else vx
        scale = self.live.scale
        strengths = self.strengths
        if self.blend == "chain":
            for (i, pair), f in zip(self.pairs, self.factors):
                s = strengths[i] * f * scale  # exact when f and scale are 1: chain stays as it was
                if s != 0:
                    x = pair[which].forward(x, s)  # forward(): no nn.Module.__call__ per layer and token
            return x
        active = []
        for (i, pair), f in zip(self.pairs, self.factors):
            s = strengths[i] * f * scale
            if s != 0:
                active.append((pair[which], s))
        if not active:
            return x
        if len(active) == 1:  # one network: the very same computation as chain
            module, s = active[0]
            return module.forward(x, s)
        return _sum_of_residuals(x, active)

    def strength_now(self) -> float:
        """The effective strength of a site with one network: its strength, layer factor and the
        schedule's factor."""
        (i, _), = self.pairs
        return self.strengths[i] * self.factors[0] * self.live.scale


def _sum_of_residuals(x: torch.Tensor, active) -> torch.Tensor:
    """``x + s_1 * mlp_1(x) + s_2 * mlp_2(x) + ...``, added left to right in the modules' dtype
    (fp32) and cast back at the end, as HypernetworkModule.forward does for one module."""
    dtype = active[0][0].dtype
    h = x if x.dtype == dtype else x.to(dtype)
    out = h
    for module, s in active:
        y = module.residual(h if module.dtype == dtype else h.to(module.dtype))
        out = torch.add(out, y if y.dtype == dtype else y.to(dtype), alpha=s)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class Attachment:
    """Hypernetworks attached to a model. ``remove()`` (or leaving a ``with`` block) restores it.

    While attached, the base model's parameters are frozen (``requires_grad=False``), so gradients
    reach only the hypernetworks; ``remove()`` restores the flags.

    With a ``schedule``, every strength is multiplied by ``schedule(token_index)`` for the whole of
    one forward pass of the model, where ``token_index`` is the number of tokens generated before
    that pass: the prompt pass (which predicts the first new token) has index 0, the pass that
    predicts the n-th new token (counting from 0) has index n. With the KV cache (generate()'s
    default) the K and V of each position are computed once, in the pass that first sees it: the
    prompt's at index 0, those of generated token n at index n + 1. Without the cache every pass
    recomputes all positions with the current factor. The prompt length comes from the
    ``generate()`` call; a forward called directly counts from the last forward that started with
    an empty cache. Schedules are for inference: a forward with gradients enabled is refused,
    because a factor that changes between passes would break gradient checkpointing's recompute.
    """

    def __init__(self, model, entries: list[tuple[Hypernetwork, float]], blend: str = "chain",
                 layers=None, schedule=None):
        if blend not in BLENDS:
            raise HnkitError(f"unknown blend {blend!r}; use one of: {', '.join(BLENDS)}")
        if schedule is not None and not callable(schedule):
            raise HnkitError("schedule must be a function of the token index (e.g. hnkit.fade_in(50))")
        if schedule is not None and not callable(getattr(model, "generate", None)):
            raise HnkitError(f"a strength schedule counts generated tokens: it needs a model with generate(), "
                             f"not a {type(model).__name__}")
        self.model = model
        self.hypernetworks = [hn for hn, _ in entries]
        self._strengths = [_finite(s, "strength") for _, s in entries]
        self._live = _Live(self._strengths)
        self.blend = blend
        self.schedule = schedule
        self.family, sites = find_sites(model)
        for hn in self.hypernetworks:
            _check_fits(hn, sites, self.family)
        self.layer_factors = layer_factors(layers, len(sites))
        device = _device_of(model)
        for hn in self.hypernetworks:
            if device is not None:
                hn.to(device)
        watch_optimizer_steps()  # weights kept for calls without gradients must see every step
        # The base is frozen while attached; remove() gives back the flags it had.
        self._unfrozen = [p for p in model.parameters() if p.requires_grad]
        for p in self._unfrozen:
            p.requires_grad_(False)
        self._removers = []
        transforms = {}  # sites with the same modules and the same effective strengths share one transform
        installs = []
        for site, factor in zip(sites, self.layer_factors):
            pairs = [(i, hn.pair_for(site)) for i, hn in enumerate(self.hypernetworks)]
            pairs = [(i, p) for i, p in pairs if p is not None]
            if pairs:
                key = tuple((i, id(k), id(v)) for i, (k, v) in pairs) + (factor,)
                transform = transforms.setdefault(
                    key, _SiteTransform(pairs, self._live, blend, [factor] * len(pairs)))
                installs.append((site, transform))
        uses = collections.Counter(id(k) for _, t in installs for _, (k, _) in t.pairs)  # sites per module
        for transform, n in collections.Counter(t for _, t in installs).items():
            if transform.packed is not None:
                transform.packed.sites = n  # for PackedPair.collapses
        self._kept_owners = []  # what keeps weights for calls without gradients: checked once per pass
        for site, transform in installs:
            # Narrow K/V projections and a packed network of this site alone (per-site: the folded
            # weights are as many as its own): the projections may add to their outputs
            # (hnkit.packed.FoldedKV).
            packed = transform.packed
            if packed is not None and uses[id(packed.modules[0])] == 1 and site.projections is not None:
                folded = FoldedKV(transform, packed, site.projections.k, site.projections.v)
                self._removers.append(site.projections.install(folded))
                self._kept_owners.append(folded)  # it checks its pair as well
            else:
                self._removers.append(site.install(transform))
                if packed is not None and packed not in self._kept_owners:
                    self._kept_owners.append(packed)
        if self._kept_owners:
            self._removers += [model.register_forward_pre_hook(self._open_pass, with_kwargs=True, prepend=True).remove,
                               model.register_forward_hook(self._close_pass, always_call=True).remove]
        self.num_sites = len(installs)
        self.token_index: int | None = None  # of the last forward pass, when there is a schedule
        self._prompt_length: int | None = None  # set for the duration of a generate() call
        self._sequence_start: int | None = None  # forwards outside generate(): the last prompt's length
        if schedule is not None:
            self._install_schedule()

    # strengths ------------------------------------------------------------------------------
    @property
    def strengths(self) -> list[float]:
        return list(self._strengths)

    @property
    def strength(self) -> float:
        if len(self._strengths) != 1:
            raise HnkitError("several hypernetworks are attached: use strengths / set_strength(s, index)")
        return self._strengths[0]

    @strength.setter
    def strength(self, value: float) -> None:
        self.set_strength(value)

    def set_strength(self, value: float, index: int | Hypernetwork | None = None) -> None:
        """Change a strength in place (no re-attaching). ``index`` picks the network when several
        are attached: its position or the Hypernetwork object itself."""
        if index is None:
            if len(self._strengths) != 1:
                raise HnkitError("several hypernetworks are attached: name which one with index=")
            index = 0
        elif isinstance(index, Hypernetwork):
            index = next(i for i, hn in enumerate(self.hypernetworks) if hn is index)
        self._strengths[index] = _finite(value, "strength")

    @property
    def schedule_factor(self) -> float:
        """The schedule's factor in the last forward pass (1.0 without a schedule)."""
        return self._live.scale

    # weights kept between calls ---------------------------------------------------------------
    def _open_pass(self, module, args, kwargs) -> None:
        """Before a forward pass of the whole model: check every kept weight against its parameters
        here, once, instead of at every layer, where the check costs more than the products (the
        parameters' objects are cold in the cache between the base model's weights). The check runs
        at every pass that starts a sequence; passes that continue one from a KV cache (generation,
        token by token) trust it, as their cache holds K and V computed with those weights anyway.
        With gradients nothing is kept; calls outside a pass (a submodule on its own) check for
        themselves."""
        live = self._live
        continuing = live.checked_sequence and _cached_length(
            kwargs.get("past_key_values", kwargs.get("cache"))) > 0
        live.checked = False
        if torch.is_grad_enabled():
            live.checked_sequence = False  # a backward and an optimizer step may follow
            return
        if not continuing:
            for owner in self._kept_owners:
                owner.refresh()
        live.checked = live.checked_sequence = True

    def _close_pass(self, module, args, output) -> None:
        self._live.checked = False

    # the schedule ---------------------------------------------------------------------------
    def _install_schedule(self) -> None:
        model = self.model
        # prepend: the factor is set before any other pre-hook of the model may run a transform.
        hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True)
        self._removers.append(hook.remove)
        # generate() is wrapped on this instance only, to learn the prompt length of each call:
        # that is what makes the token index exact with or without the KV cache.
        generate = model.generate
        shadowed = "generate" in model.__dict__
        previous = model.__dict__.get("generate")
        model.__dict__["generate"] = functools.wraps(generate)(functools.partial(self._generate, generate))

        def restore():
            if shadowed:
                model.__dict__["generate"] = previous
            else:
                model.__dict__.pop("generate", None)

        self._removers.append(restore)

    def _generate(self, generate, *args, **kwargs):
        prompt = kwargs.get("inputs_embeds")
        if prompt is None:
            prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        outer = self._prompt_length
        self._prompt_length = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None
        try:
            return generate(*args, **kwargs)
        finally:
            self._prompt_length = outer

    def _before_forward(self, module, args, kwargs) -> None:
        if torch.is_grad_enabled():
            raise HnkitError("a strength schedule is for inference only: run under torch.no_grad() "
                             "(generate() does), or steer without a schedule to train or take gradients")
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            return
        past = _cached_length(kwargs.get("cache", kwargs.get("past_key_values")))
        total = past + x.shape[1]  # tokens in the sequence once this pass is done
        if self._prompt_length is not None:
            start = self._prompt_length
        else:
            if past == 0:
                self._sequence_start = total
            start = self._sequence_start if self._sequence_start is not None else total
        self.token_index = max(0, total - start)
        self._live.scale = _finite(self.schedule(self.token_index), f"schedule({self.token_index})")

    # lifetime -------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return _attached.get(self.model) is self

    def remove(self) -> None:
        for undo in reversed(self._removers):
            undo()
        self._removers = []
        self._live.scale = 1.0
        for p in self._unfrozen:
            p.requires_grad_(True)
        self._unfrozen = []
        if _attached.get(self.model) is self:
            del _attached[self.model]

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(f"{hn.name}@{s:g}" for hn, s in zip(self.hypernetworks, self._strengths))
        extra = "" if self.blend == "chain" else f", blend={self.blend}"
        extra += ", per-layer factors" if any(f != 1.0 for f in self.layer_factors) else ""
        extra += ", scheduled" if self.schedule is not None else ""
        return f"Attachment({self.family}, {self.num_sites} sites, [{names}]{extra})"


def _finite(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise HnkitError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise HnkitError(f"{what} must be a finite number, got {value}")
    return value


def layer_factors(layers, n_sites: int) -> list[float]:
    """One factor per attention site, in model order, from None (all 1), a list or a function."""
    if layers is None:
        return [1.0] * n_sites
    if callable(layers):
        return [_finite(layers(i), f"layers({i})") for i in range(n_sites)]
    factors = [_finite(f, "a layer factor") for f in layers]
    if len(factors) != n_sites:
        raise HnkitError(f"layers has {len(factors)} factors, but the model has {n_sites} attention layers")
    return factors


def _cached_length(cache) -> int:
    """Tokens already in a KV cache: a transformers Cache, the legacy tuple of (k, v) per layer, or none."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None and len(cache[0]):
        return int(cache[0][0].shape[-2])
    return 0


def _device_of(model):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else None


def _check_fits(hn: Hypernetwork, sites, family: str) -> None:
    if hn.config.per_site:
        by_key = {s.key: s for s in sites}
        missing = [k for k in hn.keys() if k not in by_key]
        if missing:
            raise HnkitError(f"hypernetwork {hn.name!r} has sites this {family} model lacks: "
                             f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}")
        wrong = [k for k in hn.keys() if hn.width_of(k) != by_key[k].width]
        if wrong:
            k = wrong[0]
            raise HnkitError(f"hypernetwork {hn.name!r}: site {k} has width {hn.width_of(k)}, "
                             f"the model's is {by_key[k].width}")
        return
    model_widths = sorted({s.width for s in sites})
    used = [w for w in hn.keys() if w in model_widths]
    if not used:
        raise HnkitError(f"hypernetwork {hn.name!r} has widths {sorted(hn.keys())}, which fit no attention "
                         f"layer of this {family} model (its K/V inputs have widths {model_widths})")
    unused = [w for w in hn.keys() if w not in model_widths]
    if unused:
        warnings.warn(f"hypernetwork {hn.name!r}: widths {unused} fit no attention layer of this model "
                      "and are ignored", stacklevel=3)


def as_entries(hypernetwork, strength: float = 1.0, verb: str = "attach") -> list[tuple[Hypernetwork, float]]:
    """``[(hypernetwork, strength), ...]`` from one Hypernetwork or a list of pairs."""
    if isinstance(hypernetwork, (list, tuple)):
        entries = [(hn, s) for hn, s in hypernetwork]
    else:
        entries = [(hypernetwork, strength)]
    if not entries:
        raise HnkitError(f"{verb}() needs at least one hypernetwork")
    for hn, _ in entries:
        if not isinstance(hn, Hypernetwork):
            raise HnkitError(f"{verb}() takes Hypernetwork objects (see hnkit.load), got {type(hn).__name__}")
    return entries


def attach(model, hypernetwork, strength: float = 1.0, *, blend: str = "chain", layers=None,
           schedule=None) -> Attachment:
    """Attach one hypernetwork at ``strength``, or a list of ``(hypernetwork, strength)`` pairs.

    ``blend="chain"`` (default) applies the networks one after the other, as the web UI does;
    ``blend="sum"`` adds their residuals to the same input. ``layers`` multiplies the strengths per
    attention layer (a list in model order or a function of the layer index); ``schedule``
    multiplies them per generated token (see :class:`Attachment`). Returns an :class:`Attachment`;
    use it as a context manager or call ``remove()``. The hypernetworks are moved to the model's
    device and never registered inside it."""
    entries = as_entries(hypernetwork, strength)
    if model in _fused:
        raise HnkitError("this model has a hypernetwork fused into its weights: unfuse(model) first "
                         "(attaching on top of a fused network would apply a style twice)")
    if model in _attached:
        raise HnkitError("this model already has hypernetworks attached: remove() them first, "
                         "or attach a list of (hypernetwork, strength) pairs at once")
    handle = Attachment(model, entries, blend=blend, layers=layers, schedule=schedule)
    _attached[model] = handle
    return handle


check_fits = _check_fits  # TEMP alias until the core rewrite lands the public name
