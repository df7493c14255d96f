"""Hostile-client stress check of ``hnkit serve`` (not part of the test run): a real server in a
subprocess, attacked over HTTP and raw sockets on 127.0.0.1, with one fixed greedy request whose text
must stay the same before and after every phase.

    python scripts/stress_serve.py                      # every phase (~3 min, 2 cores)
    python scripts/stress_serve.py --many-styles 10000  # the many-styles phase at the issue's size

Phases:
1. start-up: an empty key, a non-loopback --host without a key and a port in use are refused in one
   line (exit 2) before the model loads; a damaged style file and a style named with '+' are skipped
   and the rest served; the key given through HNKIT_API_KEY does not show in the process's arguments.
2. hostile bodies: each must get a 4xx in OpenAI's error JSON, within 5 s, with the server's peak
   memory (VmHWM, reset before each case) under 100 MB over its baseline.
3. one client cannot fail another: five concurrent requests, one with a temperature of 1e-40.
4. connections: 200 slow-header sockets, then 1,100 idle sockets, while the fixed request is sent;
   the server's stderr must stay small.
5. 50 streams dropped after their first event.
6. many styles: the fixed request's time with --many-styles style files against 3 (ratio).
7. SIGTERM during a stream: the stream ends with an error event and [DONE]; the server exits.
Exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hnkit.testing import build_tiny_styles  # noqa: E402

KEY = "stress-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
FIXED = {"model": "tiny+noir:0.7", "prompt": "The lighthouse keeper", "max_tokens": 16, "temperature": 0}
MAX_GROWTH_MB = 100
MAX_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model, styles, port, *extra) -> list[str]:
    return [sys.executable, "-m", "hnkit", "serve", "--model", str(model), "--styles", str(styles),
            "--name", "tiny", "--port", str(port), "--device", "cpu", *extra]


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k != "HNKIT_API_KEY"}
    return {**out, "OMP_NUM_THREADS": "1", **extra}


class Server:
    """``hnkit serve`` in a subprocess with the key in its environment; stderr goes to a file."""

    def __init__(self, model, styles, root: Path, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(serve_command(model, styles, self.port, *extra), stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("wb"), env=env(HNKIT_API_KEY=KEY))
        deadline = time.time() + 600
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/v1/models", headers=AUTH, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the server did not start: {self.log.read_text()[-2000:]}")

    def status(self, field: str) -> float:
        """VmRSS or VmHWM of the server, in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)

    def fixed(self) -> str:
        r = httpx.post(self.url + "/v1/completions", json=FIXED, headers=AUTH, timeout=60)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str, bool]] = []

    def add(self, phase: str, case: str, result: str, ok: bool) -> None:
        self.rows.append((phase, case, result, ok))
        print(f"{'ok ' if ok else 'BAD'} {phase:12s} {case:44s} {result}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not ok for *_, ok in self.rows)


# -- 1. start-up ---------------------------------------------------------------------------------
def startup(built, root: Path, report: Report) -> None:
    model, styles = built["model"], built["styles"]

    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import hnkit.commands.cli, torch, transformers"], check=True)
    imports = time.perf_counter() - started  # what any command pays before it can say anything

    def refused(case, command, environment):
        started = time.perf_counter()
        try:
            r = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=30)
        except subprocess.TimeoutExpired:  # it started serving: not refused
            report.add("start-up", case, "started serving", False)
            return
        took = time.perf_counter() - started
        one_line = r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        report.add("start-up", case, f"rc {r.returncode} in {took:.1f} s: {r.stderr.strip()[:90]}",
                   one_line and took < imports + MAX_SECONDS)  # refused before the model loads

    refused("empty --api-key", serve_command(model, styles, free_port(), "--api-key", ""), env())
    refused("--host 0.0.0.0 without a key", serve_command(model, styles, free_port(), "--host", "0.0.0.0"), env())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        refused("port in use", serve_command(model, styles, busy.getsockname()[1]), env(HNKIT_API_KEY=KEY))
    mixed = root / "mixed-styles"
    shutil.copytree(styles, mixed)
    (mixed / "damaged.safetensors").write_bytes(os.urandom(256))
    shutil.copy(styles / "noir.safetensors", mixed / "a+b.safetensors")
    server = Server(model, mixed, root)
    try:
        names = [m["id"] for m in httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]]
        report.add("start-up", "damaged and '+'-named styles skipped", ", ".join(names),
                   "tiny+noir" in names and not any("damaged" in n or "a+b" in n for n in names))
        args = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        report.add("start-up", "key from HNKIT_API_KEY not in the arguments", "absent" if KEY not in args else "SHOWN",
                   KEY not in args)
        r = httpx.get(server.url + "/v1/models")
        report.add("start-up", "no key: 401", str(r.status_code), r.status_code == 401)
    finally:
        server.stop()


# -- 2. hostile bodies ---------------------------------------------------------------------------
def hostile_bodies() -> dict[str, tuple[str, dict, bytes]]:
    """case -> (path, extra headers, raw body)."""
    js = {"Content-Type": "application/json"}

    def body(**fields):
        return json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": 4, **fields}).encode()

    chat = "/v1/chat/completions"
    cases = {
        "form post (another web page)": ("/v1/completions", {"Content-Type": "application/x-www-form-urlencoded"},
                                         b"prompt=hi"),
        "not JSON": ("/v1/completions", js, b"{nope"),
        "JSON nested 100,000 deep": ("/v1/completions", js, b"[" * 100_000 + b"]" * 100_000),
        "lone surrogate in the prompt": ("/v1/completions", js, b'{"model": "tiny", "prompt": "a\\ud800b"}'),
        'stream: "false"': ("/v1/completions", js, body(stream="false")),
        "logprobs: 5": ("/v1/completions", js, body(logprobs=5)),
        "echo: true": ("/v1/completions", js, body(echo=True)),
        "best_of: 3": ("/v1/completions", js, body(best_of=3)),
        "NaN strength": ("/v1/completions", js, b'{"model": "tiny", "prompt": "x", "hypernetworks": {"noir": NaN}}'),
        "strength 1e6": ("/v1/completions", js, body(hypernetworks={"noir": 1e6})),
        "unknown style at strength 0": ("/v1/completions", js, body(model="tiny+nosuch:0")),
        "style name with traversal": ("/v1/completions", js, body(model="tiny+../../etc/passwd")),
        "n: 10^9": ("/v1/completions", js, body(n=10 ** 9)),
        "max_tokens: 10^9": ("/v1/completions", js, body(max_tokens=10 ** 9)),
        "temperature: -1": ("/v1/completions", js, body(temperature=-1)),
        "10,000 prompts": ("/v1/completions", js, body(prompt=["x"] * 10_000)),
        "10 MB prompt": ("/v1/completions", js, body(prompt="word " * 2_000_000)),
        "50 MB body": ("/v1/completions", js, body(prompt="word " * 10_000_000)),
        "chat: bad roles": (chat, js, json.dumps({"model": "tiny", "messages": [{"role": 3}]}).encode()),
        "chat: 10 MB message": (chat, js, json.dumps({"model": "tiny", "messages": [
            {"role": "user", "content": "word " * 2_000_000}]}).encode()),
    }
    return cases


def bodies(server: Server, reference: str, report: Report) -> None:
    baseline = server.status("VmRSS")
    for case, (path, headers, raw) in hostile_bodies().items():
        server.reset_peak()
        started = time.perf_counter()
        try:
            r = httpx.post(server.url + path, content=raw, headers={**AUTH, **headers}, timeout=30)
            status, shape = r.status_code, _openai_error(r)
        except httpx.HTTPError as exc:
            status, shape = type(exc).__name__, False
        took = time.perf_counter() - started
        growth = server.status("VmHWM") - baseline
        ok = isinstance(status, int) and 400 <= status < 500 and shape and took < MAX_SECONDS and growth < MAX_GROWTH_MB
        report.add("bodies", case, f"{status} in {took:.2f} s, peak +{growth:.0f} MB", ok)
    for case, headers in {"no key": {}, "wrong key": {"Authorization": "Bearer nope"},
                          "Host: evil.example (DNS rebinding)": {**AUTH, "Host": "evil.example"}}.items():
        r = httpx.post(server.url + "/v1/completions", json=FIXED, headers=headers, timeout=30)
        report.add("bodies", case, str(r.status_code), 400 <= r.status_code < 500)
    text = server.fixed()
    report.add("bodies", "fixed request unchanged", repr(text[:40]), text == reference)


def _openai_error(r: httpx.Response) -> bool:
    try:
        error = r.json()["error"]
        return isinstance(error, dict) and isinstance(error.get("message"), str)
    except (ValueError, KeyError, TypeError):
        return False


# -- 3. one client cannot fail another -----------------------------------------------------------
def isolation(server: Server, reference: str, report: Report) -> None:
    bodies_ = [FIXED, {**FIXED, "temperature": 1e-40}, {**FIXED, "temperature": 5e-39, "seed": 1},
               {**FIXED, "model": "tiny+whimsy", "temperature": 0.7, "seed": 2}, {**FIXED, "model": "tiny"}]
    results: list = [None] * len(bodies_)

    def send(i):
        try:
            results[i] = httpx.post(server.url + "/v1/completions", json=bodies_[i], headers=AUTH, timeout=60)
        except httpx.HTTPError as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [getattr(r, "status_code", type(r).__name__) for r in results]
    report.add("isolation", "5 together, one at temperature 1e-40", " ".join(map(str, codes)),
               all(c == 200 for c in codes))
    first = results[0].json()["choices"][0]["text"] if codes[0] == 200 else None
    report.add("isolation", "the greedy row's text as alone", repr((first or "")[:40]), first == reference)


# -- 4. connections ------------------------------------------------------------------------------
def connections(server: Server, reference: str, report: Report, slow: int, idle: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, slow + idle + 256)), hard))
    log_before = server.log.stat().st_size
    for case, count, payload in (("slow headers", slow, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
                                 ("idle sockets", idle, b"")):
        sockets = []
        for _ in range(count):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", server.port))
                if payload:
                    s.sendall(payload)
                sockets.append(s)
            except OSError:
                s.close()
                break
        started = time.perf_counter()
        try:
            text = server.fixed()
        except httpx.HTTPError as exc:
            text = f"{type(exc).__name__}"
        took = time.perf_counter() - started
        report.add("connections", f"{len(sockets)} {case} open: fixed request", f"{took:.2f} s {text[:30]!r}",
                   text == reference and took < MAX_SECONDS)
        time.sleep(12)  # past the server's header and keep-alive timeouts
        closed = sum(_closed_by_peer(s) for s in sockets)
        report.add("connections", f"{case} closed by the server after 12 s", f"{closed}/{len(sockets)}",
                   closed == len(sockets))
        for s in sockets:
            s.close()
    text = server.fixed()
    grown = (server.log.stat().st_size - log_before) / 1e6
    report.add("connections", "fixed request after; stderr growth", f"{grown:.2f} MB", text == reference and grown < 1)


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        data = s.recv(65536)
        while data:  # a 408 or 503 the server sent before closing
            data = s.recv(65536)
        return True  # EOF
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


# -- 5. dropped streams --------------------------------------------------------------------------
def dropped(server: Server, reference: str, report: Report, n: int) -> None:
    rss = server.status("VmRSS")
    for i in range(n):
        with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=60,
                          json={**FIXED, "stream": True, "max_tokens": 48, "seed": i, "temperature": 1}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
    text = server.fixed()
    report.add("streams", f"{n} dropped streams; fixed request after", f"RSS {rss:.0f} -> {server.status('VmRSS'):.0f} MB",
               text == reference)


# -- 6. many styles ------------------------------------------------------------------------------
def many_styles(built, root: Path, report: Report, n: int) -> None:
    folder = root / "many"
    shutil.copytree(built["styles"], folder)
    blob = (built["styles"] / "gothic.safetensors").read_bytes()
    for i in range(n):
        (folder / f"s{i:05d}.safetensors").write_bytes(blob)
    times = {}
    for label, styles in (("3", built["styles"]), (str(n + 3), folder)):
        server = Server(built["model"], styles, root)
        try:
            server.fixed()  # warm-up
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                server.fixed()
                runs.append(time.perf_counter() - started)
            times[label] = sorted(runs)[2]
        finally:
            server.stop()
    ratio = times[str(n + 3)] / times["3"]
    report.add("many styles", f"fixed request, {n + 3} styles vs 3 (median of 5)",
               f"{times[str(n + 3)] * 1e3:.0f} / {times['3'] * 1e3:.0f} ms = {ratio:.2f}x", ratio < 1.5)


# -- 7. SIGTERM during a stream ------------------------------------------------------------------
def sigterm(server: Server, report: Report) -> None:
    events: list[str] = []

    def listen():
        try:
            with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=60,
                              json={**FIXED, "stream": True, "max_tokens": 100, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as exc:
            events.append(f"({type(exc).__name__})")

    reader = threading.Thread(target=listen)
    reader.start()
    while not events:
        time.sleep(0.01)
    server.proc.terminate()
    reader.join(timeout=30)
    try:
        rc = server.proc.wait(timeout=MAX_SECONDS * 2)
    except subprocess.TimeoutExpired:
        rc = "still running"
    error = any('"error"' in e for e in events)
    ok = events[-1:] == ["[DONE]"] and error and rc != "still running"
    report.add("sigterm", "stream cut by SIGTERM", f"last events {events[-2:]!r:.70s}, rc {rc}", ok)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--many-styles", type=int, default=2000, help="style files in the many-styles phase")
    p.add_argument("--slow", type=int, default=200, help="slow-header sockets")
    p.add_argument("--idle", type=int, default=1100, help="idle sockets")
    p.add_argument("--dropped", type=int, default=50, help="streams dropped after their first event")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hnkit-stress-serve-"))
    report = Report()
    try:
        built = build_tiny_styles(root / "built")
        startup(built, root, report)
        server = Server(built["model"], built["styles"], root)
        try:
            reference = server.fixed()
            print(f"fixed request: {reference!r}; server RSS {server.status('VmRSS'):.0f} MB", flush=True)
            bodies(server, reference, report)
            isolation(server, reference, report)
            connections(server, reference, report, args.slow, args.idle)
            dropped(server, reference, report, args.dropped)
            sigterm(server, report)
        finally:
            server.stop()
        many_styles(built, root, report, args.many_styles)
    finally:
        if args.keep:
            print(f"work folder: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{len(report.rows) - report.failed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
