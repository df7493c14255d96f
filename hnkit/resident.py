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
- Styles made from examples (:class:`GeneratedStyles`, a request's ``style_example``) are served
  by name beside the library's (:class:`ServedStyles`) while kept: at most ``max_kept``, the least
  recently used dropped first. One is made once per text (its name is the text's hash) and never
  changes; dropped, it is taken off at the next update like a removed file.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

from .attach import attach
from .errors import HnkitError
from .stack import Stack

MAX_STYLES = 64  # styles attached at once (hnkit serve --max-styles): the others are read when named
MAX_GENERATED = 32  # styles made from examples kept (hnkit serve --max-generated): about 10 MB each for SmolLM2


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
        signature = getattr(self.library, "signature", None)  # a StyleLibrary's, or ServedStyles'
        return signature(name) if signature is not None else None

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


# -- styles made from examples ---------------------------------------------------------------------
def example_name(text: str) -> str:
    """The name of the style made from the example ``text``: ``example-`` and the first 12 hex digits
    of its sha256 (UTF-8)."""
    return "example-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


class GeneratorUnavailable(HnkitError):
    """The server's style generator cannot be read: the server's fault, not the request's."""


class GeneratedStyles:
    """The styles a server made from examples (a request's ``style_example``), by :func:`example_name`:
    at most ``max_kept`` (0: none are made), the least recently used dropped first. The generator
    (``path``; None: the one hnkit ships) is read when first needed. Lookups may come from any
    thread; :meth:`make` runs the model, so only the engine's thread calls it, between batches."""

    def __init__(self, path=None, max_kept: int = MAX_GENERATED):
        self.path, self.max_kept = path, max_kept
        self.made = 0  # how many styles were made (one found here is not made again)
        self._generator, self._refusal = None, None  # the generator, or why it does not fit the model
        self._styles: OrderedDict[str, tuple] = OrderedDict()  # name -> (network, info), oldest first
        self._lock = threading.Lock()

    def generator(self, model):
        """The generator, read once and checked against ``model``: an HnkitError naming both models
        when it was made for another (said again, without reading the file again, at each call)."""
        if self._generator is None and self._refusal is None:
            from .generator import StyleGenerator

            try:
                generator = StyleGenerator.load(self.path)
            except HnkitError as exc:  # not kept: the file may be put right while the server runs
                raise GeneratorUnavailable(str(exc)) from None
            try:
                generator.check_model(model)
                self._generator = generator
            except HnkitError as exc:
                self._refusal = str(exc)
        if self._refusal is not None:
            raise HnkitError(self._refusal)
        return self._generator

    def make(self, model, tokenizer, text: str) -> dict:
        """The style of the example ``text``, made unless kept: ``{name, tokens, seconds, cached}``.
        ``model`` must run bare meanwhile (its styles at strength 0)."""
        if not self.max_kept:
            raise HnkitError("this server makes no styles from examples (hnkit serve --max-generated 0)")
        found = self.found(text)
        if found is not None:
            return found
        generator = self.generator(model)
        name, start = example_name(text), time.perf_counter()
        hn = generator.make_style(model, text, tokenizer, name=name)
        tokens = hn.extra["generated"]["example_tokens"]
        info = {"name": name, "tokens": tokens, "seconds": round(time.perf_counter() - start, 3),
                "description": f"made from an example of {tokens} tokens by {generator.name}",
                "base_model": hn.base_model}
        with self._lock:
            self._styles[name] = (hn, info)
            while len(self._styles) > self.max_kept:
                self._styles.popitem(last=False)
            self.made += 1
        return {**self.public(info), "cached": False}

    @staticmethod
    def public(info: dict) -> dict:  # what the API says of a style made
        return {k: info[k] for k in ("name", "tokens", "seconds")}

    def found(self, text: str) -> dict | None:
        """What :meth:`make` says of ``text``'s style when it is kept (then the most recently used)."""
        with self._lock:
            kept = self._styles.get(example_name(text))
            if kept is None:
                return None
            self._styles.move_to_end(kept[1]["name"])
            return {**self.public(kept[1]), "cached": True}

    def used(self, names) -> None:
        """Count ``names`` (those kept) as the most recently used."""
        with self._lock:
            for name in names:
                if name in self._styles:
                    self._styles.move_to_end(name)

    def get(self, name: str):
        """The network of the style ``name``, or None."""
        kept = self._styles.get(name)
        return None if kept is None else kept[0]

    def info(self, name: str) -> dict | None:
        """``{"description", "base_model"}`` of the style ``name``, or None."""
        kept = self._styles.get(name)
        return None if kept is None else {k: kept[1][k] for k in ("description", "base_model")}

    def names(self) -> list[str]:
        with self._lock:
            return list(self._styles)

    def __contains__(self, name) -> bool:
        return name in self._styles


class ServedStyles(Mapping):
    """What a server serves by name: the styles of ``library`` (a StyleLibrary, or a mapping of
    networks) and those ``generated`` from examples (a name in both is the generated style); a
    StyleLibrary's ``folder`` and ``refresh`` (:meth:`ResidentStyles.watch`)."""

    def __init__(self, library, generated: GeneratedStyles):
        self.library, self.generated = library, generated

    def __getitem__(self, name: str):
        hn = self.generated.get(name)
        return self.library[name] if hn is None else hn

    def __iter__(self):
        yield from self.library
        yield from (name for name in self.generated.names() if name not in self.library)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name) -> bool:
        return name in self.generated or name in self.library

    def signature(self, name: str):
        """What changes when a style's file is replaced: a made style never changes."""
        if name in self.generated:
            return ("generated",)
        signature = getattr(self.library, "signature", None)
        return signature(name) if signature is not None else None

    def info(self, name: str) -> dict:
        """``{"description", "base_model"}`` of a style."""
        info = self.generated.info(name)
        if info is not None:
            return info
        if hasattr(self.library, "info"):
            return self.library.info(name)
        hn = self.library[name]
        return {"description": hn.description or "", "base_model": hn.base_model}

    @property
    def folder(self):
        return self.library.folder

    def refresh(self, check=None) -> dict:
        """The library's :meth:`hnkit.StyleLibrary.refresh`."""
        return self.library.refresh(check=check)
