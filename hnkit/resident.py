"""The styles ``hnkit serve`` keeps attached to its model: the resident set.

:class:`hnkit.engine.Engine` batches and generates; :class:`ResidentStyles` decides which styles of
its library are on the model meanwhile, and sets their strengths per row. What it guarantees:

- At most ``max_styles`` styles are attached, at strength 0 (``blend="sum"``: a row's styles add their
  residuals to the same input, so the order in which a request names them does not matter): as one
  :class:`hnkit.Stack` when they share a shape (two matrix products per site for any mix of styles),
  else network by network.
- The set changes only in :meth:`ResidentStyles.update`, which the engine calls between batches,
  never while one runs: a batch keeps the weights it started with to its end. ``update`` takes off
  the styles whose files were removed or replaced, reads those the next batch names that are not
  attached (the least recently used make room) and attaches the new set in place of the old.
- Only complete files are read: the library takes a new or replaced file once two listings in a row
  saw the same size, time and inode (:meth:`hnkit.StyleLibrary.refresh`), and :meth:`watch`, which
  lists the folder again in a thread of its own, checks each against the model
  (:func:`check_servable`) before the library shows it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .attach import attach
from .errors import HnkitError
from .stack import Stack
from .steer import StyleLibrary

MAX_STYLES = 64  # styles attached at once (hnkit serve --max-styles): the others are read when named


def check_servable(model, name: str, hn) -> None:
    """Refuse a style ``hnkit serve`` cannot serve: a name holding '+' or ':' (they separate styles and
    strengths in a model name), or widths that fit no attention layer of ``model``."""
    from .attach import check_fits
    from .targets import find_sites

    if "+" in name or ":" in name:
        raise HnkitError("a style name cannot hold '+' or ':' (they separate styles and strengths in a model name)")
    family, sites = find_sites(model)
    check_fits(hn, sites, family)


def unknown_style(names: list[str], name: str) -> str:
    """The message for a style ``name`` not among ``names``."""
    known = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"unknown style {name!r}; styles: {known or 'none'}"


class ResidentStyles:
    """The styles of ``library`` attached to ``model``; at first, those of its first ``max_styles``
    names that load.

    ``members``: their names, in the attachment's order; ``stack``: the :class:`hnkit.Stack` they
    make (None: attached network by network, or none attached); ``builds``: how many sets were
    attached. One thread (the engine's) calls :meth:`update` and :meth:`set_strengths`; the
    thread of :meth:`watch` only changes the library."""

    def __init__(self, model, library, max_styles: int = MAX_STYLES):
        self.model, self.library, self.max_styles = model, library, max_styles
        # name -> (its files' signature, network), least recently used first
        self.networks: OrderedDict[str, tuple] = OrderedDict()
        for name in list(library)[:max_styles]:
            try:
                self.networks[name] = (self.signature(name), library[name])
            except (HnkitError, OSError):  # read again when a request names it
                pass
        self.attachment, self.builds = None, 0
        self._stop = threading.Event()
        self.attach()

    def signature(self, name: str):
        """What changes when a style's file is replaced (None for a plain mapping of networks)."""
        return self.library.signature(name) if isinstance(self.library, StyleLibrary) else None

    def attach(self):
        """Attach the resident styles at strength 0, in place of what was attached: one stack when they
        share a shape, else each network. Returns ``attachment`` (None without styles)."""
        self.remove()
        self.members = list(self.networks)
        self.positions = {name: i for i, name in enumerate(self.members)}
        self._set: set[str] = set()  # the styles the last batch set (every other one is at 0)
        networks = [hn for _, hn in self.networks.values()]
        try:  # a stack when the styles share a shape
            self.stack = Stack(networks, self.members) if networks else None
        except HnkitError:
            self.stack = None
        if self.stack is not None:
            self.attachment = attach(self.model, self.stack, 0.0, blend="sum")
        elif networks:
            self.attachment = attach(self.model, [(hn, 0.0) for hn in networks], blend="sum")
        self.builds += 1
        return self.attachment

    def remove(self) -> None:
        """Take the styles off the model (:meth:`attach` puts them back)."""
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment = None

    def update(self, needed: set[str]) -> dict[str, str]:
        """Between batches: take off the styles whose files were removed or replaced, attach the
        ``needed`` ones (at most ``max_styles``; the least recently used make room). Returns the
        needed styles that could not be attached (gone, or their file unreadable now): name -> why."""
        stale = [name for name, (signature, _) in self.networks.items()
                 if name not in self.library or self.signature(name) != signature]
        for name in stale:
            del self.networks[name]
        failed, changed = {}, bool(stale)
        for name in sorted(needed - set(self.networks)):
            try:
                if name not in self.library:
                    raise HnkitError(unknown_style(list(self.library), name))
                self.networks[name] = (self.signature(name), self.library[name])
                changed = True
            except (HnkitError, OSError) as exc:
                failed[name] = str(exc)
        for name in sorted(needed & set(self.networks)):
            self.networks.move_to_end(name)  # most recently used last
        while len(self.networks) > self.max_styles:  # a batch names at most max_styles (Engine._take)
            self.networks.popitem(last=False)
        if changed:
            self.attach()
        return failed

    def set_strengths(self, rows: list[dict[str, float]]) -> None:
        """Each row's strengths (one dict a row): a column for each style the rows use, 0 for those
        the last call set; the others are 0 already (so the cost does not grow with the library)."""
        if self.attachment is None:
            return
        used = {name for row in rows for name in row}
        columns = {name: [row.get(name, 0.0) for row in rows] for name in sorted(used, key=self.positions.get)}
        columns = {name: column if any(column) else 0.0 for name, column in columns.items()}
        columns.update({name: 0.0 for name in self._set - used})
        self._set |= used  # should setting fail, the next call resets these too
        if self.stack is not None:
            self.attachment.set_strength(columns)  # a dict: members not named keep their strength
        else:
            for name, column in columns.items():
                self.attachment.set_strength(column, self.positions[name])
        self._set = used

    def watch(self, interval: float, say=print) -> None:
        """List the library's folder again every ``interval`` seconds, in a thread of its own, until
        :meth:`close`: styles added, replaced or removed are served from the next batch on (a new or
        replaced file is read, and checked against the model, before it is listed); one line to
        ``say`` for each, and for each file left out."""
        threading.Thread(target=self._watch, args=(interval, say), name="hnkit-styles", daemon=True).start()

    def _watch(self, interval: float, say) -> None:
        failing = None  # the listing's error, said once
        while not self._stop.wait(interval):
            try:
                changes = self.library.refresh(check=lambda name, hn: check_servable(self.model, name, hn))
                failing = None
            except OSError as exc:
                if str(exc) != failing:
                    say(f"hnkit serve: cannot list {self.library.folder}: {exc.strerror or exc}; still serving")
                failing = str(exc)
                continue
            for name, reason in changes.items():
                if reason is not None:
                    say(f"hnkit serve: skipped style {name!r} in {self.library.folder}: {reason}")
                else:
                    say(f"hnkit serve: style {name!r} {'ready' if name in self.library else 'removed'}")

    def close(self) -> None:
        """Stop watching and take the styles off the model."""
        self._stop.set()
        self.remove()
