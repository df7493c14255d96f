"""Batched generation with a style mix per row: what ``hnkit serve`` runs.

Requests wait in a queue; a worker thread takes all that are waiting (up to ``max_batch`` rows, naming
at most ``max_styles`` styles together), left-pads their prompts into one batch, sets each style's
strength per row and decodes them together with the KV cache. Requests that arrive while a batch runs
join the next one. Each row samples with its own temperature, top-p and seed, and leaves the batch
(its KV rows are dropped) when it ends: at the end-of-text token, a stop string, ``max_tokens`` or
its client's cancellation.

Which styles are on the model is :class:`hnkit.resident.ResidentStyles`' concern: the engine hands
it the styles of each batch before the batch runs (never during one), and each row's strengths.
A job still waiting whose style is gone by then ends as a request naming an unknown style would
("unknown style ...").

A row's tokens are those of the same request run alone (greedy; sampling too, with the same seed):
a style absent from a row is skipped for it (:class:`hnkit.strengths.PerRow`), so a row without styles
is the bare model's. Only the styles some row of the batch uses are computed, and only those (and the
last batch's) are set: a library of thousands of styles costs the model's passes no more than the
few it uses. One cost does grow with the library: on a stack, setting strengths rebuilds all N
members' strengths in Python (:meth:`hnkit.Attachment.set_strength`), once per batch and whenever
a row leaves it, not per token.

Styles made from examples (a request's ``style_example``: :class:`hnkit.resident.GeneratedStyles`)
are made in the engine's thread too, between two batches, with the styles on the model at strength
0 (:meth:`Engine.style_from_example`): the generator reads the example with the bare model, and no
batch runs meanwhile. Once made, such a style is served by name like a style of the library.

A row whose sampling or decoding fails ends alone with an error (``emit(message, True, "error")``);
the rest of its batch goes on. :meth:`Engine.close` ends every row not finished, waiting or running,
the same way with "the server is shutting down" (``finish_reason`` "shutdown"), as it does every
job submitted later.
"""

from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .errors import HnkitError
from .resident import MAX_STYLES, GeneratedStyles, ResidentStyles, ServedStyles, unknown_style
from .steer import check_strength
from .text import context_length

GREEDY_BELOW = 1e-5  # a lower temperature samples greedily: one-hot anyway, and dividing by a tinier one overflows
SHUTTING_DOWN = "the server is shutting down"


class EngineClosed(RuntimeError):
    """What a task given to a closed engine (:meth:`Engine.call`) fails with."""


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
                 max_styles: int = MAX_STYLES, generated: GeneratedStyles | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.generated = GeneratedStyles() if generated is None else generated  # styles made from examples
        self.library = ServedStyles(library, self.generated)  # every style served by name
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
        self.resident = ResidentStyles(model, self.library, max_styles)  # the styles attached
        self.waiting: list[Job] = []  # submitted, not yet in a batch
        self.tasks: list[tuple] = []  # (function, Future) to run between two batches (:meth:`call`)
        self._changed = threading.Condition()
        self.busy = threading.Lock()  # held while a batch is taken and run: holding it queues requests up
        self.counts = {"batches": 0, "rows": 0, "largest": 0, "cancelled": 0}  # what the batches were
        self._stop = threading.Event()
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self.serve_forever, name="hnkit-engine", daemon=True)
            self._thread.start()

    @property
    def names(self) -> list[str]:
        """Every style the library holds now, attached or not."""
        return list(self.library)

    @property
    def stack(self):
        """The resident styles' :class:`hnkit.Stack` (None: not stacked, or no style attached)."""
        return self.resident.stack

    @property
    def members(self) -> list[str]:
        """The styles attached now."""
        return self.resident.members

    # -- requests --------------------------------------------------------------------------------
    def check_styles(self, styles: dict[str, float]) -> None:
        """Refuse unknown styles (at any strength, 0 too) and strengths out of bounds."""
        for name, s in styles.items():
            if name not in self.library:
                raise HnkitError(unknown_style(self.names, name))
            check_strength(s, f"style {name!r}")

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

    def call(self, function) -> Future:
        """Run ``function()`` in the engine's thread before the next batch (nothing else runs the model
        then). Returns a Future of its result; on a closed engine it fails with :class:`EngineClosed`."""
        future = Future()
        with self._changed:
            if not self._stop.is_set():
                self.tasks.append((function, future))
                self._changed.notify()
                return future
        future.set_exception(EngineClosed(SHUTTING_DOWN))
        return future

    @property
    def stats(self) -> dict:
        """What the batches were, how many sets of styles were attached ("attached") and how many styles
        were made from examples ("generated"), read from where each is counted."""
        return {**self.counts, "attached": self.resident.builds, "generated": self.generated.made}

    def style_from_example(self, text: str) -> Future:
        """The style of the example ``text`` (:meth:`hnkit.resident.GeneratedStyles.make`), made
        unless kept: a Future of ``{name, tokens, seconds, cached}``, done at once when kept."""
        found = self.generated.found(text)
        if found is None:
            return self.call(lambda: self._make_style(text))
        future = Future()
        future.set_result(found)
        return future

    def _make_style(self, text: str) -> dict:
        self.resident.set_strengths([])  # every style at 0: the generator reads the bare model
        return self.generated.make(self.model, self.tokenizer, text)

    def close(self) -> None:
        """Stop serving and take the styles off the model. Jobs and tasks still waiting, and the rows
        of the batch running (at its next step), end with "the server is shutting down"."""
        with self._changed:
            self._stop.set()
            queued, self.waiting = self.waiting, []
            tasks, self.tasks = self.tasks, []
            self._changed.notify()
        for job in queued:
            self._end(job, "shutdown", SHUTTING_DOWN)
        for _, future in tasks:
            if future.set_running_or_notify_cancel():  # not cancelled by its caller
                future.set_exception(EngineClosed(SHUTTING_DOWN))
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.resident.close()

    def watch(self, interval: float, say=print) -> None:
        """Pick up the styles added, replaced or removed in the library's folder, until :meth:`close`
        (:meth:`hnkit.resident.ResidentStyles.watch`)."""
        self.resident.watch(interval, say)

    # -- the worker ------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the tasks given (:meth:`call`), take and run batches, until :meth:`close`."""
        while True:
            with self._changed:
                while not self.waiting and not self.tasks and not self._stop.is_set():
                    self._changed.wait()
                deadline = time.monotonic() + self.window
                while (not self.tasks and len(self.waiting) < self.max_batch and not self._stop.is_set()
                       and time.monotonic() < deadline):
                    self._changed.wait(deadline - time.monotonic())
            if self._stop.is_set():
                return
            with self.busy:  # everything waiting when the engine is free goes into one batch
                self._run_tasks()
                with self._changed:  # the leading jobs (once closed, close() ends them)
                    taken = [] if self._stop.is_set() else self._take()
                batch = [j for j in taken if not j.cancelled]
                if batch:
                    self.run_batch(batch)

    def _run_tasks(self) -> None:
        """The tasks given so far, each to its Future (an exception too)."""
        with self._changed:
            tasks, self.tasks = self.tasks, []
        for i, (function, future) in enumerate(tasks):
            if not future.set_running_or_notify_cancel():  # cancelled while it waited
                continue
            try:
                future.set_result(function())
            except Exception as exc:
                future.set_exception(exc)
            except BaseException:  # Ctrl-C or SIGTERM in this thread: the waiting callers are told
                future.set_exception(EngineClosed(SHUTTING_DOWN))
                for _, left in tasks[i + 1:]:
                    if left.set_running_or_notify_cancel():
                        left.set_exception(EngineClosed(SHUTTING_DOWN))
                raise

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
        """Between batches: attach the styles ``jobs`` name (:meth:`ResidentStyles.update`). Returns
        the jobs to run: one naming a style that is gone, or whose file cannot be read now, ends
        with an error."""
        needed = {name for j in jobs for name in j.styles}
        self.generated.used(needed)
        failed = self.resident.update(needed)
        for j in jobs:
            gone = next((name for name in j.styles if name in failed), None)
            if gone is not None:
                self._end(j, "unknown_style" if gone not in self.library else "error", failed[gone])
        return [j for j in jobs if j.finish_reason is None]

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """Generate every job to its end in one batch."""
        self.counts.update(batches=self.counts["batches"] + 1, rows=self.counts["rows"] + len(jobs),
                           largest=max(self.counts["largest"], len(jobs)))
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(j.seed if j.seed is not None else
                                                    int(torch.randint(0, 2**62, ()).item())) for j in jobs]
        live = list(range(len(jobs)))  # the batch's rows, as indices into jobs
        self.resident.set_strengths([jobs[i].styles for i in live])
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
                self.resident.set_strengths([jobs[i].styles for i in live])
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            positions = positions[:, -1:] + 1
            step = torch.tensor(tokens, device=self.device).unsqueeze(1)
            out = self.model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self.cache_key: cache})
            cache, logits = getattr(out, self.cache_key), out.logits[:, -1]

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
            self.counts["cancelled"] += 1
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


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
