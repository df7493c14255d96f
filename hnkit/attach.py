"""``attach(model, hypernetwork, strength)``: the adapter core's one verb, and its handle."""

from __future__ import annotations

import warnings
import weakref

import torch

from .errors import HnkitError
from .hypernetwork import Hypernetwork
from .targets import find_sites

_attached: "weakref.WeakKeyDictionary[torch.nn.Module, Attachment]" = weakref.WeakKeyDictionary()


class _SiteTransform:
    """What one attention site does to its K/V input: each network's module in order (chained, as
    the web UI does). Pure: it reads the strengths and nothing else, so gradient checkpointing can
    run it again in backward. Returns ``x`` itself when every strength is 0."""

    def __init__(self, pairs, strengths: list):
        self.pairs = pairs  # [(index into strengths, (k_module, v_module))]
        self.strengths = strengths  # shared with the Attachment, changed in place

    def __call__(self, x: torch.Tensor, which: int) -> torch.Tensor:
        for i, pair in self.pairs:
            s = self.strengths[i]
            if s != 0:
                x = pair[which].forward(x, s)  # forward(): no nn.Module.__call__ per layer and token
        return x


class Attachment:
    """Hypernetworks attached to a model. ``remove()`` (or leaving a ``with`` block) restores it.

    While attached, the base model's parameters are frozen (``requires_grad=False``), so gradients
    reach only the hypernetworks; ``remove()`` restores the flags."""

    def __init__(self, model, entries: list[tuple[Hypernetwork, float]]):
        self.model = model
        self.hypernetworks = [hn for hn, _ in entries]
        self._strengths = [float(s) for _, s in entries]
        self.family, sites = find_sites(model)
        for hn in self.hypernetworks:
            _check_fits(hn, sites, self.family)
        device = _device_of(model)
        for hn in self.hypernetworks:
            if device is not None:
                hn.to(device)
        # The base is frozen while attached; remove() gives back the flags it had.
        self._unfrozen = [p for p in model.parameters() if p.requires_grad]
        for p in self._unfrozen:
            p.requires_grad_(False)
        self._removers = []
        transforms = {}  # sites that use the same modules share one transform object
        for site in sites:
            pairs = [(i, hn.pair_for(site)) for i, hn in enumerate(self.hypernetworks)]
            pairs = [(i, p) for i, p in pairs if p is not None]
            if pairs:
                key = tuple((i, id(k), id(v)) for i, (k, v) in pairs)
                transform = transforms.setdefault(key, _SiteTransform(pairs, self._strengths))
                self._removers.append(site.install(transform))
        self.num_sites = len(self._removers)

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
        self._strengths[index] = float(value)

    # lifetime -------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return _attached.get(self.model) is self

    def remove(self) -> None:
        for undo in reversed(self._removers):
            undo()
        self._removers = []
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
        return f"Attachment({self.family}, {self.num_sites} sites, [{names}])"


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


def attach(model, hypernetwork, strength: float = 1.0) -> Attachment:
    """Attach one hypernetwork at ``strength``, or a list of ``(hypernetwork, strength)`` pairs
    applied in order (chained). Returns an :class:`Attachment`; use it as a context manager or call
    ``remove()``. The hypernetwork is moved to the model's device and never registered inside it."""
    if isinstance(hypernetwork, (list, tuple)):
        entries = [(hn, s) for hn, s in hypernetwork]
    else:
        entries = [(hypernetwork, strength)]
    if not entries:
        raise HnkitError("attach() needs at least one hypernetwork")
    for hn, _ in entries:
        if not isinstance(hn, Hypernetwork):
            raise HnkitError(f"attach() takes Hypernetwork objects (see hnkit.load), got {type(hn).__name__}")
    if model in _attached:
        raise HnkitError("this model already has hypernetworks attached: remove() them first, "
                         "or attach a list of (hypernetwork, strength) pairs at once")
    handle = Attachment(model, entries)
    _attached[model] = handle
    return handle
