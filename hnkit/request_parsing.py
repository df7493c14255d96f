"""Reading an OpenAI request for ``hnkit serve``: a request body becomes a checked
:class:`CompletionRequest`, or a :class:`RequestError` that names the field at fault (OpenAI's
``param``, given where the error is raised).

No HTTP here: the server reads the body's bytes and hands them over, so tests call these functions
directly. ``engine`` is an :class:`hnkit.engine.Engine`, or anything with its ``check_styles``,
``check``, ``max_batch``, ``context`` and ``tokenizer``.

Besides a body that is not a JSON object of text, what is refused (400 naming the field, or 404 for
an unknown model): unknown styles (even at strength 0) and strengths out of bounds; a prompt of more
than the server's limit of tokens (one with more than ``CHARS_PER_TOKEN`` characters per allowed
token is refused before it is tokenized), or leaving no room in the context for ``max_tokens``;
more rows (prompts x ``n``) than the engine's ``max_batch``; ``stream``, ``ignore_eos`` and ``echo``
that are not true/false; OpenAI parameters hnkit does not implement (``NEUTRAL``: ``logprobs``,
``top_logprobs``, ``echo``, ``best_of``, ``suffix``, ``logit_bias``) unless absent, null or neutral
(``logprobs`` false, ``top_logprobs`` 0, ``echo`` false, ``best_of`` 1, ``suffix`` "",
``logit_bias`` {}). Other unknown fields are ignored, as OpenAI's servers do.

An extra field ``style_example`` (text) asks for the style made from that example: it joins the
request's styles as ``example-<12 hex of the text's sha256>`` at strength 1, or at the strength the
model name or ``hypernetworks`` give that name. Refused (400, ``param`` "style_example"): not a
string, holding NUL bytes, shorter or longer than :mod:`hnkit.generator` allows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .steer import check_strength
from .errors import HnkitError, shown
from .generator import check_example
from .resident import example_name

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 512  # a chat request without max_tokens: a batch runs until its longest row ends
CHARS_PER_TOKEN = 32  # no tokenizer's tokens average this many characters over a real prompt
NUMBER = (int, float)
FLAGS = ("stream", "ignore_eos", "echo")  # must be JSON booleans
# OpenAI parameters not implemented here: refused unless one of these values (compared with types)
NEUTRAL = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
           "suffix": (None, ""), "logit_bias": (None, {})}


class RequestError(Exception):
    """A request refused: ``status`` (4xx, or 5xx for the server's own failures), OpenAI's ``param``
    (the body's field at fault, or None) and ``code``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.kind = "server_error" if status >= 500 else "invalid_request_error"


@dataclass
class CompletionRequest:
    """A checked request. ``texts`` (``/v1/completions``) or ``messages`` (chat) are the prompts;
    ``options`` are each row's :class:`hnkit.engine.Job` keywords; ``max_tokens`` None: as many as
    :func:`max_tokens_for` allows."""
    chat: bool
    model: str
    styles: dict[str, float]
    n: int
    stream: bool
    max_tokens: int | None
    options: dict = field(default_factory=dict)  # temperature, top_p, stop, seed, ignore_eos
    texts: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    example: str | None = None  # the text of style_example, whose style the server makes

    @property
    def prompt_field(self) -> str:  # the body's field that holds the prompts
        return "messages" if self.chat else "prompt"


# -- the body ------------------------------------------------------------------------------------
def parse_json(data: bytes) -> dict:
    """The JSON object in a request body's bytes."""
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


def parse_request(body: dict, engine, base: str, chat: bool) -> CompletionRequest:
    """``body`` checked, all but its prompts' lengths in tokens (:func:`prompt_ids`)."""
    texts, messages = ([], chat_messages(body.get("messages"))) if chat else (completion_texts(body, engine), [])
    options = sampling(body, engine)
    n, stream, max_tokens = options.pop("n"), options.pop("stream"), options.pop("max_tokens")
    if max_tokens is None and not chat:
        max_tokens = DEFAULT_MAX_TOKENS
    prompts = 1 if chat else len(texts)
    if prompts * n > engine.max_batch:
        raise RequestError(f"{prompts} prompts x n={n} rows: at most {engine.max_batch} per request", "n")
    example = style_example(body)
    made = None if example is None else example_name(example)
    styles = request_styles(body, base, engine, made)
    return CompletionRequest(chat, answer_model(body.get("model", base), base, made, styles), styles, n, stream,
                             max_tokens, options, texts, messages, example)


def completion_texts(body: dict, engine) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise RequestError("prompt must be a string or a list of strings", "prompt")
    if len(prompt) > engine.max_batch:
        raise RequestError(f"{len(prompt)} prompts: at most {engine.max_batch} per request", "prompt")
    return prompt


def chat_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise RequestError("messages must be a list of {role, content} objects with string content", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# -- styles --------------------------------------------------------------------------------------
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


def style_example(body: dict) -> str | None:
    """The request's ``style_example``, checked as an example (:func:`hnkit.generator.check_example`)."""
    text = body.get("style_example")
    if text is None:
        return None
    try:
        check_example(text)
    except HnkitError as exc:
        raise RequestError(f"style_example: {exc}", "style_example") from None
    return text


def answer_model(model: str, base: str, made: str | None, styles: dict) -> str:
    """The model name the answer gives: the request's, naming the style made from its example."""
    if made is None or made in parse_model(model, base):
        return model
    strength = styles.get(made, 0.0)
    return f"{model}+{made}" + ("" if strength == 1 else f":{strength:g}")


def request_styles(body: dict, base: str, engine, made: str | None = None) -> dict[str, float]:
    """The request's ``{style: strength}``, every name known (even at 0), the zeros left out. An error
    names the field the strength came from: ``model`` (``base+noir:9``) or ``hypernetworks``.
    ``made``: the name of the style the request's example makes (strength 1 unless given)."""
    styles = parse_model(body.get("model", base), base)
    fields = dict.fromkeys(styles, "model")
    extra = body.get("hypernetworks")
    if extra is not None:
        if not isinstance(extra, dict):
            raise RequestError("hypernetworks must be an object {style: strength}", "hypernetworks")
        styles.update(extra)
        fields.update(dict.fromkeys(extra, "hypernetworks"))
    if made is not None:
        styles.setdefault(made, 1.0)
        fields.setdefault(made, "style_example")
    out = {}
    for name, s in styles.items():
        try:
            value = float(s) if isinstance(s, NUMBER) and not isinstance(s, bool) else math.nan
        except OverflowError:  # an integer too large for a float
            value = math.nan
        if not math.isfinite(value):
            raise RequestError(f"strength of style {name!r} must be a finite number, got {shown(s)}", fields[name])
        try:
            if name == made:  # known once made
                check_strength(value, f"style {name!r}")
            else:
                engine.check_styles({name: value})
        except HnkitError as exc:
            raise RequestError(str(exc), fields[name]) from None
        out[name] = value
    return {name: value for name, value in out.items() if value != 0}


# -- sampling --------------------------------------------------------------------------------------
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


def max_tokens_field(body: dict) -> int | None:
    """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``; an error names the one given."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RequestError(f"{key} must be a positive integer, got {shown(value)}", key)
    return value


def sampling(body: dict, engine) -> dict:
    """The request's options, each checked: those of its rows, ``max_tokens``, ``stream`` and ``n``."""
    flags = {key: flag(body, key) for key in FLAGS}
    refuse_unsupported(body)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {shown(seed)}", "seed")
    return dict(
        ignore_eos=flags["ignore_eos"], stream=flags["stream"],
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        max_tokens=max_tokens_field(body), stop=stop, seed=seed,
        n=number(body, "n", 1, 1, engine.max_batch, integer=True),
    )


# -- prompts ---------------------------------------------------------------------------------------
def max_tokens_for(request: CompletionRequest, n_prompt: int, context: int) -> int:
    """A row's max_tokens; without one (chat), up to CHAT_MAX_TOKENS within the context."""
    if request.max_tokens is not None:
        return request.max_tokens
    return max(1, min(CHAT_MAX_TOKENS, context - n_prompt))


def too_long(request: CompletionRequest, n: int, limit: int, engine, unit: str = "tokens") -> RequestError:
    where = " (the model's context)" if limit == engine.context else ""
    return RequestError(f"the prompt has {n} {unit}: more than this server's limit of {limit} tokens{where}",
                        request.prompt_field)


def prompt_ids(request: CompletionRequest, engine, limit: int) -> list[list[int]]:
    """Each prompt's token ids, at most ``limit`` tokens and fitting the context with its max_tokens.
    Slow for long prompts: the server runs it off its event loop. A prompt with more than
    CHARS_PER_TOKEN characters per allowed token is refused before it is tokenized."""
    chars = [sum(len(m["role"]) + len(m["content"]) for m in request.messages)] if request.chat else \
        [len(t) for t in request.texts]
    for n in chars:  # a huge prompt is refused before it costs anything
        if n > CHARS_PER_TOKEN * limit:
            raise too_long(request, n, limit, engine, "characters")
    ids = [chat_ids(request, engine.tokenizer)] if request.chat else \
        [engine.tokenizer(t, add_special_tokens=True).input_ids for t in request.texts]
    for x in ids:
        if len(x) > limit:
            raise too_long(request, len(x), limit, engine)
        try:
            engine.check(request.styles, len(x), max_tokens_for(request, len(x), engine.context))
        except HnkitError as exc:  # an empty prompt, or no room left in the context for max_tokens
            raise RequestError(str(exc), request.prompt_field) from None
    return ids


def chat_ids(request: CompletionRequest, tokenizer) -> list[int]:
    """The chat template's token ids for the request's messages."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template: use /v1/completions", "messages")
    try:
        ids = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # templates raise on what they refuse (roles that do not alternate, ...)
        raise RequestError(f"the model's chat template refused the messages: {exc}", "messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
