"""What ``hnkit serve`` refuses before a request reaches a route, and OpenAI's error JSON for every
refusal ``{"error": {"message", "type", "param", "code"}}``, logged as one line (path, status, reason):

- a Host header not in the allowed hosts (400; DNS rebinding), a missing or wrong API key (401);
- a body that is not ``application/json`` (400), larger than the limit (413, read no further than
  it), or not all there within its timeout (408); after a 413 or a 408 the connection closes (the
  rest of the body would otherwise be read as the next request);
- any failure of a route that is not the request's fault (a bug): a JSON 500.

:mod:`hnkit.server` installs them (:func:`install_guards`) and reads bodies with :func:`read_json`.
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at run time
import asyncio
import json
import re
import secrets

from .request_parsing import RequestError, parse_json

MAX_BODY_BYTES = 1_000_000  # a whole context of text is far less
BODY_TIMEOUT = 10.0  # seconds for a request's body (hnkit serve: --header-timeout): 1 MB needs 100 kB/s


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
    """The request's JSON object (:func:`hnkit.request_parsing.parse_json`), read no further than
    ``limit`` bytes, within ``timeout`` seconds (a client that sends half a body would otherwise hold
    its connection forever)."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        # a form or text/plain POST is what another web page could send to this machine unasked
        raise RequestError("the request body must be JSON with Content-Type: application/json")
    try:
        data = await asyncio.wait_for(read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} seconds", status=408,
                           code="request_timeout") from None
    return parse_json(data)


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
