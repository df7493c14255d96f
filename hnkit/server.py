"""The HTTP side of ``hnkit serve``: an OpenAI-compatible completion server and the studio page.

Endpoints (FastAPI): ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(with server-sent events when ``"stream": true``), ``POST /v1/styles`` (a style from an example),
``GET /`` (the studio page), ``GET /hnkit/styles`` and ``GET /hnkit/styles/{name}/front.png``
(what the page shows).

A request picks its styles in the model name, ``"base+noir:0.8+whimsy:-0.3"`` (a style without a
strength gets 1), and/or in an extra body field ``"hypernetworks": {"noir": 0.8}`` (which wins for
a style named in both). Every style named must exist, even at strength 0.

A style from one paragraph: ``"style_example": "<text>"`` in a completion request, or
``POST /v1/styles`` with ``{"example": "<text>"}`` (answered ``{"name", "tokens", "seconds",
"cached"}``). The server's style generator (``hnkit serve --generator``) makes the style once, in the
engine's thread between batches, and keeps it (``--max-generated``, least recently used dropped
first) under the name ``example-<12 hex of the text's sha256>``, which the answer's ``model`` names
and later requests may name like any style. A generator made for another model is a 400 naming
both; one that cannot be read, a 503.

What is refused, always with OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``
and one line in the log (path, status, reason); the server keeps serving:

- a wrong Host header or API key, a body not JSON, too large or too slow (:mod:`hnkit.guards`);
- a body that is not a JSON object, nested too deeply or holding a lone UTF-16 surrogate (400), a
  prompt of more than ``max_prompt_tokens`` tokens, and the other mistakes
  :mod:`hnkit.request_parsing` lists (400, naming the ``param``; an unknown model is a 404).

A row whose generation fails ends with an error (a 500, or an error event in a stream) and the rest
of its batch goes on; when the engine closes, unfinished rows end with "the server is shutting down"
(a 503, or an error event then ``data: [DONE]``). Any other failure before the response has started
is a logged JSON 500. Once a stream has started its status is sent: an unexpected failure in it (a
bug) ends the stream with an error event (``server_error``) then ``data: [DONE]``, logged as one
line, and the request's rows leave the batch.

The parts, each testable alone: :mod:`hnkit.request_parsing` (a body -> a checked request, or a
4xx naming its ``param``), :class:`Completion` (the request's rows in the engine) and the answer's
JSON (:func:`completion_json`, :func:`chunk_event`), the guards (:mod:`hnkit.guards`). This module
holds them together: routes and logging.
"""

# no "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time
import asyncio
import json
import secrets
import time
from pathlib import Path

from .engine import Engine, EngineClosed, Job
from .errors import HnkitError
from .generator import check_example
from .guards import BODY_TIMEOUT, MAX_BODY_BYTES, error_body, host_name, install_guards, read_json
from .request_parsing import CompletionRequest, RequestError, max_tokens_for, parse_request, prompt_ids
from .resident import GeneratorUnavailable

STUDIO = Path(__file__).parent / "studio"
DONE = "data: [DONE]\n\n"


# -- the answer in OpenAI's JSON -------------------------------------------------------------------
def answer_head(request: CompletionRequest) -> dict:
    """The id, time and model that a request's answer, or each of its chunks, carries."""
    return {"id": ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
            "model": request.model}


def completion_json(head: dict, chat: bool, texts: list[str], reasons: list, usage: dict) -> dict:
    """A whole answer: one choice per row."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": head["id"], "object": "chat.completion" if chat else "text_completion",
            "created": head["created"], "model": head["model"], "choices": choices, "usage": usage}


def chunk_event(head: dict, chat: bool, index: int, text: str, reason, delta=None) -> str:
    """A server-sent event with row ``index``'s next ``text`` (and its ``reason`` when it ends)."""
    if chat:
        choice = {"index": index, "delta": delta or ({"content": text} if text else {}), "finish_reason": reason}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    return event({"id": head["id"], "object": "chat.completion.chunk" if chat else "text_completion",
                  "created": head["created"], "model": head["model"], "choices": [choice]})


def event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def usage(prompts: list[list[int]], jobs: list[Job]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, as OpenAI counts it
    completion = sum(len(j.tokens) for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def row_failure(job: Job, text: str) -> tuple[int, str, str]:
    """The status, message and code of a row ended by an error: 503 when the server is shutting down."""
    if job.finish_reason == "shutdown":
        return 503, text, "server_shutting_down"
    if job.finish_reason == "unknown_style":  # removed from the folder while the request waited
        return 400, text, None
    return 500, f"generation failed: {text}", "server_error"


# -- running a request -----------------------------------------------------------------------------
class Completion:
    """A request's rows in the engine, and its answer: whole (:meth:`answer`) or streamed
    (:meth:`stream`). Made in the event loop, whose queue the engine's thread hands each piece of
    text as ``(row, text, done, reason)``."""

    def __init__(self, engine: Engine, request: CompletionRequest, prompts: list[list[int]], log, path: str):
        self.request, self.prompts, self.log, self.path = request, prompts, log, path
        self.head = answer_head(request)
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seed = request.options["seed"]
        self.jobs = []
        for ids in prompts:
            for k in range(request.n):
                options = {**request.options, "seed": None if seed is None else (seed + k) % 2**63}  # any integer
                self.jobs.append(Job(ids, request.styles, max_tokens_for(request, len(ids), engine.context),
                                     self.emitter(loop, len(self.jobs)), **options))
        self.pending = len(self.jobs)  # rows not ended
        self.started = time.perf_counter()
        for job in self.jobs:
            engine.submit(job)

    def emitter(self, loop, index: int):
        def emit(text, done, reason):  # called in the engine's thread
            loop.call_soon_threadsafe(self.events.put_nowait, (index, text, done, reason))
        return emit

    async def next_event(self, timeout: float | None = None):
        """The next ``(row, text, done, reason)``; a row's last one counts it as ended."""
        item = await asyncio.wait_for(self.events.get(), timeout)
        if item[2]:
            self.pending -= 1
        return item

    def cancel(self) -> None:  # the rows not ended yet leave the batch
        for j in self.jobs:
            j.cancelled = True

    def finish_log(self, status: str) -> None:
        tokens = sum(len(j.tokens) for j in self.jobs)
        mix = " ".join(f"{k}:{v:g}" for k, v in self.request.styles.items()) or "no style"
        self.log(f"{self.path} {status} {mix} rows={len(self.jobs)} prompt={sum(len(p) for p in self.prompts)} "
                 f"new={tokens} {time.perf_counter() - self.started:.2f}s")

    async def stream(self):
        """Server-sent events: each row's text, an error event for a row that fails, then ``[DONE]``.
        An unexpected failure (a bug) ends the stream with an error event and ``[DONE]`` too."""
        try:
            async for piece in self.chunks():
                yield piece
            yield DONE
            self.finish_log("stream")
        except Exception as exc:
            self.log(f"{self.path} stream 500 {type(exc).__name__}: {str(exc)[:200]}")
            self.cancel()  # the request's rows not ended
            self.pending = 0
            yield event(error_body(f"internal server error ({type(exc).__name__}); see the server's log",
                                   kind="server_error"))
            yield DONE
        finally:
            if self.pending:  # the client went away, or the stream failed
                self.cancel()
                self.finish_log("disconnected")

    async def chunks(self):
        chat = self.request.chat
        if chat:
            for i in range(len(self.jobs)):
                yield chunk_event(self.head, chat, i, "", None, delta={"role": "assistant", "content": ""})
        while self.pending:
            index, text, done, reason = await self.next_event()
            if reason == "error":
                status, message, code = row_failure(self.jobs[index], text)
                self.log(f"{self.path} stream {status} {message[:200]}")
                yield event(error_body(message, code=code, kind="server_error"))
                continue
            if text:
                yield chunk_event(self.head, chat, index, text, None)
            if done:
                yield chunk_event(self.head, chat, index, "", reason)

    async def answer(self, disconnected):
        """The whole answer; None when ``await disconnected()`` says the client went away first."""
        texts, reasons = [""] * len(self.jobs), [None] * len(self.jobs)
        try:
            while self.pending:
                try:
                    index, text, done, reason = await self.next_event(1.0)
                except asyncio.TimeoutError:
                    if await disconnected():
                        return None
                    continue
                if reason == "error":
                    status, message, code = row_failure(self.jobs[index], text)
                    self.cancel()  # the request's other rows
                    self.pending = 0
                    raise RequestError(message, status=status, code=code)
                texts[index] += text
                if done:
                    reasons[index] = reason
        finally:
            if self.pending:  # the client went away
                self.cancel()
                self.finish_log("disconnected")
        self.finish_log("200")
        return completion_json(self.head, self.request.chat, texts, reasons, usage(self.prompts, self.jobs))


# -- the app ---------------------------------------------------------------------------------------
def create_app(engine: Engine, base: str, api_key: str | None = None, log=None, fronts: dict | None = None, *,
               allowed_hosts=None, max_body_bytes: int = MAX_BODY_BYTES, max_prompt_tokens: int | None = None,
               body_timeout: float = BODY_TIMEOUT):
    """The FastAPI app serving ``engine`` under the model name ``base``. ``fronts``: style name ->
    PNG path of its perplexity front (shown by the studio page), or a function giving that mapping
    as it is now (the styles' folder changes while the server runs). ``allowed_hosts``: the host names
    the Host header may name (None: any); ``max_body_bytes``: the largest request body;
    ``max_prompt_tokens``: the longest prompt (None: the model's context); ``body_timeout``:
    seconds a request's body may take to arrive."""
    from fastapi import FastAPI

    app = FastAPI(title="hnkit serve", docs_url=None, redoc_url=None)
    log = log or (lambda line: None)
    hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
    install_guards(app, log, api_key, hosts)
    add_page_routes(app, engine, base, fronts if callable(fronts) else (lambda: fronts or {}))
    add_completion_routes(app, engine, base, log, max_body_bytes, max_prompt_tokens or engine.context, body_timeout)
    return app


def style_info(library, name: str) -> dict:
    """A style's description and base model: the library's record of its file's metadata, or (a
    plain mapping of networks) the network's."""
    if hasattr(library, "info"):
        try:
            return library.info(name)
        except (HnkitError, OSError):  # its file went bad since it was listed: the next listing drops it
            return {"description": "", "base_model": None}
    hn = library[name]
    return {"description": hn.description or "", "base_model": hn.base_model}


def add_page_routes(app, engine: Engine, base: str, fronts) -> None:
    """The model list, the styles, their fronts and the studio page. ``fronts()``: style name -> PNG."""
    from fastapi.responses import FileResponse, HTMLResponse

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        entries = [{"id": base, "object": "model", "created": created, "owned_by": "hnkit"}]
        for name in engine.names:
            info = style_info(engine.library, name)
            entries.append({"id": f"{base}+{name}", "object": "model", "created": created, "owned_by": "hnkit",
                            "description": info["description"], "base_model": info["base_model"]})
        return {"object": "list", "data": entries}

    @app.get("/hnkit/styles")
    async def styles():
        pictures, attached = fronts(), set(getattr(engine, "members", ()))
        made = getattr(engine, "generated", ())
        return {"model": base, "stacked": engine.stack is not None, "max_styles": getattr(engine, "max_styles", None),
                "styles": [{"name": name, **style_info(engine.library, name), "attached": name in attached,
                            "front": f"/hnkit/styles/{name}/front.png" if name in pictures else None,
                            "generated": name in made}
                           for name in engine.names]}

    @app.get("/hnkit/styles/{name}/front.png")
    async def front(name: str):
        picture = fronts().get(name)
        if picture is None:
            raise RequestError(f"no perplexity front for style {name!r}", status=404)
        return FileResponse(picture, media_type="image/png")

    @app.get("/", response_class=HTMLResponse)
    async def studio():
        return HTMLResponse((STUDIO / "index.html").read_text(encoding="utf-8"))


def add_completion_routes(app, engine: Engine, base: str, log, max_body_bytes: int, prompt_limit: int,
                          body_timeout: float) -> None:
    """``/v1/completions`` and ``/v1/chat/completions``, whole or streamed."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    async def respond(request: Request, chat: bool):
        body = await read_json(request, max_body_bytes, body_timeout)
        parsed = parse_request(body, engine, base, chat)
        if parsed.example is not None:
            await made_style(engine, parsed.example, "style_example", log, request.scope["path"])
        prompts = await asyncio.to_thread(prompt_ids, parsed, engine, prompt_limit)  # off the event loop
        run = Completion(engine, parsed, prompts, log, request.scope["path"])
        if parsed.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream")
        answer = await run.answer(request.is_disconnected)
        return JSONResponse({}, status_code=499) if answer is None else answer  # None: the client hung up

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    @app.post("/v1/styles")
    async def make_style(request: Request):
        body = await read_json(request, max_body_bytes, body_timeout)
        try:
            check_example(body.get("example"))
        except HnkitError as exc:
            raise RequestError(f"example: {exc}", "example") from None
        made = await made_style(engine, body["example"], "example", log, "/v1/styles")
        if made["cached"]:
            log(f"/v1/styles 200 {made['name']} (made before)")
        return made


async def made_style(engine: Engine, text: str, param: str, log, path: str) -> dict:
    """The style of the example ``text`` (:meth:`Engine.style_from_example`), logged when made; a
    generator that does not fit the model is a 400 naming ``param``, one that cannot be read a 503."""
    try:
        made = await asyncio.wrap_future(engine.style_from_example(text))
        if not made["cached"]:
            log(f"{path} made {made['name']} from {made['tokens']} tokens in {made['seconds']:.2f}s")
        return made
    except EngineClosed as exc:
        raise RequestError(str(exc), status=503, code="server_shutting_down") from None
    except GeneratorUnavailable as exc:
        raise RequestError(f"this server's style generator cannot be read: {exc}", param, status=503,
                           code="generator_unavailable") from None
    except HnkitError as exc:
        raise RequestError(str(exc), param) from None
