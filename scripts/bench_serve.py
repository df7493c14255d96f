"""Benchmark ``hnkit serve``: batched styles against serving requests one by one, and the server's
overhead over calling ``generate()`` directly. Every figure is a ratio within one round; nothing
here asserts a time.

    python scripts/bench_serve.py            # SmolLM2-135M, 8 styles, 8 x 64 new tokens, CPU (~6 min, 2 cores)
    python scripts/bench_serve.py --tiny     # a small random Llama: a smoke run

The styles are ``hnkit train-text``'s default network (per-site ``[1, 0.125, 1]`` ReLU) with random
weights (what a style computes does not depend on what it learned). The server runs in this process
(uvicorn in a thread) and is spoken to over HTTP on 127.0.0.1 by one client thread per request.
Greedy decoding with ``ignore_eos``, so every request makes exactly ``--tokens`` tokens.

Figures (each the median over rounds of a ratio of wall-clock times within the round):
1. 8 concurrent requests with 8 different styles: throughput against the same 8 sent one after another
   (target >= 3x) and against 8 concurrent requests that share one style (target >= 0.8x).
2. one request through the server against ``model.generate()`` with the same style attached by
   ``hnkit.steer`` in this process (target: at most 10 % slower). ``generate()`` runs in the
   engine's thread between batches, as the requests do: a :class:`Timed` job of the bench's own
   engine (:class:`BenchEngine`), submitted like a request's rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hnkit  # noqa: E402
from hnkit.engine import Engine, Job  # noqa: E402
from hnkit.testing import ServerThread, build_tiny_llama  # noqa: E402
from hnkit.text import load_causal_lm  # noqa: E402
from hnkit.util import cache_root  # noqa: E402

PROMPTS = ["The lighthouse keeper opened the door and", "In the year of the long winter, the village",
           "She read the letter twice before she", "The detective lit a cigarette and said",
           "Far beneath the city, the old machines", "Every morning the baker would",
           "The ship's log for that day records", "When the music stopped, nobody"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="transformers folder (default: SmolLM2-135M-Instruct in the cache)")
    p.add_argument("--tiny", action="store_true", help="a small random Llama built from a config (smoke run)")
    p.add_argument("--requests", type=int, default=8, help="concurrent requests, each with its own style")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    return p.parse_args(argv)


def model_folder(args, root: Path) -> Path:
    folder = Path(args.model or cache_root() / "SmolLM2-135M-Instruct").expanduser()
    if not folder.exists():
        sys.exit(f"{folder}: no such model; run: python scripts/prepare_smollm2.py")
    return build_tiny_llama(root / "tiny", folder) if args.tiny else folder


def write_styles(folder: Path, model_dir: Path, n: int) -> list[str]:
    """``n`` styles of train-text's default network, with random (non-zero) output layers."""
    from transformers import AutoModelForCausalLM

    from hnkit.commands.options import MODULE, module_config
    from hnkit.commands.train_text import OPTIONS

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = module_config({name: OPTIONS[name][1] for name in MODULE})
    folder.mkdir()
    names = [f"style{i}" for i in range(n)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        hn = hnkit.Hypernetwork.for_model(model, config, name=name)
        with torch.no_grad():
            for p in hn.parameters():
                p.normal_(0, 0.02)
        hnkit.save(hn, folder / f"{name}.safetensors")
    return names


@dataclass
class Timed(Job):
    """Not a row: ``fn()`` run by :class:`BenchEngine` in the engine's thread, between batches;
    ``seconds`` is what it returns."""
    fn: object = None
    seconds: float | None = None


class BenchEngine(Engine):
    """The server's engine, which also runs :class:`Timed` jobs: ``generate()`` is timed in the thread
    that runs the batches (the model's thread), like the requests it is compared with."""

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:
            if isinstance(job, Timed):
                job.seconds = job.fn()
                job.emit("", True, "stop")
        rows = [j for j in jobs if not isinstance(j, Timed)]
        if rows:
            super().run(rows)


def in_engine(engine: BenchEngine, fn, prompt_ids: list[int]) -> float:
    """What ``fn()`` returns, run in the engine's thread."""
    finished, said = threading.Event(), []

    def emit(text, done, reason):  # once: the job's end, or its error
        said.append(text)
        finished.set()

    job = Timed(prompt_ids, {}, 1, emit, fn=fn)
    engine.submit(job)
    finished.wait()
    if job.seconds is None:
        raise RuntimeError(f"the timed generate() failed: {said[0]}")
    return job.seconds


def post_all(client, bodies: list[dict], concurrent: bool) -> float:
    """Send the requests (all at once, or one after another); the seconds until the last answer.
    ``client``: one httpx.Client, whose kept-alive connections a front-end would hold too."""

    def send(body):
        r = client.post("/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == body["max_tokens"]

    started = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for b in bodies:
            send(b)
    return time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 130)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = model_folder(args, root)
        names = write_styles(root / "styles", model_dir, args.requests)
        model, tokenizer = load_causal_lm(str(model_dir))  # as hnkit serve loads it
        engine = BenchEngine(model.eval(), tokenizer, hnkit.StyleLibrary(root / "styles"), max_batch=args.requests)
        server = ServerThread(None, None, name="base", engine=engine)
        result = {}

        def drive():
            try:
                result["rc"] = run(args, console, server, names)
            finally:
                server.close()  # ends serve_forever

        driver = threading.Thread(target=drive)
        driver.start()
        server.engine.serve_forever()  # the model runs in this thread, which loaded it, as in hnkit serve
        driver.join()
        return result.get("rc", 1)


def run(args, console, server, names) -> int:
    import httpx

    client = httpx.Client(base_url=server.url, limits=httpx.Limits(max_connections=args.requests))
    engine = server.engine
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]

    def body(prompt, style):
        return {"model": f"base+{style}", "prompt": prompt, "max_tokens": args.tokens, "temperature": 0,
                "ignore_eos": True}

    mixed = [body(p, s) for p, s in zip(prompts, names)]
    same = [body(p, names[0]) for p in prompts]
    single = body(prompts[0], names[0])
    ids = engine.tokenizer(prompts[0], return_tensors="pt").input_ids

    @torch.no_grad()
    def generate_alone() -> float:
        engine.resident.remove()  # the engine's own styles are off while generate() runs alone
        try:
            started = time.perf_counter()
            with hnkit.steer(engine.model, {engine.library[names[0]]: 1.0}):
                out = engine.model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                            do_sample=False, pad_token_id=engine.pad)
            assert out.shape[1] == ids.shape[1] + args.tokens
            return time.perf_counter() - started
        finally:
            engine.resident.attach()

    def direct() -> float:
        return in_engine(engine, generate_alone, ids[0].tolist())  # in the engine's thread, between batches

    variants = {
        "sequential, 8 styles": lambda: post_all(client, mixed, False),
        "concurrent, 8 styles": lambda: post_all(client, mixed, True),
        "concurrent, 1 style": lambda: post_all(client, same, True),
        "one request, server": lambda: post_all(client, [single], False),
        "one request, generate()": direct,
    }
    post_all(client, mixed, True)  # warm-up
    direct()
    times = {k: [] for k in variants}
    order = list(variants)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:  # rotate: load falls on all alike
            times[name].append(variants[name]())
        console.log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))

    report(args, console, engine, times)
    return 0


def report(args, console, engine, times: dict) -> None:
    """The figures' table (each a median of per-round ratios), then each variant's tokens/s."""

    def ratio(a, b):
        values = [x / y for x, y in zip(times[a], times[b])]
        return statistics.median(values), min(values), max(values)

    n, t = args.requests, args.tokens
    table = Table("figure", "value", "rounds (min-max)", "target", "met",
                  title=f"hnkit serve: {n} requests x {t} new tokens, greedy; median of {args.rounds} rounds; "
                        f"{torch.get_num_threads()} threads; largest batch {engine.stats['largest']}")
    rows = [("1a throughput: 8 styles concurrent vs one after another",
             ratio("sequential, 8 styles", "concurrent, 8 styles"), 3.0, True),
            ("1b throughput: 8 styles concurrent vs 8 sharing one style",
             ratio("concurrent, 1 style", "concurrent, 8 styles"), 0.8, True),
            ("2 one request: server time / generate() time",
             ratio("one request, server", "one request, generate()"), 1.10, False)]
    for label, (value, low, high), target, at_least in rows:
        ok = value >= target if at_least else value <= target
        table.add_row(label, f"{value:.2f}x", f"{low:.2f}-{high:.2f}", f"{'>=' if at_least else '<='} {target:g}",
                      "[green]yes[/green]" if ok else "[red]no[/red]")
    console.print(table)
    for k, v in times.items():
        tokens = (n if "request" not in k else 1) * t
        console.print(f"{k}: {statistics.median(v):.2f} s, {tokens / statistics.median(v):.1f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
