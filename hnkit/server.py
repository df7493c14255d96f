"""The HTTP side of ``hnkit serve``: an OpenAI-compatible completion server and the studio page.

Endpoints (FastAPI): ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(with server-sent events when ``"stream": true``), ``GET /`` (the studio page),
``GET /hnkit/styles`` and ``GET /hnkit/styles/{name}/front.png`` (what the page shows).

A request picks its styles in the model name, ``"base+noir:0.8+whimsy:-0.3"`` (a style without a
strength gets 1), and/or in an extra body field ``"hypernetworks": {"noir": 0.8}`` (which wins for
a style named in both). Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status; the server keeps serving.
"""

# no "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time
import asyncio
import json
import math
import secrets
import time
from pathlib import Path

from .engine import Engine, Job
from .errors import HnkitError

STUDIO = Path(__file__).parent / "studio"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 512  # a chat request without max_tokens: a batch runs until its longest row ends
NUMBER = (int, float)


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.kind = "server_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, param=None, code=None, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- reading a request ---------------------------------------------------------------------------
def parse_model(name, base: str, engine: Engine) -> dict[str, float]:
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
    styles = parse_model(body.get("model", base), base, engine)
    extra = body.get("hypernetworks")
    if extra is not None:
        if not isinstance(extra, dict):
            raise RequestError("hypernetworks must be an object {style: strength}", "hypernetworks")
        styles.update(extra)
    out = {}
    for name, s in styles.items():
        try:
            value = float(s) if isinstance(s, NUMBER) and not isinstance(s, bool) else math.nan
        except OverflowError:  # an integer too large for a float
            value = math.nan
        if not math.isfinite(value):
            raise RequestError(f"strength of style {name!r} must be a finite number, got {str(s)[:40]}", "hypernetworks")
        if value != 0:
            out[name] = value
    return out


def number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int if integer else NUMBER) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{key} must be {kind} in [{low:g}, {high:g}], got {value!r}", key)
    return value


def sampling(body: dict, engine: Engine, max_default: int | None) -> dict:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max_default
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
    if not isinstance(body.get("ignore_eos", False), bool):
        raise RequestError("ignore_eos must be true or false", "ignore_eos")
    return dict(
        ignore_eos=body.get("ignore_eos", False),
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        max_tokens=max_tokens, stop=stop, seed=seed,
        n=number(body, "n", 1, 1, engine.max_batch, integer=True),
    )


# -- the app ---------------------------------------------------------------------------------------
def create_app(engine: Engine, base: str, api_key: str | None = None, log=None, fronts: dict | None = None):
    """The FastAPI app serving ``engine`` under the model name ``base``. ``fronts``: style name ->
    PNG path of its perplexity front (shown by the studio page)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="hnkit serve", docs_url=None, redoc_url=None)
    fronts = fronts or {}
    log = log or (lambda line: None)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return JSONResponse(error_body(exc.message, exc.param, exc.code, exc.kind), status_code=exc.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if api_key and path.startswith(("/v1/", "/hnkit/")) and not path.endswith("/front.png"):  # an <img> sends no key
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("invalid API key", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    async def read_body(request: Request) -> dict:
        if not request.headers.get("content-type", "").startswith("application/json"):
            # a form or text/plain POST is what another web page could send to this machine unasked
            raise RequestError("the request body must be JSON with Content-Type: application/json")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        names = [base] + [f"{base}+{name}" for name in engine.names]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "hnkit"}
                                           for n in names]}

    @app.get("/hnkit/styles")
    async def styles():
        return {"model": base, "styles": [
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

    async def generate(request: Request, body: dict, prompts: list[list[int]], chat: bool):
        styles = request_styles(body, base, engine)
        opts = sampling(body, engine, None if chat else DEFAULT_MAX_TOKENS)
        n = opts.pop("n")
        if len(prompts) * n > engine.max_batch:
            raise RequestError(f"{len(prompts)} prompts x n={n} rows: at most {engine.max_batch} per request", "n")
        limit = opts["max_tokens"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise RequestError(f"max_tokens must be a positive integer, got {limit!r}", "max_tokens")

        def max_tokens_for(ids):  # no max_tokens (chat): up to CHAT_MAX_TOKENS, within the context
            return limit if limit is not None else max(1, min(CHAT_MAX_TOKENS, engine.context - len(ids)))

        for ids in prompts:
            try:
                engine.check(styles, len(ids), max_tokens_for(ids))
            except HnkitError as exc:
                raise RequestError(str(exc), "model" if "style" in str(exc) else "prompt") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for p, ids in enumerate(prompts):
            for k in range(n):
                index = len(jobs)
                max_tokens = max_tokens_for(ids)
                seed = None if opts["seed"] is None else (opts["seed"] + k) % 2**63  # any integer is a seed

                def emit(text, done, reason, index=index):
                    loop.call_soon_threadsafe(events.put_nowait, (index, text, done, reason))

                jobs.append(Job(ids, styles, max_tokens, emit, temperature=opts["temperature"], top_p=opts["top_p"],
                                stop=opts["stop"], seed=seed, ignore_eos=opts["ignore_eos"]))
        for job in jobs:
            engine.submit(job)
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created, model = int(time.time()), body.get("model", base)
        started = time.perf_counter()

        def finish_log(status: str) -> None:
            tokens = sum(len(j.tokens) for j in jobs)
            mix = " ".join(f"{k}:{v:g}" for k, v in styles.items()) or "no style"
            log(f"{request.url.path} {status} {mix} rows={len(jobs)} prompt={sum(len(p) for p in prompts)} "
                f"new={tokens} {time.perf_counter() - started:.2f}s")

        def usage() -> dict:
            prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, as OpenAI counts it
            completion = sum(len(j.tokens) for j in jobs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def choice_delta(index, text, reason):
            if chat:
                return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": reason}
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

        def chunk(choices):
            return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model, "choices": choices}

        if body.get("stream"):
            async def stream():
                pending = len(jobs)
                try:
                    if chat:
                        for i in range(len(jobs)):
                            first = chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}])
                            yield f"data: {json.dumps(first)}\n\n"
                    while pending:
                        index, text, done, reason = await events.get()
                        if reason == "error":
                            err = error_body(f"generation failed: {text}", kind="server_error")
                            yield f"data: {json.dumps(err)}\n\n"
                            pending -= 1
                            continue
                        if text:
                            yield f"data: {json.dumps(chunk([choice_delta(index, text, None)]))}\n\n"
                        if done:
                            pending -= 1
                            yield f"data: {json.dumps(chunk([choice_delta(index, '', reason)]))}\n\n"
                    yield "data: [DONE]\n\n"
                    finish_log("stream")
                finally:
                    if pending:  # the client went away: its rows leave the batch
                        for j in jobs:
                            j.cancelled = True
                        finish_log("disconnected")

            return StreamingResponse(stream(), media_type="text/event-stream")

        texts, reasons = [""] * len(jobs), [None] * len(jobs)
        pending = len(jobs)
        try:
            while pending:
                try:
                    index, text, done, reason = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # the client hung up: its rows leave the batch
                        finish_log("disconnected")
                        return JSONResponse({}, status_code=499)
                    continue
                if reason == "error":
                    raise RequestError(f"generation failed: {text}", status=500, code="server_error")
                texts[index] += text
                if done:
                    reasons[index] = reason
                    pending -= 1
        finally:
            if pending:
                for j in jobs:
                    j.cancelled = True
        finish_log("200")
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": choices, "usage": usage()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise RequestError("prompt must be a string or a list of strings", "prompt")
        if len(prompt) > engine.max_batch:
            raise RequestError(f"{len(prompt)} prompts: at most {engine.max_batch} per request", "prompt")
        ids = [engine.tokenizer(p, add_special_tokens=True).input_ids for p in prompt]
        return await generate(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise RequestError("messages must be a list of {role, content} objects with string content", "messages")
        if not getattr(engine.tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template: use /v1/completions", "messages")
        try:
            ids = engine.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                       add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # templates raise on what they refuse (roles that do not alternate, ...)
            raise RequestError(f"the model's chat template refused the messages: {exc}", "messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return await generate(request, body, [list(ids)], chat=True)

    return app
