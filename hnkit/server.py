"""The HTTP side of ``hnkit serve``: an OpenAI-compatible completion server and the studio page.

Endpoints (FastAPI): ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(with server-sent events when ``"stream": true``), ``GET /`` (the studio page),
``GET /hnkit/styles`` and ``GET /hnkit/styles/{name}/front.png`` (what the page shows).

A request picks its styles in the model name, ``"base+noir:0.8+whimsy:-0.3"`` (a style without a
strength gets 1), and/or in an extra body field ``"hypernetworks": {"noir": 0.8}`` (which wins for
a style named in both). Every style named must exist, even at strength 0.

What is refused, always with OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``
and one line in the log (path, status, reason); the server keeps serving:

- a Host header not in ``allowed_hosts`` (400; DNS rebinding), a missing or wrong API key (401);
- a body that is not ``application/json``, not a JSON object, nested too deeply or holding a lone
  UTF-16 surrogate (400), larger than ``max_body_bytes`` (413, read no further than the limit), or
  not all there within ``body_timeout`` seconds of its being read (408); after a 413 or a 408
  the connection closes (the rest of the body would otherwise be read as the next request);
- a prompt of more than ``max_prompt_tokens`` tokens (400; a prompt with more than
  ``CHARS_PER_TOKEN`` characters per allowed token is refused before it is tokenized);
- ``stream``, ``ignore_eos`` and ``echo`` that are not true/false (400);
- OpenAI parameters hnkit does not implement (``NEUTRAL``: ``logprobs``, ``top_logprobs``,
  ``echo``, ``best_of``, ``suffix``, ``logit_bias``) unless absent, null or neutral (``logprobs``
  false, ``top_logprobs`` 0, ``echo`` false, ``best_of`` 1, ``suffix`` "", ``logit_bias`` {}): 400
  naming the parameter. Other unknown fields are ignored, as OpenAI's servers do.

A row whose generation fails ends with an error (a 500, or an error event in a stream) and the rest
of its batch goes on; when the engine closes, unfinished rows end with "the server is shutting down"
(a 503, or an error event then ``data: [DONE]``). Any other failure before the response has started
is a logged JSON 500. Once a stream has started its status is sent: an unexpected failure in it (a
bug) closes the connection mid-stream, so the client sees the response end without ``data: [DONE]``;
it is not in the request log (uvicorn reports it to its own logger, which ``hnkit serve`` runs at
level critical).
"""

# no "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time
import asyncio
import json
import math
import re
import secrets
import time
from pathlib import Path

from .engine import Engine, Job
from .errors import HnkitError, shown

STUDIO = Path(__file__).parent / "studio"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 512  # a chat request without max_tokens: a batch runs until its longest row ends
MAX_BODY_BYTES = 1_000_000  # a whole context of text is far less
BODY_TIMEOUT = 10.0  # seconds for a request's body (hnkit serve: --header-timeout): 1 MB needs 100 kB/s
CHARS_PER_TOKEN = 32  # no tokenizer's tokens average this many characters over a real prompt
NUMBER = (int, float)
FLAGS = ("stream", "ignore_eos", "echo")  # must be JSON booleans
# OpenAI parameters not implemented here: refused unless one of these values (compared with types)
NEUTRAL = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
           "suffix": (None, ""), "logit_bias": (None, {})}


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.kind = "server_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, param=None, code=None, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(log, path: str, status: int, message: str, param=None, code=None):
    """OpenAI's error JSON with ``status``, logged as one line. ASCII JSON: a lone surrogate echoed
    from a request cannot break the encoding. A 408 or 413 closes the connection: the body was not
    read to its end."""
    from fastapi.responses import Response

    log(f"{path} {status} {message[:200]}".encode("utf-8", "backslashreplace").decode("utf-8"))
    kind = "server_error" if status >= 500 else "invalid_request_error"
    headers = {"Connection": "close"} if status in (408, 413) else None
    return Response(json.dumps(error_body(message, param, code, kind)), status_code=status,
                    media_type="application/json", headers=headers)


# -- before a request is read ----------------------------------------------------------------------
HOST_HEADER = re.compile(r"""  # only ":port" may follow the name
    \[(?P<v6>[^\[\]]*)\](?::[0-9]*)?       # [::1]:8000
  | (?P<name>[^:\[\]]*)(?::[0-9]*)?        # localhost:8000, 127.0.0.1
  | (?P<bare>[^\[\]]*:[^\[\]]*:[^\[\]]*)  # ::1 (a bare IPv6 address has several colons, no port)
""", re.VERBOSE)


def host_name(header: str | None) -> str:
    """The host of a Host header, lower case, without its port, brackets or a trailing dot; a header
    that is not ``host[:port]`` (``[::1]evil``) is returned whole (no allowed host is like it)."""
    name = (header or "").strip().lower()
    match = HOST_HEADER.fullmatch(name)
    if match is None:
        return name
    host = next(part for part in match.group("v6", "name", "bare") if part is not None)
    return host.rstrip(".")


def refusal(request, api_key: str | None, allowed_hosts: set | None):
    """``(status, message, param, code)`` for a request refused before it is read, else None."""
    if allowed_hosts is not None:
        name = host_name(request.headers.get("host"))
        if name not in allowed_hosts:
            return (400, f"host {name!r} is not allowed: this server answers to {', '.join(sorted(allowed_hosts))} "
                    "only (use one of them in the URL)", None, "host_not_allowed")
    path = request.scope["path"]
    if api_key and path.startswith(("/v1/", "/hnkit/")) and not path.endswith("/front.png"):  # an <img> sends no key
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return 401, "invalid API key", None, "invalid_api_key"
    return None


async def read_body(request, limit: int) -> bytes:
    """The request's body, read no further than ``limit`` bytes."""
    too_large = RequestError(f"the request body is larger than this server's limit of {limit} bytes",
                             status=413, code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    async for piece in request.stream():  # a chunked body has no length: count as it comes
        data += piece
        if len(data) > limit:
            raise too_large
    return bytes(data)


async def read_json(request, limit: int, timeout: float) -> dict:
    """The request's JSON object, read no further than ``limit`` bytes, within ``timeout`` seconds
    (a client that sends half a body would otherwise hold its connection forever)."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        # a form or text/plain POST is what another web page could send to this machine unasked
        raise RequestError("the request body must be JSON with Content-Type: application/json")
    try:
        data = await asyncio.wait_for(read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} seconds", status=408,
                           code="request_timeout") from None
    try:
        body = json.loads(data)
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:  # JSON may escape a lone surrogate (\ud800), which no text can hold
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except UnicodeEncodeError:
        raise RequestError("the request body holds a lone UTF-16 surrogate (such as \\ud800) in a string: "
                           "that is not text") from None
    return body


# -- reading a request ---------------------------------------------------------------------------
def parse_model(name, base: str) -> dict[str, float]:
    """``{style: strength}`` from ``base[+style[:strength]]...``."""
    if not isinstance(name, str) or not name:
        raise RequestError("model must be a string such as " + repr(base), "model")
    head, *parts = name.split("+")
    if head != base:
        raise RequestError(f"unknown model {head!r}; this server serves {base!r} (GET /v1/models lists "
                           "it with its styles)", "model", 404, "model_not_found")
    styles = {}
    for part in parts:
        style, _, value = part.partition(":")
        try:
            styles[style] = float(value) if value else 1.0
        except ValueError:
            raise RequestError(f"model {name!r}: strength {value!r} of style {style!r} is not a number",
                               "model") from None
    return styles


def request_styles(body: dict, base: str, engine: Engine) -> dict[str, float]:
    """The request's ``{style: strength}``, every name known (even at 0), the zeros left out. An error
    names the field the strength came from: ``model`` (``base+noir:9``) or ``hypernetworks``."""
    styles = parse_model(body.get("model", base), base)
    field = dict.fromkeys(styles, "model")
    extra = body.get("hypernetworks")
    if extra is not None:
        if not isinstance(extra, dict):
            raise RequestError("hypernetworks must be an object {style: strength}", "hypernetworks")
        styles.update(extra)
        field.update(dict.fromkeys(extra, "hypernetworks"))
    out = {}
    for name, s in styles.items():
        try:
            value = float(s) if isinstance(s, NUMBER) and not isinstance(s, bool) else math.nan
        except OverflowError:  # an integer too large for a float
            value = math.nan
        if not math.isfinite(value):
            raise RequestError(f"strength of style {name!r} must be a finite number, got {shown(s)}", field[name])
        try:
            engine.check_styles({name: value})
        except HnkitError as exc:
            raise RequestError(str(exc), field[name]) from None
        out[name] = value
    return {name: value for name, value in out.items() if value != 0}


def number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int if integer else NUMBER) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{key} must be {kind} in [{low:g}, {high:g}], got {shown(value)}", key)
    return value


def flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{key} must be true or false, got {shown(value)}", key)
    return bool(value)


def refuse_unsupported(body: dict) -> None:
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if not any(type(value) is type(n) and value == n for n in neutral):
            raise RequestError(f"{key} is not supported by hnkit serve (got {shown(value)}): leave it out", key)


def sampling(body: dict, engine: Engine, max_default: int | None) -> dict:
    """The request's options, each checked: those of its rows, and ``stream`` and ``n``."""
    flags = {key: flag(body, key) for key in FLAGS}
    refuse_unsupported(body)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max_default
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(f"max_tokens must be a positive integer, got {shown(max_tokens)}", "max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {shown(seed)}", "seed")
    return dict(
        ignore_eos=flags["ignore_eos"], stream=flags["stream"],
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        max_tokens=max_tokens, stop=stop, seed=seed,
        n=number(body, "n", 1, 1, engine.max_batch, integer=True),
    )


def too_long(n: int, limit: int, engine: Engine, unit: str = "tokens") -> RequestError:
    where = " (the model's context)" if limit == engine.context else ""
    return RequestError(f"the prompt has {n} {unit}: more than this server's limit of {limit} tokens{where}", "prompt")


async def completion_ids(engine: Engine, prompts: list[str], limit: int) -> list[list[int]]:
    """The prompts' token ids, tokenized off the event loop, each at most ``limit`` tokens."""
    for p in prompts:  # a huge prompt is refused before it costs anything
        if len(p) > CHARS_PER_TOKEN * limit:
            raise too_long(len(p), limit, engine, "characters")
    ids = await asyncio.to_thread(lambda: [engine.tokenizer(p, add_special_tokens=True).input_ids for p in prompts])
    for x in ids:
        if len(x) > limit:
            raise too_long(len(x), limit, engine)
    return ids


async def chat_ids(engine: Engine, messages, limit: int) -> list[int]:
    """The chat template's token ids for ``messages``, off the event loop, at most ``limit`` tokens."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise RequestError("messages must be a list of {role, content} objects with string content", "messages")
    if not getattr(engine.tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template: use /v1/completions", "messages")
    chars = sum(len(m["role"]) + len(m["content"]) for m in messages)
    if chars > CHARS_PER_TOKEN * limit:
        raise too_long(chars, limit, engine, "characters")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        ids = await asyncio.to_thread(engine.tokenizer.apply_chat_template, turns, add_generation_prompt=True,
                                      tokenize=True)
    except Exception as exc:  # templates raise on what they refuse (roles that do not alternate, ...)
        raise RequestError(f"the model's chat template refused the messages: {exc}", "messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    if len(ids) > limit:
        raise too_long(len(ids), limit, engine)
    return list(ids)


# -- running a request -----------------------------------------------------------------------------
class Completion:
    """A request's rows in the engine, and its answer: whole (:meth:`answer`) or streamed
    (:meth:`stream`). Made in the event loop, which the engine's thread hands each piece of text."""

    def __init__(self, engine: Engine, request, body: dict, prompts: list[list[int]], chat: bool, log, base: str):
        self.engine, self.request, self.prompts, self.chat, self.log = engine, request, prompts, chat, log
        self.path = request.scope["path"]
        self.styles = request_styles(body, base, engine)
        opts = sampling(body, engine, None if chat else DEFAULT_MAX_TOKENS)
        n, self.streaming = opts.pop("n"), opts.pop("stream")
        if len(prompts) * n > engine.max_batch:
            raise RequestError(f"{len(prompts)} prompts x n={n} rows: at most {engine.max_batch} per request", "n")
        for ids in prompts:
            try:
                engine.check(self.styles, len(ids), self.max_tokens_for(ids, opts["max_tokens"]))
            except HnkitError as exc:
                raise RequestError(str(exc), "prompt") from None
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs = []
        for ids in prompts:
            for k in range(n):
                seed = None if opts["seed"] is None else (opts["seed"] + k) % 2**63  # any integer is a seed

                def emit(text, done, reason, index=len(self.jobs)):
                    loop.call_soon_threadsafe(self.events.put_nowait, (index, text, done, reason))

                self.jobs.append(Job(ids, self.styles, self.max_tokens_for(ids, opts["max_tokens"]), emit,
                                     temperature=opts["temperature"], top_p=opts["top_p"], stop=opts["stop"],
                                     seed=seed, ignore_eos=opts["ignore_eos"]))
        self.ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created, self.model = int(time.time()), body.get("model", base)
        self.started = time.perf_counter()
        for job in self.jobs:
            engine.submit(job)

    def max_tokens_for(self, ids, limit):  # no max_tokens (chat): up to CHAT_MAX_TOKENS, within the context
        return limit if limit is not None else max(1, min(CHAT_MAX_TOKENS, self.engine.context - len(ids)))

    def failure(self, index: int, text: str) -> tuple[int, str, str]:
        """The status, message and code of a row ended by an error: 503 when the server is shutting down."""
        if self.jobs[index].finish_reason == "shutdown":
            return 503, text, "server_shutting_down"
        return 500, f"generation failed: {text}", "server_error"

    def cancel(self) -> None:  # the rows not ended yet leave the batch
        for j in self.jobs:
            j.cancelled = True

    def finish_log(self, status: str) -> None:
        tokens = sum(len(j.tokens) for j in self.jobs)
        mix = " ".join(f"{k}:{v:g}" for k, v in self.styles.items()) or "no style"
        self.log(f"{self.path} {status} {mix} rows={len(self.jobs)} prompt={sum(len(p) for p in self.prompts)} "
                 f"new={tokens} {time.perf_counter() - self.started:.2f}s")

    def usage(self) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)  # once per prompt, as OpenAI counts it
        completion = sum(len(j.tokens) for j in self.jobs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def chunk(self, index, text, reason, delta=None) -> str:
        if self.chat:
            delta = delta or ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        data = {"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    async def stream(self):
        pending = len(self.jobs)
        try:
            if self.chat:
                for i in range(len(self.jobs)):
                    yield self.chunk(i, "", None, delta={"role": "assistant", "content": ""})
            while pending:
                index, text, done, reason = await self.events.get()
                if reason == "error":
                    status, message, code = self.failure(index, text)
                    self.log(f"{self.path} stream {status} {message[:200]}")
                    yield f"data: {json.dumps(error_body(message, code=code, kind='server_error'))}\n\n"
                    pending -= 1
                    continue
                if text:
                    yield self.chunk(index, text, None)
                if done:
                    pending -= 1
                    yield self.chunk(index, "", reason)
            yield "data: [DONE]\n\n"
            self.finish_log("stream")
        finally:
            if pending:  # the client went away
                self.cancel()
                self.finish_log("disconnected")

    async def answer(self):
        texts, reasons = [""] * len(self.jobs), [None] * len(self.jobs)
        pending = len(self.jobs)
        try:
            while pending:
                try:
                    index, text, done, reason = await asyncio.wait_for(self.events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await self.request.is_disconnected():
                        return None
                    continue
                if reason == "error":
                    status, message, code = self.failure(index, text)
                    self.cancel()  # the request's other rows
                    pending = 0
                    raise RequestError(message, status=status, code=code)
                texts[index] += text
                if done:
                    reasons[index] = reason
                    pending -= 1
        finally:
            if pending:  # the client went away
                self.cancel()
                self.finish_log("disconnected")
        self.finish_log("200")
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {"id": self.ident, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}


# -- the app ---------------------------------------------------------------------------------------
def create_app(engine: Engine, base: str, api_key: str | None = None, log=None, fronts: dict | None = None, *,
               allowed_hosts=None, max_body_bytes: int = MAX_BODY_BYTES, max_prompt_tokens: int | None = None,
               body_timeout: float = BODY_TIMEOUT):
    """The FastAPI app serving ``engine`` under the model name ``base``. ``fronts``: style name ->
    PNG path of its perplexity front (shown by the studio page). ``allowed_hosts``: the host names
    the Host header may name (None: any); ``max_body_bytes``: the largest request body;
    ``max_prompt_tokens``: the longest prompt (None: the model's context); ``body_timeout``:
    seconds a request's body may take to arrive."""
    from fastapi import FastAPI

    app = FastAPI(title="hnkit serve", docs_url=None, redoc_url=None)
    log = log or (lambda line: None)
    hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
    install_guards(app, log, api_key, hosts)
    add_page_routes(app, engine, base, fronts or {})
    add_completion_routes(app, engine, base, log, max_body_bytes, max_prompt_tokens or engine.context, body_timeout)
    return app


def install_guards(app, log, api_key: str | None, hosts: set | None) -> None:
    """The Host and key checks before every request, and OpenAI's error JSON for every refusal."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error_response(log, request.scope["path"], exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(HTTPException)  # no such path, a method the path does not take
    async def _http_error(request, exc: HTTPException):
        return error_response(log, request.scope["path"], exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = request.scope["path"]
        refused = refusal(request, api_key, hosts)
        if refused:
            return error_response(log, path, *refused)
        try:
            return await call_next(request)
        except Exception as exc:  # a bug, not the request's fault: said in JSON and logged
            log(f"{path} 500 {type(exc).__name__}: {str(exc)[:200]}")
            return JSONResponse(error_body(f"internal server error ({type(exc).__name__}); see the server's log",
                                           kind="server_error"), status_code=500)


def add_page_routes(app, engine: Engine, base: str, fronts: dict) -> None:
    """The model list, the styles, their fronts and the studio page."""
    from fastapi.responses import FileResponse, HTMLResponse

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        names = [base] + [f"{base}+{name}" for name in engine.names]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "hnkit"}
                                           for n in names]}

    @app.get("/hnkit/styles")
    async def styles():
        return {"model": base, "stacked": engine.stack is not None, "styles": [
            {"name": name, "description": engine.library[name].description or "",
             "front": f"/hnkit/styles/{name}/front.png" if name in fronts else None} for name in engine.names]}

    @app.get("/hnkit/styles/{name}/front.png")
    async def front(name: str):
        if name not in fronts:
            raise RequestError(f"no perplexity front for style {name!r}", status=404)
        return FileResponse(fronts[name], media_type="image/png")

    @app.get("/", response_class=HTMLResponse)
    async def studio():
        return HTMLResponse((STUDIO / "index.html").read_text(encoding="utf-8"))


def add_completion_routes(app, engine: Engine, base: str, log, max_body_bytes: int, prompt_limit: int,
                          body_timeout: float) -> None:
    """``/v1/completions`` and ``/v1/chat/completions``, whole or streamed."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    async def respond(request: Request, body: dict, prompts: list[list[int]], chat: bool):
        run = Completion(engine, request, body, prompts, chat, log, base)
        if run.streaming:
            return StreamingResponse(run.stream(), media_type="text/event-stream")
        answer = await run.answer()
        return JSONResponse({}, status_code=499) if answer is None else answer  # None: the client hung up

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, max_body_bytes, body_timeout)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise RequestError("prompt must be a string or a list of strings", "prompt")
        if len(prompt) > engine.max_batch:
            raise RequestError(f"{len(prompt)} prompts: at most {engine.max_batch} per request", "prompt")
        return await respond(request, body, await completion_ids(engine, prompt, prompt_limit), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, max_body_bytes, body_timeout)
        ids = await chat_ids(engine, body.get("messages"), prompt_limit)
        return await respond(request, body, [ids], chat=True)
