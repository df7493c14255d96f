"""The connection limits of ``hnkit serve``, on uvicorn's h11 protocol.

What each limit bounds:

- HEADER_TIMEOUT (``--header-timeout``): the seconds a request's headers may take, from the
  connection or from the previous response; a connection that sends none in time is closed.
- MAX_CONNECTIONS (``--max-connections``): the connections open at once; a new one closes the one
  waiting longest for its request, or itself when every one is busy with a request.
- SEND_TIMEOUT: the seconds a client may take nothing of a response while the server's buffers to it
  are full; then the connection is aborted.
- KEEP_ALIVE, BACKLOG, MAX_HEADER_BYTES, GRACEFUL_SHUTDOWN: uvicorn's own idle timeout, listen
  backlog, header size and shutdown grace, stated.
- raise_file_limit: the open-file soft limit, raised to the hard one (the cap is at most a quarter).
- ErrorBudget / with_error_budget: the event loop's error reports, at most ``burst`` a minute.

The protocol subclasses ``uvicorn.protocols.http.h11_impl.H11Protocol``, not public API: it
overrides connection_made, connection_lost, on_response_complete, pause_writing, resume_writing and
reads the fields connections, cycle, loop, transport and RequestResponseCycle.response_complete;
check_uvicorn refuses a uvicorn that lacks them. uvicorn is imported only inside functions, so
``import hnkit`` stays light.
"""

from __future__ import annotations

import time

from .errors import HnkitError

HEADER_TIMEOUT = 10.0  # seconds for a request's headers, from the connection or the previous response
KEEP_ALIVE = 5  # seconds an idle connection stays open between requests (uvicorn's default)
MAX_CONNECTIONS = 256  # open connections: well below the usual 1024 file descriptors
BACKLOG = 128  # connections the kernel queues before they are accepted
MAX_HEADER_BYTES = 16 * 1024  # a request's headers (h11's own default, stated)
SEND_TIMEOUT = 30.0  # seconds a client may take nothing while the server's buffers to it are full
GRACEFUL_SHUTDOWN = 3  # seconds running requests get at Ctrl-C before they are cancelled


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the soft limit."""
    try:
        import resource
    except ImportError:  # Windows
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # macOS refuses more than OPEN_MAX: keep the soft limit
            pass
    return soft


class ErrorBudget:
    """An event loop's exception handler that reports at most ``burst`` errors a minute (then how
    many more came): out of file descriptors, asyncio reports a traceback per connection waiting
    in the backlog, every second."""

    def __init__(self, burst: int = 10, period: float = 60.0):
        self.burst, self.period = burst, period
        self.start, self.told, self.dropped = time.monotonic(), 0, 0

    def __call__(self, loop, context) -> None:
        now = time.monotonic()
        if now - self.start >= self.period:
            if self.dropped:
                loop.default_exception_handler({"message": f"{self.dropped} more errors in the last "
                                                           f"{self.period:g} s were not shown"})
            self.start, self.told, self.dropped = now, 0, 0
        if self.told < self.burst:
            self.told += 1
            loop.default_exception_handler(context)
        else:
            self.dropped += 1


def with_error_budget(app):
    """``app`` with a bounded error report (ErrorBudget) on the server's own event loop, set when it
    starts (uvicorn's lifespan event comes first, in that loop): no process-wide hook."""
    import asyncio

    async def wrapped(scope, receive, send):
        if scope["type"] == "lifespan":
            asyncio.get_running_loop().set_exception_handler(ErrorBudget())
        await app(scope, receive, send)

    return wrapped


# what protocol_class builds on in uvicorn's h11 protocol (not public API): checked at start
PROTOCOL_METHODS = ("connection_made", "connection_lost", "on_response_complete", "pause_writing", "resume_writing")
PROTOCOL_FIELDS = ("connections", "cycle", "loop", "transport")  # set in H11Protocol.__init__
CYCLE_FIELDS = ("response_complete",)  # set in RequestResponseCycle.__init__


def check_uvicorn(protocol=None, cycle=None) -> None:
    """Refuse a uvicorn whose h11 protocol lacks what the connection limits build on (``protocol``
    and ``cycle``: uvicorn's H11Protocol and RequestResponseCycle unless given)."""
    import uvicorn

    if protocol is None or cycle is None:
        from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

        protocol, cycle = protocol or H11Protocol, cycle or RequestResponseCycle
    missing = [f"H11Protocol.{m}" for m in PROTOCOL_METHODS if not callable(getattr(protocol, m, None))]
    for cls, label, fields in ((protocol, "H11Protocol", PROTOCOL_FIELDS),
                               (cycle, "RequestResponseCycle", CYCLE_FIELDS)):
        names = cls.__init__.__code__.co_names  # the attributes __init__ sets, among other names
        missing += [f"{label}.{f}" for f in fields if f not in names]
    if missing:
        raise HnkitError(f"uvicorn {uvicorn.__version__} lacks what hnkit serve's connection limits build on "
                         f"({', '.join(missing)}): install one this hnkit supports: pip install 'uvicorn>=0.32.1,<1'")


def protocol_class(header_timeout: float, max_connections: int, send_timeout: float = SEND_TIMEOUT):
    """uvicorn's h11 protocol with the limits uvicorn lacks (its keep-alive timer starts only after a
    response, ``limit_concurrency`` answers 503 to requests but accepts any number of idle connections,
    and a response waits forever for a client that reads nothing): a request's headers must come
    within ``header_timeout`` seconds of the connection or of the previous response, at most
    ``max_connections`` stay open, and a client that takes nothing for ``send_timeout`` seconds while
    the buffers to it are full is dropped. What it adds is named ``_hnkit_*``: no clash with uvicorn's."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    check_uvicorn()

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._hnkit_header_timer = self._hnkit_send_timer = None
            self._hnkit_arm_header_timer()
            open_now = [c for c in self.connections if not c.transport.is_closing()]
            if len(open_now) > max_connections:  # close the one waiting longest for a request, else this
                waiting = [c for c in open_now if c is not self and c._hnkit_between_requests()]
                min(waiting, key=lambda c: c._hnkit_waiting_since, default=self).transport.close()

        def _hnkit_between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _hnkit_arm_header_timer(self) -> None:
            if self._hnkit_header_timer is not None:
                self._hnkit_header_timer.cancel()
            self._hnkit_waiting_since = self.loop.time()
            self._hnkit_header_timer = self.loop.call_later(header_timeout, self._hnkit_header_timeout)

        def _hnkit_header_timeout(self) -> None:
            self._hnkit_header_timer = None
            if self._hnkit_between_requests():  # no request's headers since the timer started
                self.transport.close()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._hnkit_arm_header_timer()  # before a pipelined request starts in super()
            super().on_response_complete()

        def pause_writing(self) -> None:  # the buffers to the client are full
            super().pause_writing()
            if self._hnkit_send_timer is None:  # abort: close() would wait for the buffer to be sent
                self._hnkit_send_timer = self.loop.call_later(send_timeout, self.transport.abort)

        def resume_writing(self) -> None:
            if self._hnkit_send_timer is not None:
                self._hnkit_send_timer.cancel()
                self._hnkit_send_timer = None
            super().resume_writing()

        def connection_lost(self, exc) -> None:
            for timer in (self._hnkit_header_timer, self._hnkit_send_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

    return Protocol


def uvicorn_server(app, sock, *, header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                   send_timeout: float = SEND_TIMEOUT, log_level: str = "critical"):
    """The uvicorn server for ``app`` on the bound ``sock`` (run it with ``server.run(sockets=[sock])``),
    with every connection limit: ``hnkit serve`` and the tests' ServerThread both use this."""
    import uvicorn

    config = uvicorn.Config(
        with_error_budget(app), host=sock.getsockname()[0], port=sock.getsockname()[1], log_level=log_level,
        http=protocol_class(header_timeout, max_connections, send_timeout), ws="none",
        timeout_keep_alive=KEEP_ALIVE, backlog=BACKLOG, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN)
    return uvicorn.Server(config)
