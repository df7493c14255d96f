"""Batched generation with a style mix per row: what ``hnkit serve`` runs.

The styles of a :class:`hnkit.StyleLibrary` (up to ``max_styles`` of them) are attached at strength 0
(``blend="sum"``: a row's styles add their residuals to the same input, so the order in which a
request names them does not matter): as one :class:`hnkit.Stack` when they share a shape (two matrix
products per site for any mix of styles), else network by network.
Requests wait in a queue; a worker thread takes all that are waiting (up to ``max_batch`` rows),
left-pads their prompts into one batch, sets each style's strength per row and decodes them together
with the KV cache. Requests that arrive while a batch runs join the next one. Each row samples with
its own temperature, top-p and seed, and leaves the batch (its KV rows are dropped) when it ends:
at the end-of-text token, a stop string, ``max_tokens`` or its client's cancellation.

A row's tokens are those of the same request run alone (greedy; sampling too, with the same seed):
a style absent from a row is skipped for it (:class:`hnkit.strengths.PerRow`), so a row without styles
is the bare model's. Only the styles some row of the batch uses are computed, and only those (and the
last batch's) are set: a library of thousands of styles costs the model's passes no more than the
few it uses. One cost does grow with the library: on a stack, setting strengths rebuilds all N
members' strengths in Python (:meth:`hnkit.Attachment.set_strength`), once per batch and whenever
a row leaves it, not per token.

The library may change while the engine runs (``hnkit serve`` polls its folder: :meth:`watch`). At
most ``max_styles`` styles are attached at once: between batches, never while one runs, the engine
takes off the styles whose files were removed or replaced, reads those the next batch names that are
not attached (the least recently used make room) and attaches the new set in place of the old. A
batch keeps the weights it started with to its end; a job still waiting whose style is gone by then
ends as a request naming an unknown style would ("unknown style ...").

A row whose sampling or decoding fails ends alone with an error (``emit(message, True, "error")``);
the rest of its batch goes on. :meth:`Engine.close` ends every row not finished, waiting or running,
the same way with "the server is shutting down" (``finish_reason`` "shutdown"), as it does every
job submitted later.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .attach import attach
from .errors import HnkitError
from .stack import Stack
from .steer import MAX_STRENGTH, StyleLibrary
from .text import context_length

GREEDY_BELOW = 1e-5  # a lower temperature samples greedily: one-hot anyway, and dividing by a tinier one overflows
SHUTTING_DOWN = "the server is shutting down"
MAX_STYLES = 64  # styles attached at once (hnkit serve --max-styles): the others are read when named


@dataclass
class Job:
    """One row to generate. ``emit(text, done, finish_reason)`` is called from the worker thread
    with each new piece of text; the last call has ``done=True``."""
    prompt_ids: list[int]
    styles: dict[str, float]
    max_tokens: int
    emit: object
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens tokens whatever they are (benchmarks; vLLM's field)
    cancelled: bool = False
    # filled by the engine
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None


class Engine:
    """A causal LM with a library of styles, generating batches of :class:`Job`.

    One thread runs the model: :meth:`serve_forever` (``hnkit serve`` calls it in the main thread,
    which loaded the model), or, with ``thread=True``, a thread of the engine's own (tests). Torch
    work spread over two threads that each use intra-op parallelism (two OpenMP thread teams) ran
    about 2x slower on a 2-core CPU than in the thread that loaded the model (docs/benchmarks.md)."""

    def __init__(self, model, tokenizer, library, max_batch: int = 8, window: float = 0.05, thread: bool = False,
                 max_styles: int = MAX_STYLES):
        self.model, self.tokenizer, self.library = model, tokenizer, library
        self.max_batch, self.max_styles = max_batch, max_styles
        self.window = window  # seconds a new batch waits for more requests (those sent together run together)
        self.device = next(model.parameters()).device
        self.context = context_length(model) or 2048
        self.eos = set(_as_list(getattr(model.generation_config, "eos_token_id", None))
                       or _as_list(tokenizer.eos_token_id))
        # the KV cache's keyword: ``cache`` since transformers 5, ``past_key_values`` before
        parameters = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in parameters else "past_key_values"
        # the prompt pass needs the last position's logits only, not [B, T, vocab]
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        # the styles attached: name -> (its files' signature, network), least recently used first
        self.resident: OrderedDict[str, tuple] = OrderedDict()
        for name in self.names[:max_styles]:
            try:
                self.resident[name] = (self._signature(name), library[name])
            except (HnkitError, OSError):  # read again when a request names it
                pass
        self.attachment = None
        self.attach_styles()
        self.waiting: list[Job] = []  # submitted, not yet in a batch
        self._changed = threading.Condition()
        self.busy = threading.Lock()  # held while a batch is taken and run: holding it queues requests up
        self.stats = {"batches": 0, "rows": 0, "largest": 0, "cancelled": 0, "attached": 1}  # what the batches were
        self._stop = threading.Event()
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self.serve_forever, name="hnkit-engine", daemon=True)
            self._thread.start()

    @property
    def names(self) -> list[str]:
        """Every style the library holds now, attached or not."""
        return list(self.library)

    def _signature(self, name: str):
        """What changes when a style's file is replaced (None for a plain mapping of networks)."""
        return self.library.signature(name) if isinstance(self.library, StyleLibrary) else None

    def attach_styles(self):
        """Attach the resident styles at strength 0, in place of what was attached: one stack when they
        share a shape, else each network. Returns ``attachment`` (None without styles)."""
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment = None
        self.members = list(self.resident)
        self.positions = {name: i for i, name in enumerate(self.members)}
        self._set: set[str] = set()  # the styles the last batch set (every other one is at 0)
        networks = [hn for _, hn in self.resident.values()]
        try:  # a stack when the styles share a shape
            self.stack = Stack(networks, self.members) if networks else None
        except HnkitError:
            self.stack = None
        if self.stack is not None:
            self.attachment = attach(self.model, self.stack, 0.0, blend="sum")
        elif networks:
            self.attachment = attach(self.model, [(hn, 0.0) for hn in networks], blend="sum")
        return self.attachment

    # -- requests --------------------------------------------------------------------------------
    def check_styles(self, styles: dict[str, float]) -> None:
        """Refuse unknown styles (at any strength, 0 too) and strengths out of bounds."""
        for name, s in styles.items():
            if name not in self.library:
                raise HnkitError(self._unknown(name))
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not -MAX_STRENGTH <= s <= MAX_STRENGTH:
                raise HnkitError(f"strength of {name!r} must be a number in [{-MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got {s!r}")

    def _unknown(self, name: str) -> str:
        names = self.names
        known = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        return f"unknown style {name!r}; styles: {known or 'none'}"

    def check(self, styles: dict[str, float], n_prompt: int, max_tokens: int) -> None:
        """Refuse what a batch could not run: unknown styles, bad strengths, more styles than can be
        attached at once, prompts past the context."""
        self.check_styles(styles)
        if len(styles) > self.max_styles:
            raise HnkitError(f"{len(styles)} styles in one request: this server attaches at most "
                             f"{self.max_styles} at once (hnkit serve --max-styles)")
        if n_prompt == 0:
            raise HnkitError("the prompt is empty")
        if n_prompt + max_tokens > self.context:
            raise HnkitError(f"the prompt has {n_prompt} tokens and max_tokens is {max_tokens}: more than "
                             f"the model's context of {self.context} tokens")

    def submit(self, job: Job) -> None:
        """Queue ``job``; on a closed engine it ends at once ("the server is shutting down")."""
        self.check(job.styles, len(job.prompt_ids), job.max_tokens)
        with self._changed:
            if not self._stop.is_set():
                self.waiting.append(job)
                self._changed.notify()
                return
        self._end(job, "shutdown", SHUTTING_DOWN)

    def close(self) -> None:
        """Stop serving and take the styles off the model. Jobs still waiting, and the rows of the
        batch running (at its next step), end with "the server is shutting down"."""
        with self._changed:
            self._stop.set()
            queued, self.waiting = self.waiting, []
            self._changed.notify()
        for job in queued:
            self._end(job, "shutdown", SHUTTING_DOWN)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment = None

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
                changes = self.library.refresh(check=self.check_style_file)
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

    def check_style_file(self, name: str, hn) -> None:
        """Refuse a style that cannot be served here (:func:`check_servable`)."""
        check_servable(self.model, name, hn)

    # -- the worker ------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Take and run batches until :meth:`close`."""
        while True:
            with self._changed:
                while not self.waiting and not self._stop.is_set():
                    self._changed.wait()
                deadline = time.monotonic() + self.window
                while len(self.waiting) < self.max_batch and not self._stop.is_set() and time.monotonic() < deadline:
                    self._changed.wait(deadline - time.monotonic())
            if self._stop.is_set():
                return
            with self.busy:  # everything waiting when the engine is free goes into one batch
                with self._changed:  # the leading jobs (once closed, close() ends them)
                    taken = [] if self._stop.is_set() else self._take()
                batch = [j for j in taken if not j.cancelled]
                if batch:
                    self.run_batch(batch)

    def _take(self) -> list[Job]:
        """The leading waiting jobs, up to ``max_batch``, that name at most ``max_styles`` styles together."""
        taken, styles = [], set()
        for job in self.waiting[:self.max_batch]:
            more = styles | set(job.styles)
            if taken and len(more) > self.max_styles:
                break
            taken.append(job)
            styles = more
        del self.waiting[:len(taken)]
        return taken

    def run_batch(self, batch: list[Job]) -> None:
        """:meth:`run` once the batch's styles are attached; a failure ends its rows, not the server."""
        try:
            batch = self.prepare(batch)
            if batch:
                self.run(batch)
        except Exception as exc:
            for j in batch:
                self._end(j, "error", f"{type(exc).__name__}: {exc}")
        except BaseException:  # Ctrl-C or SIGTERM in this thread: the batch's clients are told
            for j in batch:
                self._end(j, "shutdown", SHUTTING_DOWN)
            raise

    def prepare(self, jobs: list[Job]) -> list[Job]:
        """Between batches: take off the styles whose files were removed or replaced, attach those
        ``jobs`` name (the least recently used making room). Returns the jobs to run: one naming a
        style that is gone, or whose file cannot be read now, ends with an error."""
        needed = {name for j in jobs for name in j.styles}
        stale = [name for name, (signature, _) in self.resident.items()
                 if name not in self.library or self._signature(name) != signature]
        for name in stale:
            del self.resident[name]
        failed, changed = {}, bool(stale)
        for name in sorted(needed - set(self.resident)):
            try:
                if name not in self.library:
                    raise HnkitError(self._unknown(name))
                self.resident[name] = (self._signature(name), self.library[name])
                changed = True
            except (HnkitError, OSError) as exc:
                failed[name] = str(exc)
        for name in sorted(needed & set(self.resident)):
            self.resident.move_to_end(name)  # most recently used last
        while len(self.resident) > self.max_styles:  # a batch names at most max_styles (_take)
            self.resident.popitem(last=False)
        if changed:
            self.attach_styles()
            self.stats["attached"] += 1
        for j in jobs:
            gone = next((name for name in j.styles if name in failed), None)
            if gone is not None:
                self._end(j, "unknown_style" if gone not in self.library else "error", failed[gone])
        return [j for j in jobs if j.finish_reason is None]

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """Generate every job to its end in one batch."""
        self.stats.update(batches=self.stats["batches"] + 1, rows=self.stats["rows"] + len(jobs),
                          largest=max(self.stats["largest"], len(jobs)))
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(j.seed if j.seed is not None else
                                                    int(torch.randint(0, 2**62, ()).item())) for j in jobs]
        live = list(range(len(jobs)))  # the batch's rows, as indices into jobs
        self._set_strengths([jobs[i] for i in live])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **self.last_only)
        cache = getattr(out, self.cache_key)
        if not hasattr(cache, "batch_select_indices"):  # a legacy tuple cache (older transformers)
            from transformers import DynamicCache

            cache = DynamicCache.from_legacy_cache(cache)
        logits = out.logits[:, -1]
        while True:
            if self._stop.is_set():  # closed: the rows end now, not at max_tokens
                for i in live:
                    self._end(jobs[i], "shutdown", SHUTTING_DOWN)
                return
            tokens = [self._step(jobs[i], logits[r], generators[i]) for r, i in enumerate(live)]
            keep = [r for r, token in enumerate(tokens) if token is not None]
            if not keep:
                return
            if len(keep) < len(live):  # ended rows leave the batch
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                tokens = [tokens[r] for r in keep]
                live = [live[r] for r in keep]
                self._set_strengths([jobs[i] for i in live])
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            positions = positions[:, -1:] + 1
            step = torch.tensor(tokens, device=self.device).unsqueeze(1)
            out = self.model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self.cache_key: cache})
            cache, logits = getattr(out, self.cache_key), out.logits[:, -1]

    def _set_strengths(self, jobs: list[Job]) -> None:
        """A column per row for each style the rows use, 0 for those the last batch set; the
        others are 0 already (so the cost does not grow with the library)."""
        if self.attachment is None:
            return
        used = {name for j in jobs for name in j.styles}
        columns = {name: [j.styles.get(name, 0.0) for j in jobs] for name in sorted(used, key=self.positions.get)}
        columns = {name: column if any(column) else 0.0 for name, column in columns.items()}
        columns.update({name: 0.0 for name in self._set - used})
        self._set |= used  # should setting fail, the next batch resets these too
        if self.stack is not None:
            self.attachment.set_strength(columns)  # a dict: members not named keep their strength
        else:
            for name, column in columns.items():
                self.attachment.set_strength(column, self.positions[name])
        self._set = used

    def _step(self, job: Job, logits: torch.Tensor, generator: torch.Generator) -> int | None:
        """``job``'s next token, taken in; None when the row has ended. A failure ends this row alone."""
        try:
            token = self._sample(logits, job, generator)
            return token if self._advance(job, token) else None
        except Exception as exc:
            self._end(job, "error", f"{type(exc).__name__}: {exc}")
            return None

    def _end(self, job: Job, reason: str, message: str) -> None:
        """End a job not finished with an error: ``finish_reason`` is ``reason``, ``emit`` gets ``message``."""
        if job.finish_reason is not None:
            return
        job.finish_reason = reason
        try:
            job.emit(message, True, "error")
        except Exception:  # its client is gone (a closed event loop): nobody to tell
            pass

    def _sample(self, logits: torch.Tensor, job: Job, generator: torch.Generator) -> int:
        if job.temperature < GREEDY_BELOW:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / job.temperature, dim=-1)
        if job.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= job.top_p  # keep the smallest head reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _advance(self, job: Job, token: int) -> bool:
        """Take ``token`` into ``job``, emit what can be sent; False when the job has ended."""
        if job.cancelled:
            self.stats["cancelled"] += 1
            job.finish_reason = "cancelled"
            return False
        ended = None
        if token in self.eos and not job.ignore_eos:
            ended = "stop"
        else:
            job.tokens.append(token)
            job.text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
            cut = min((k for k in (job.text.find(s) for s in job.stop) if k >= 0), default=-1)
            if cut >= 0:
                job.text, ended = job.text[:cut], "stop"
            elif len(job.tokens) >= job.max_tokens:
                ended = "length"
        if ended is None:
            # hold back a possible start of a stop string, and a character still being decoded
            hold = max((len(s) - 1 for s in job.stop), default=0)
            ready = len(job.text) - hold
            while ready > job.sent and job.text[ready - 1] == "\ufffd":
                ready -= 1
            if ready > job.sent:
                job.emit(job.text[job.sent:ready], False, None)
                job.sent = ready
            return True
        job.finish_reason = ended
        job.emit(job.text[job.sent:], True, ended)
        job.sent = len(job.text)
        return False


def check_servable(model, name: str, hn) -> None:
    """Refuse a style ``hnkit serve`` cannot serve: a name holding '+' or ':' (they separate styles and
    strengths in a model name), or widths that fit no attention layer of ``model``."""
    from .attach import check_fits
    from .targets import find_sites

    if "+" in name or ":" in name:
        raise HnkitError("a style name cannot hold '+' or ':' (they separate styles and strengths in a model name)")
    family, sites = find_sites(model)
    check_fits(hn, sites, family)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
