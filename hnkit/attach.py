"""``attach(model, hypernetwork, strength)``: the adapter core's one verb, and its handle.

Attaching finds the model's attention sites (:mod:`hnkit.targets`), chooses one kernel per group of
sites that share the same modules and layer factor (:mod:`hnkit.kernels`), installs it at each site,
and, where a kernel needs values computed once per forward pass, hooks the model's root
(:mod:`hnkit.passes`). ``remove()`` undoes all of it. See docs/design.md.

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
import warnings
import weakref

import torch

from .errors import HnkitError, HnkitWarning
from .hypernetwork import Hypernetwork
from .kernels import Collapsed, Memo, make_kernel
from .passes import Passes
from .stack import Stack
from .strengths import finite, strengths_for
from .targets import find_target
from .targets.base import token_input

BLENDS = ("chain", "sum")

attached_models: "weakref.WeakKeyDictionary[torch.nn.Module, Attachment]" = weakref.WeakKeyDictionary()
# Models whose K/V weights have a hypernetwork folded in (hnkit.fuse); attach() refuses them.
fused_models: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


class Attachment:
    """Hypernetworks attached to a model. ``remove()`` (or leaving a ``with`` block) restores it.

    While attached, the base model's parameters are frozen (``requires_grad=False``), so gradients
    reach only the hypernetworks; ``remove()`` restores the flags.

    With a ``schedule``, every strength is multiplied by ``schedule(token_index)`` for the whole of
    one forward pass of the model, where ``token_index`` is the number of tokens generated before
    that pass: the prompt pass (which predicts the first new token) has index 0, the pass that
    predicts the n-th new token (counting from 0) has index n. A root pre-hook reads it from the
    call: a pass on an empty KV cache starts a sequence whose prompt is its input, unless (without
    a cache) its input is the previous pass's input and one more token, as in ``generate(...,
    use_cache=False)``; a pass on a filled cache continues the sequence. With the cache (generate()'s
    default) the K and V of each position are computed once, in the pass that first sees it: the
    prompt's at index 0, those of generated token n at index n + 1. Without the cache every pass
    recomputes all positions with the current factor. Schedules are for inference: a forward with
    gradients enabled is refused, because a factor that changes between passes would break gradient
    checkpointing's recompute.
    """

    def __init__(self, model, entries: list[tuple[Hypernetwork, float]], blend: str = "chain",
                 layers=None, schedule=None, fast: bool = True):
        check_options(model, blend, schedule, fast)
        self.model = model
        self.hypernetworks = [hn for hn, _ in entries]
        self.blend = blend
        self.schedule = schedule
        self.fast = fast
        target = find_target(model)
        self.device = _device_of(model)
        self._strengths = strengths_for(entries, self.device)
        self.family = target.family
        for hn in self.hypernetworks:
            check_fits(hn, target.sites, self.family)
        self.layer_factors = layer_factors(layers, len(target.sites))
        for hn in self.hypernetworks:
            if self.device is not None:
                hn.to(self.device)
        # The base is frozen while attached; remove() gives back the flags it had.
        self._unfrozen = [p for p in model.parameters() if p.requires_grad]
        for p in self._unfrozen:
            p.requires_grad_(False)
        installs = choose_kernels(target.sites, self.hypernetworks, self.layer_factors, self._strengths, blend, fast)
        self.kernels = list(dict.fromkeys(k for _, k in installs))
        self._removers = [site.install(kernel) for site, kernel in installs]
        self.num_sites = len(installs)
        self._passes = Passes(target, self.kernels)
        if self._passes or schedule is not None:
            # prepend: the schedule's factor and the pass's values are set before any other pre-hook
            # of the model may run a kernel.
            hooks = [model.register_forward_pre_hook(self._before_pass, with_kwargs=True, prepend=True)]
            if self._passes:
                hooks.append(model.register_forward_hook(self._after_pass, always_call=True))
            self._removers += [h.remove for h in hooks]
        self.token_index: int | None = None  # of the last forward pass, when there is a schedule
        self._sequence_start = 0  # tokens in the prompt of the current sequence (schedule)
        self._last_input = None  # the last pass's input when it ran without a KV cache (schedule)

    # strengths ------------------------------------------------------------------------------
    @property
    def strengths(self) -> list:
        """One strength per network: a float, or a ``[B]`` tensor where it is given per row (for a
        stack, one per member)."""
        return self._strengths.as_list()

    @property
    def strength(self):
        return self._strengths.one()

    @strength.setter
    def strength(self, value: float) -> None:
        self.set_strength(value)

    def set_strength(self, value: float, index: int | Hypernetwork | None = None) -> None:
        """Change a strength in place (no re-attaching). ``index`` picks the network when several
        are attached: its position or the Hypernetwork object itself. ``value`` is a number, or one
        per batch row (a list or a 1-D tensor: see :func:`attach`). For a stack, ``index`` is a
        member's position or name, or ``value`` a dict ``{member: value}`` setting several at once
        (members not named keep their strengths)."""
        self._strengths.set(value, index)

    # the root hooks -------------------------------------------------------------------------
    def _before_pass(self, module, args, kwargs) -> None:
        if self.schedule is not None:
            self._apply_schedule(args, kwargs)
        if self._passes:
            self._passes.open(args, kwargs)

    def _after_pass(self, module, args, output) -> None:
        self._passes.close()

    def _apply_schedule(self, args, kwargs) -> None:
        if torch.is_grad_enabled():
            raise HnkitError("a strength schedule is for inference only: run under torch.no_grad() "
                             "(generate() does), or steer without a schedule to train or take gradients")
        x = token_input(args, kwargs)
        if x is None:
            return
        past = cache_length(kwargs)
        last, self._last_input = self._last_input, (x if past == 0 else None)
        extends = (past == 0 and last is not None and x.shape[1] == last.shape[1] + 1
                   and x.shape[0] == last.shape[0] and torch.equal(x[:, :last.shape[1]], last))
        if past == 0 and not extends:
            self._sequence_start = x.shape[1]
        self.token_index = max(0, past + x.shape[1] - self._sequence_start)
        self._strengths.scale = finite(self.schedule(self.token_index), f"schedule({self.token_index})")

    # lifetime -------------------------------------------------------------------------------
    def remove(self) -> None:
        for undo in reversed(self._removers):
            undo()
        self._removers = []
        self._passes.clear()
        self._strengths.scale = 1.0
        for p in self._unfrozen:
            p.requires_grad_(True)
        self._unfrozen = []
        if attached_models.get(self.model) is self:
            del attached_models[self.model]

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(f"{name}@{s:g}" if not isinstance(s, torch.Tensor) else f"{name}@{s.tolist()}"
                          for name, s in zip(self._strengths.labels, self.strengths))
        extra = "" if self.blend == "chain" else f", blend={self.blend}"
        extra += ", per-layer factors" if any(f != 1.0 for f in self.layer_factors) else ""
        extra += ", scheduled" if self.schedule is not None else ""
        extra += "" if self.fast else ", plain kernels"
        return f"Attachment({self.family}, {self.num_sites} sites, [{names}]{extra})"


def check_options(model, blend: str, schedule, fast) -> None:
    check_blend(blend)
    if not isinstance(fast, bool):
        raise HnkitError(f"fast must be True or False, got {fast!r}")
    if schedule is not None and not callable(schedule):
        raise HnkitError("schedule must be a function of the token index (e.g. hnkit.fade_in(50))")
    if schedule is not None and not callable(getattr(model, "generate", None)):
        raise HnkitError(f"a strength schedule counts generated tokens: it needs a model with generate(), "
                         f"not a {type(model).__name__}")


def choose_kernels(sites, hypernetworks, factors: list[float], strengths, blend: str, fast: bool) -> list:
    """``[(site, kernel)]`` for the sites some network reaches: one kernel per group of sites with
    the same modules and the same layer factor, wrapped in one Memo per such kernel where the sites
    are fed the model call's context."""
    kernels: dict = {}
    installs = []
    for site, factor in zip(sites, factors):
        entries = [(i, hn.pair_for(site), factor) for i, hn in enumerate(hypernetworks)]
        entries = [(i, pair, f) for i, pair, f in entries if pair is not None]
        if not entries:
            continue
        key = tuple((i, id(k), id(v)) for i, (k, v), _ in entries) + (factor,)
        if key not in kernels:
            kernels[key] = make_kernel(entries, strengths, blend, fast)
        kernel = kernels[key]
        if site.context:
            if (key, "memo") not in kernels:
                kernels[key, "memo"] = Memo(kernel, site.width)
            kernel = kernels[key, "memo"]
        installs.append((site, kernel))
    for kernel, n in collections.Counter(k for _, k in installs).items():
        if isinstance(kernel, Collapsed):
            kernel.sites = n  # a Memo's kernel runs once per pass (hnkit.passes)
    return installs


def check_blend(blend: str) -> None:
    if blend not in BLENDS:
        raise HnkitError(f"unknown blend {blend!r}; use one of: {', '.join(BLENDS)}")


def layer_factors(layers, n_sites: int) -> list[float]:
    """One factor per attention site, in model order, from None (all 1), a list or a function."""
    if layers is None:
        return [1.0] * n_sites
    if callable(layers):
        return [finite(layers(i), f"layers({i})") for i in range(n_sites)]
    factors = [finite(f, "a layer factor") for f in layers]
    if len(factors) != n_sites:
        raise HnkitError(f"layers has {len(factors)} factors, but the model has {n_sites} attention layers")
    return factors


def cache_length(kwargs: dict) -> int:
    """Tokens already in the KV cache of a call (``cache`` in transformers 5, ``past_key_values``
    before): a transformers Cache, the legacy tuple of (k, v) per layer, or none."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
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


def check_fits(hn: Hypernetwork, sites, family: str) -> None:
    """Refuse a network whose keys fit no site of the model (warn about widths that fit none)."""
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
                      "and are ignored", HnkitWarning, stacklevel=3)


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
           schedule=None, fast: bool = True) -> Attachment:
    """Attach one hypernetwork at ``strength``, or a list of ``(hypernetwork, strength)`` pairs.

    ``blend="chain"`` (default) applies the networks one after the other, as the web UI does;
    ``blend="sum"`` adds their residuals to the same input. ``layers`` multiplies the strengths per
    attention layer (a list in model order or a function of the layer index); ``schedule``
    multiplies them per generated token (see :class:`Attachment`). A strength is a number, or one
    per batch row (a list or 1-D tensor of B numbers): one forward pass then serves rows with
    different styles and strengths, each network computed only on the rows that use it, and a row
    whose strengths are all 0 runs the bare model bit for bit. A :class:`hnkit.Stack` attaches
    alone, with ``blend="sum"``, at a strength per member (a dict ``{name: strength}``, a list, or
    one number for all). ``fast=False``, chosen here once, runs every site on the modules' own
    forward (``kernels.Chain`` or ``kernels.Sum``) instead of the ``Collapsed`` kernel: the same
    results, more slowly; a reference for tests and benchmarks. Returns an :class:`Attachment`;
    use it as a context manager or call ``remove()``. The hypernetworks are moved to the model's
    device and never registered inside it."""
    if isinstance(hypernetwork, Stack):
        if blend != "sum":
            raise HnkitError("a stack's members add their residuals: attach it with blend='sum'")
        entries = [(hypernetwork, strength)]
    else:
        entries = as_entries(hypernetwork, strength)
    if model in fused_models:
        raise HnkitError("this model has a hypernetwork fused into its weights: unfuse(model) first "
                         "(attaching on top of a fused network would apply a style twice)")
    if model in attached_models:
        raise HnkitError("this model already has hypernetworks attached: remove() them first, "
                         "or attach a list of (hypernetwork, strength) pairs at once")
    handle = Attachment(model, entries, blend=blend, layers=layers, schedule=schedule, fast=fast)
    attached_models[model] = handle
    return handle
