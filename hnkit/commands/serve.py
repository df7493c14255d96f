"""``hnkit serve``: a folder of styles behind an OpenAI-compatible completion server, and a studio page.

    hnkit serve --model runs/base --styles styles/            # http://127.0.0.1:8000/ and /v1
    HNKIT_API_KEY=... hnkit serve --model runs/base --styles styles/ --host 0.0.0.0

Point a front-end (SillyTavern, KoboldAI Lite, text-generation-webui, the ``openai`` client) at
``http://HOST:PORT/v1`` and pick a model ``BASE+style:strength``; or open the page. A style's PNG
beside it is shown on the page: ``styles/noir-front.png`` (its Pareto front, which
``hnkit eval-text --plot styles/noir.png --neutral-data ...`` draws), else ``styles/noir.png`` (its
strength sweep).

The styles folder is live: it is listed every ``--poll-interval`` seconds, and a style file added,
replaced or removed is served from the next batch on, without a restart (``/v1/models`` and the page
follow). A new or changed file is read once two listings in a row saw it the same (size, time,
inode), so a file still being copied is not read; hnkit's own saves, and ``mv`` within one file
system, put a whole file in place at once. A file that cannot be served is skipped with one line
(again only when it changes). At most ``--max-styles`` styles stay attached to the model; a request
naming another reads it, and the least recently used one is taken off.

A request may carry ``"style_example": "<a paragraph>"`` (or the page's "paste a paragraph"): the
style generator (``--generator``, default the one hnkit ships, read at the first such request)
makes that paragraph's style once and serves it in the same batches as the folder's styles, as
``example-<hash>``, while it is among the ``--max-generated`` kept. An explicit ``--generator`` made
for another model stops the server at start (one line naming both models); the default one is said
not to fit at the request (a 400).

Exposed beyond this machine, the server needs an API key (``HNKIT_API_KEY`` or ``--api-key-file``,
which ``ps`` does not show), and it bounds its connections: a request's headers must arrive within
``--header-timeout`` seconds, and then its body within as many again (else a 408); an idle
connection closes after KEEP_ALIVE seconds; a client that takes none of a response for SEND_TIMEOUT
seconds while the server's buffers are full is dropped; and at most ``--max-connections`` stay
open: a new one closes the one waiting longest for its request, or, when every one is busy with a
request, is closed itself. The cap is at most a quarter of the open-file limit (which hnkit serve
raises to its hard limit at start), so that the model's files and the engine have descriptors left;
the start line says the cap used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..connections import (GRACEFUL_SHUTDOWN, HEADER_TIMEOUT, MAX_CONNECTIONS, check_uvicorn, raise_file_limit,
                           uvicorn_server)
from ..errors import HnkitError

KEY_VARIABLE = "HNKIT_API_KEY"
MAX_STYLES = 64  # hnkit.engine.MAX_STYLES (not imported here: hnkit.engine imports torch)
MAX_GENERATED = 32  # hnkit.resident.MAX_GENERATED
MAX_GENERATED_LIMIT = 4096  # at about 10 MB a style (SmolLM2-135M), 40 GB: beyond any use
POLL_INTERVAL = 2.0  # seconds between two listings of the styles folder
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}  # the Host headers a loopback server answers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local folder (or hub id) of a causal LM")
    parser.add_argument("--styles", required=True, help="folder of style files (.safetensors, .pt)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only); any other address "
                             "needs an API key or --allow-unauthenticated")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on the API. Other users see it in ps: "
                             f"prefer the environment variable {KEY_VARIABLE} or --api-key-file. "
                             f"--api-key or --api-key-file (one of them) wins over {KEY_VARIABLE}")
    parser.add_argument("--api-key-file", default=None, metavar="PATH",
                        help="read the API key from the first line of PATH")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="serve an address other than this machine's loopback without an API key")
    parser.add_argument("--name", default=None,
                        help="the base model's name in the API (default: the model folder's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="rows generated together (default: 8)")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help=f"open connections at most (default: {MAX_CONNECTIONS}; at most a quarter of the "
                             "open-file limit); a new one closes the one waiting longest for its request, or "
                             "itself when all are busy")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT, metavar="SECONDS",
                        help="close a connection whose request headers take longer, and answer 408 to a "
                             f"request whose body takes as long again (default: {HEADER_TIMEOUT:g})")
    parser.add_argument("--max-styles", type=int, default=MAX_STYLES,
                        help=f"styles kept attached at once (default: {MAX_STYLES}); the least recently used "
                             "makes room for one a request names, read from its file again")
    parser.add_argument("--poll-interval", type=float, default=POLL_INTERVAL, metavar="SECONDS",
                        help="list the styles folder every SECONDS and serve the styles added, replaced or "
                             f"removed (default: {POLL_INTERVAL:g}; 0: never)")
    parser.add_argument("--generator", default=None, metavar="FILE",
                        help="the style generator that makes a request's style_example into a style (default: "
                             "the one hnkit ships, for SmolLM2-135M-Instruct, read at the first such request)")
    parser.add_argument("--max-generated", type=int, default=MAX_GENERATED, metavar="N",
                        help=f"styles made from examples kept (default: {MAX_GENERATED}); the least recently used "
                             "is dropped first; 0: make none")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


# -- who may connect -------------------------------------------------------------------------------
def api_key(args) -> str | None:
    """The API key from --api-key, --api-key-file or HNKIT_API_KEY (in that order); None without one.
    An empty key (``--api-key "$KEY"`` with KEY unset) is refused, not taken as no key."""
    if args.api_key is not None and args.api_key_file is not None:
        raise HnkitError("--api-key and --api-key-file: give one of them")
    if args.api_key_file is not None:
        path = Path(args.api_key_file).expanduser()
        try:
            key, where = path.read_text(encoding="utf-8").partition("\n")[0].strip(), f"--api-key-file {path}"
        except FileNotFoundError:
            raise HnkitError(f"--api-key-file {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise HnkitError(f"--api-key-file {path}: cannot read it ({exc})") from None
    elif args.api_key is not None:
        key, where = args.api_key, "--api-key"
    elif KEY_VARIABLE in os.environ:
        key, where = os.environ[KEY_VARIABLE], KEY_VARIABLE
    else:
        return None
    if not key:
        raise HnkitError(f"{where}: the API key is empty (an unset variable?); give a key, or none at all")
    if not all(33 <= ord(c) < 127 for c in key):
        raise HnkitError(f"{where}: the API key must be printable ASCII without spaces (it is sent in a header)")
    return key


def is_loopback(host: str) -> bool:
    """``localhost`` and 127.0.0.0/8, ::1: addresses only this machine can reach."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def allowed_hosts(host: str) -> set[str] | None:
    """The Host headers a server bound to ``host`` answers: the loopback names on a loopback address
    (a page of another site that resolves its name to 127.0.0.1 gets no answer); any elsewhere."""
    return LOOPBACK_NAMES | {host} if is_loopback(host) else None


def check_access(args) -> str | None:
    """The API key, with the address and options checked (before the model loads)."""
    key = api_key(args)
    if key is None and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise HnkitError(f"--host {args.host} lets other machines in: give an API key ({KEY_VARIABLE} or "
                         "--api-key-file), or --allow-unauthenticated to serve anyone who reaches the port")
    if not 0 < args.port < 65536:
        raise HnkitError(f"--port must be in 1..65535, got {args.port}")
    if not 1 <= args.max_connections <= 65536:
        raise HnkitError(f"--max-connections must be in 1..65536, got {args.max_connections}")
    if not 0 < args.header_timeout <= 3600:
        raise HnkitError(f"--header-timeout must be in (0, 3600] seconds, got {args.header_timeout:g}")
    return key


# -- the connection side ---------------------------------------------------------------------------
def listen_socket(host: str, port: int):
    """A socket bound to ``host:port`` (uvicorn listens on it), taken before the model loads, so a
    port in use is said at once."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise HnkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        if os.name != "nt":  # as asyncio does: a port in TIME_WAIT is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise HnkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is the port in use, or "
                         "the address not this machine's?)") from None
    return sock


def request_log(write):
    """``write`` for the request log, made unable to stop the server: the first failure (a full disk,
    a closed terminal) ends the log, with one line on stderr where stderr still takes it."""
    failed = False

    def log(line: str) -> None:
        nonlocal failed
        if failed:
            return
        try:
            write(line)
        except (OSError, ValueError) as exc:  # ValueError: a closed file
            failed = True
            try:
                print(f"hnkit serve: the request log stopped ({exc}); still serving", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    return log


# -- the model and its styles ----------------------------------------------------------------------
def usable_styles(library, model, say) -> None:
    """Drop from ``library`` the styles that cannot be served (a damaged file, widths that fit no
    layer of ``model``, a name with '+' or ':'), each with one line to ``say``."""
    from ..resident import check_servable

    for name in list(library):
        try:
            check_servable(model, name, library[name])  # every file read and checked now
        except (HnkitError, OSError) as exc:
            say(f"hnkit serve: skipped style {name!r} in {library.folder}: {exc}")
            library.discard(name)


def front_pictures(folder: Path, names) -> dict[str, Path]:
    """Style name -> the PNG the page shows: NAME-front.png (the Pareto front ``eval-text --plot
    NAME.png --neutral-data`` draws beside the sweep) when present, else NAME.png (the sweep). A
    style named NAME-front keeps its own NAME-front.png. The folder is listed once."""
    names = list(names)
    with os.scandir(folder) as entries:
        pngs = {e.name for e in entries if e.name.endswith(".png") and e.is_file()}
    taken = set(names)
    fronts = {}
    for name in names:
        found = [f for f in (None if f"{name}-front" in taken else f"{name}-front.png", f"{name}.png") if f in pngs]
        if found:
            fronts[name] = Path(folder) / found[0]
    return fronts


def live_fronts(library):
    """A function giving :func:`front_pictures` of ``library`` as it is now: looked up again when
    the styles or the folder (a PNG added or removed) changed."""
    kept = {"key": None, "fronts": {}}

    def fronts() -> dict[str, Path]:
        try:
            key = (library.version, library.folder.stat().st_mtime_ns)
            if key != kept["key"]:
                kept.update(key=key, fronts=front_pictures(library.folder, library))
        except OSError:  # the folder is gone: the pictures last seen (the watcher says why)
            pass
        return kept["fronts"]

    return fronts


def style_generator(path, kept: int, model):
    """The styles made from examples (:class:`hnkit.resident.GeneratedStyles`), ``kept`` at most; an
    explicit generator ``path`` is read and checked against ``model`` now (one line naming both)."""
    from ..resident import GeneratedStyles

    generated = GeneratedStyles(path, kept)
    if path is not None and kept:
        try:
            generated.generator(model)
        except HnkitError as exc:
            where = "" if str(exc).startswith(str(path)) else f"{path}: "
            raise HnkitError(f"--generator {where}{exc}") from None
    return generated


def build(args, thread: bool = False, say=None):
    """The engine (its own thread with ``thread``; else the caller runs ``serve_forever``), the base
    model's name and the styles' front pictures, with everything checked (shared with the tests).
    A style that cannot be served is left out with one line to ``say`` (default: stderr)."""
    import hnkit

    from ..engine import Engine
    from ..text import load_causal_lm
    from ..util import choose_device

    say = say or (lambda line: print(line, file=sys.stderr))
    if not 1 <= args.max_batch <= 256:
        raise HnkitError(f"--max-batch must be in 1..256, got {args.max_batch}")
    max_styles, poll = args.max_styles, args.poll_interval
    if not 1 <= max_styles <= 100_000:
        raise HnkitError(f"--max-styles must be in 1..100000, got {max_styles}")
    if not (poll == 0 or 0.01 <= poll <= 3600):
        raise HnkitError(f"--poll-interval must be 0 (never) or in [0.01, 3600] seconds, got {poll:g}")
    base = args.name or Path(args.model.rstrip("/")).name
    if not base or "+" in base or ":" in base:
        raise HnkitError(f"--name {base!r}: a model name must be non-empty, without '+' or ':'")
    path, kept = getattr(args, "generator", None), getattr(args, "max_generated", MAX_GENERATED)  # absent: defaults
    if not 0 <= kept <= MAX_GENERATED_LIMIT:
        raise HnkitError(f"--max-generated must be in 0..{MAX_GENERATED_LIMIT}, got {kept}")
    library = hnkit.StyleLibrary(args.styles, max_loaded=max_styles)
    device = choose_device(args.device)
    model, tokenizer = load_causal_lm(args.model)
    model.eval().to(device)
    usable_styles(library, model, say)
    generated = style_generator(path, kept, model)
    engine = Engine(model, tokenizer, library, max_batch=args.max_batch, thread=thread, max_styles=max_styles,
                    generated=generated)
    if poll:
        engine.watch(poll, say)
    return engine, base, live_fronts(library)


def run(args: argparse.Namespace) -> None:
    import signal
    import threading

    from rich.console import Console

    from ..server import create_app

    key = check_access(args)
    check_uvicorn()
    sock = listen_socket(args.host, args.port)
    console = Console(stderr=True)
    log = request_log(lambda line: console.log(line, highlight=False))
    try:
        limit = raise_file_limit()
        engine, base, fronts = build(args, say=log)
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, base, api_key=key, fronts=fronts, log=log, allowed_hosts=allowed_hosts(args.host),
                     body_timeout=args.header_timeout)
    cap = min(args.max_connections, max(limit // 4, 16))  # descriptors left for the model's files and the engine
    # HTTP in a thread; the model in this one, which loaded it (Engine: one thread runs torch)
    server = uvicorn_server(app, sock, header_timeout=args.header_timeout, max_connections=cap)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hnkit-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop: as Ctrl-C
    try:
        http.start()
        while not server.started and http.is_alive():
            time.sleep(0.02)
        if not server.started:
            raise HnkitError(f"cannot listen on {args.host}:{args.port}")
        where = f"[{args.host}]" if ":" in args.host else args.host
        lowered = "" if cap == args.max_connections else \
            f" (--max-connections {args.max_connections} lowered: the open-file limit is {limit})"
        log(f"hnkit serve: {base} with {len(engine.names)} styles ({', '.join(engine.names) or 'none'}) "
            f"on http://{where}:{args.port}/ (API: /v1{', key required' if key else ''}); at most {cap} "
            f"connections{lowered}; Ctrl-C stops")
        engine.serve_forever()
    finally:
        server.should_exit = True
        engine.close()
        http.join(timeout=GRACEFUL_SHUTDOWN + 2)
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)
