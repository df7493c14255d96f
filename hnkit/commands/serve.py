"""``hnkit serve``: a folder of styles behind an OpenAI-compatible completion server, and a studio page.

    hnkit serve --model runs/base --styles styles/            # http://127.0.0.1:8000/ and /v1
    hnkit serve --model runs/base --styles styles/ --host 0.0.0.0 --api-key "$KEY"

Point a front-end (SillyTavern, KoboldAI Lite, text-generation-webui, the ``openai`` client) at
``http://HOST:PORT/v1`` and pick a model ``BASE+style:strength``; or open the page. A PNG named like
a style (``styles/noir.png`` beside ``styles/noir.safetensors``, as ``hnkit eval-text --plot`` draws
it) is shown on the page as that style's perplexity front.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import HnkitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local folder (or hub id) of a causal LM")
    parser.add_argument("--styles", required=True, help="folder of style files (.safetensors, .pt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    parser.add_argument("--name", default=None, help="the base model's name in the API (default: the model folder's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="rows generated together (default: 8)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def build(args, thread: bool = False):
    """The engine (its own thread with ``thread``; else the caller runs ``serve_forever``), the base
    model's name and the styles' front pictures, with everything checked (shared with the tests)."""
    import hnkit

    from ..engine import Engine
    from ..text import load_causal_lm
    from ..util import choose_device

    if not 1 <= args.max_batch <= 256:
        raise HnkitError(f"--max-batch must be in 1..256, got {args.max_batch}")
    if not 0 < args.port < 65536:
        raise HnkitError(f"--port must be in 1..65535, got {args.port}")
    library = hnkit.StyleLibrary(args.styles)
    for name in library:
        library[name]  # every file read and checked now, not at the first request
    device = choose_device(args.device)
    model, tokenizer = load_causal_lm(args.model)
    model.eval().to(device)
    from .generate_text import check_styles_fit

    check_styles_fit(model, [(library[name], 1.0) for name in library])
    base = args.name or Path(args.model.rstrip("/")).name
    if not base or "+" in base or ":" in base:
        raise HnkitError(f"--name {base!r}: a model name must be non-empty, without '+' or ':'")
    fronts = {name: library.folder / f"{name}.png" for name in library
              if (library.folder / f"{name}.png").is_file()}
    engine = Engine(model, tokenizer, library, max_batch=args.max_batch, thread=thread)
    return engine, base, fronts


def run(args: argparse.Namespace) -> None:
    import signal
    import threading
    import time

    import uvicorn
    from rich.console import Console

    from ..server import create_app

    console = Console(stderr=True)
    engine, base, fronts = build(args)
    app = create_app(engine, base, api_key=args.api_key, fronts=fronts,
                     log=lambda line: console.log(line, highlight=False))
    # HTTP in a thread; the model in this one, which loaded it (Engine: one thread runs torch)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="critical"))

    def listen():
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind: said below, in one line
            pass

    http = threading.Thread(target=listen, name="hnkit-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.02)
    if not server.started:
        engine.close()
        raise HnkitError(f"cannot listen on {args.host}:{args.port} (is the port in use, or the address not this machine's?)")
    console.print(f"hnkit serve: {base} with {len(engine.names)} styles ({', '.join(engine.names) or 'none'}) "
                  f"on http://{args.host}:{args.port}/ (API: /v1); Ctrl-C stops")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop: as Ctrl-C
    try:
        engine.serve_forever()
    finally:
        server.should_exit = True
        engine.close()
        http.join(timeout=5)
