"""``hnkit serve`` from the command line (issue 24): who may connect, how many connections and for how
long, a port in use, a failing log, damaged styles, the strength bound shared with generate-text."""

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hnkit import HnkitError
from hnkit.commands.cli import build_parser, main

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="hnkit serve needs fastapi and uvicorn (pip install -e .)")

from hnkit import connections  # noqa: E402
from hnkit.commands import serve  # noqa: E402
from hnkit.testing import ServerThread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hnkit.testing import build_tiny_styles

    return build_tiny_styles(tmp_path_factory.mktemp("serve_cli"))


def refused(capsys, argv) -> str:
    """The one stderr line of a command that must exit 2."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def said(err: str) -> str:
    """The log's text on one line: rich wraps it and puts the source line (serve.py:123) at the right."""
    return " ".join(w for w in err.split() if not re.fullmatch(r"serve\.py:\d+", w))


def serve_argv(tiny, *more, styles=None):
    # a styles folder that does not exist: a check that comes too late says so instead of the expected line
    return ["serve", "--model", str(tiny["model"]), "--styles", str(styles or "/nonexistent/styles"), *more]


# -- 1. the API key ----------------------------------------------------------------------------------
def test_an_empty_api_key_is_refused_not_ignored(tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HNKIT_API_KEY", raising=False)
    assert "API key is empty" in refused(capsys, serve_argv(tiny, "--api-key", ""))  # --api-key "$KEY", KEY unset
    monkeypatch.setenv("HNKIT_API_KEY", "")
    assert "HNKIT_API_KEY: the API key is empty" in refused(capsys, serve_argv(tiny))
    monkeypatch.delenv("HNKIT_API_KEY")
    assert "no such file" in refused(capsys, serve_argv(tiny, "--api-key-file", str(tmp_path / "none")))
    (tmp_path / "blank").write_text("\n  \nsecond line\n")
    assert "API key is empty" in refused(capsys, serve_argv(tiny, "--api-key-file", str(tmp_path / "blank")))
    line = refused(capsys, serve_argv(tiny, "--api-key", "a", "--api-key-file", str(tmp_path / "blank")))
    assert "give one of them" in line
    assert "printable ASCII" in refused(capsys, serve_argv(tiny, "--api-key", "two words"))


def test_the_key_comes_from_the_environment_or_a_file(monkeypatch, tmp_path, capsys):
    def args(**kw):
        return argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})

    monkeypatch.delenv("HNKIT_API_KEY", raising=False)
    assert serve.api_key(args()) is None
    monkeypatch.setenv("HNKIT_API_KEY", "from-env")
    assert serve.api_key(args()) == "from-env"
    (tmp_path / "key").write_text("  from-file  \nignored\n")
    assert serve.api_key(args(api_key_file=str(tmp_path / "key"))) == "from-file"  # an option wins
    assert serve.api_key(args(api_key="from-option")) == "from-option"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "HNKIT_API_KEY" in help_text and "--api-key-file" in help_text and "wins over HNKIT_API_KEY" in help_text


# -- 2. other machines need a key --------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost.example"])
def test_a_public_address_without_a_key_is_refused(tiny, capsys, monkeypatch, host):
    monkeypatch.delenv("HNKIT_API_KEY", raising=False)
    line = refused(capsys, serve_argv(tiny, "--host", host))
    assert f"--host {host} lets other machines in" in line and "--allow-unauthenticated" in line
    # with a key, or the flag, the command goes on (to binding the address, or the missing styles folder)
    line = refused(capsys, serve_argv(tiny, "--host", host, "--allow-unauthenticated"))
    assert "lets other machines in" not in line
    monkeypatch.setenv("HNKIT_API_KEY", "k3y")
    assert "lets other machines in" not in refused(capsys, serve_argv(tiny, "--host", host))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_addresses_need_no_key(host):
    assert serve.is_loopback(host)


# -- 3. DNS rebinding --------------------------------------------------------------------------------
def test_a_loopback_server_answers_only_loopback_host_names(tiny):
    assert serve.allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert serve.allowed_hosts("127.0.0.2") == {"localhost", "127.0.0.1", "::1", "127.0.0.2"}
    assert serve.allowed_hosts("0.0.0.0") is None and serve.allowed_hosts("192.168.1.20") is None
    server = ServerThread(tiny["model"], tiny["styles"])
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 200
        assert httpx.get(server.url + "/v1/models", headers={"Host": "localhost:1234"}).status_code == 200
        assert httpx.get(server.url + "/v1/models", headers={"Host": "evil.example"}).status_code >= 400
    finally:
        server.close()


# -- 4. connections ----------------------------------------------------------------------------------
def closed_after(sock, limit: float) -> float:
    """Seconds until the server closes ``sock`` (fails if it is still open after ``limit``)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        pytest.fail(f"the server kept a connection without complete headers open for {limit} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_request_whose_headers_never_end_is_closed(tiny):
    server = ServerThread(tiny["model"], tiny["styles"], header_timeout=0.5)
    port = int(server.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:  # half a header, then nothing
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert closed_after(sock, 5) < 3
        with socket.create_connection(("127.0.0.1", port)) as sock:  # a byte now and then: still a deadline
            sock.settimeout(0.1)
            start, closed = time.monotonic(), False
            for byte in b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                try:
                    sock.send(bytes([byte]))
                    if sock.recv(1) == b"":
                        closed = True
                        break
                except socket.timeout:  # nothing from the server: the next byte, 0.1 s later
                    continue
                except OSError:
                    closed = True
                    break
            assert closed and time.monotonic() - start < 3
        with socket.create_connection(("127.0.0.1", port)) as sock:  # a request answered, then half the next
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
            assert closed_after(sock, 5) < 3
        assert httpx.get(server.url + "/v1/models").status_code == 200
    finally:
        server.close()


def is_closed(sock) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_idle_connections_past_the_limit_do_not_stop_the_server(tiny):
    server = ServerThread(tiny["model"], tiny["styles"], max_connections=4)
    port = int(server.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        time.sleep(0.3)
        assert sum(is_closed(sock) for sock in idle) >= 16  # at most 4 stay open: the oldest made room
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                assert client.get(server.url + "/v1/models").status_code == 200
    finally:
        for sock in idle:
            sock.close()
        server.close()


def read_until_closed(sock, limit: float) -> bytes:
    """What the server sends on ``sock`` until it closes it (fails if still open after ``limit`` s)."""
    sock.settimeout(limit)
    data, deadline = b"", time.monotonic() + limit
    try:
        while piece := sock.recv(65536):
            data += piece
            assert time.monotonic() < deadline, f"still open after {limit} s: {data[:200]!r}"
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {limit} s: {data[:200]!r}")
    except ConnectionResetError:
        pass
    return data


def test_a_body_that_never_ends_is_a_408_and_frees_its_connection(tiny):
    """Every connection the cap allows sends its headers and half a body, then nothing: each is
    answered 408 and closed, and the server answers others."""
    server = ServerThread(tiny["model"], tiny["styles"], header_timeout=0.5, max_connections=4)
    port = int(server.url.rsplit(":", 1)[1])
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 50\r\n\r\n").encode()
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        for sock in slow:
            sock.sendall(head + b'{"model": "tiny", "pr')
        for sock in slow:
            answer = read_until_closed(sock, 5)
            assert answer.startswith(b"HTTP/1.1 408") and b'"code": "request_timeout"' in answer, answer[:300]
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200
        assert any("/v1/completions 408" in line for line in server.lines)
    finally:
        for sock in slow:
            sock.close()
        server.close()


@contextlib.contextmanager
def serving(app, **limits):
    """``app`` served as ``hnkit serve`` serves its own (connections.uvicorn_server), in a thread: its port."""
    sock = serve.listen_socket("127.0.0.1", 0)
    server = connections.uvicorn_server(app, sock, **limits)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_client_that_stops_reading_is_dropped():
    """A stream to a client that takes nothing ends once the buffers are full for ``send_timeout``."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    ended = threading.Event()

    async def endless():
        try:
            for _ in range(100_000):  # 6.5 GB if it were all sent: the client reads none of it
                yield b"x" * 65536
        finally:
            ended.set()

    async def endpoint(request):
        return StreamingResponse(endless(), media_type="text/event-stream")

    with serving(Starlette(routes=[Route("/", endpoint)]), send_timeout=0.5) as port:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert ended.wait(20), "the stream to a client that reads nothing is still running"


def test_a_flood_of_loop_errors_prints_a_bounded_number_of_lines(caplog):
    async def app(scope, receive, send):  # a request makes the server's loop report 2000 errors
        if scope["type"] != "http":
            return
        loop = asyncio.get_running_loop()
        for _ in range(2000):  # what asyncio reports when accept() runs out of file descriptors
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(errno.EMFILE, "Too many open files")})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with caplog.at_level(logging.ERROR, logger="asyncio"), serving(app) as port:
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 204
    told = [r for r in caplog.records if "accept() out of system resource" in r.getMessage()]
    assert 1 <= len(told) <= 10
    budget = connections.ErrorBudget(burst=2, period=0.05)
    plain = asyncio.new_event_loop()
    try:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(50):
                budget(plain, {"message": "boom"})
            time.sleep(0.06)
            budget(plain, {"message": "boom"})
        told = [r.getMessage() for r in caplog.records]
        assert told == ["boom", "boom", "48 more errors in the last 0.05 s were not shown", "boom"]
    finally:
        plain.close()


def test_a_uvicorn_without_what_the_limits_build_on_is_refused():
    import uvicorn

    connections.check_uvicorn()  # the installed one has it all

    class Bare:
        def __init__(self):
            self.transport = None

    with pytest.raises(HnkitError, match=rf"uvicorn {re.escape(uvicorn.__version__)} .*H11Protocol.connections"):
        connections.check_uvicorn(Bare, Bare)


def test_the_command_says_its_connection_cap_and_restores_sigterm(tiny, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = build_parser().parse_args(["serve", "--model", str(tiny["model"]), "--styles", str(tiny["styles"]),
                                      "--port", str(port), "--device", "cpu", "--max-connections", "7"])

    def stop():  # once it generates (it has said its start line), stop it as a service manager does
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        serve.run(args)
    assert signal.getsignal(signal.SIGTERM) is before
    assert "at most 7 connections; Ctrl-C stops" in said(capsys.readouterr().err)


def test_the_file_limit_is_raised_at_start():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit on open files is too low to lower the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        now = connections.raise_file_limit()
        assert now > 256 and resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
        assert connections.MAX_CONNECTIONS <= now // 4
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- 5. a port in use ---------------------------------------------------------------------------------
def test_a_port_in_use_is_said_before_the_model_loads(tiny, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the model folder does not exist: checked after the port, it is not what the line says
        line = refused(capsys, ["serve", "--model", "/nonexistent/model", "--styles", str(tiny["styles"]),
                                "--port", str(port)])
    assert line.startswith(f"hnkit: error: cannot listen on 127.0.0.1:{port}:"), line


# -- 6. the log ---------------------------------------------------------------------------------------
def test_a_log_on_a_full_disk_does_not_stop_the_server(tiny, capfd):
    calls = []

    def full_disk(line):
        calls.append(line)
        raise OSError(errno.ENOSPC, "No space left on device")

    server = ServerThread(tiny["model"], tiny["styles"], log=full_disk)
    try:
        body = {"model": "tiny+noir", "prompt": "The", "max_tokens": 2, "temperature": 0}
        for stream in (False, True, False):
            r = httpx.post(server.url + "/v1/completions", json={**body, "stream": stream}, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        server.close()
    assert len(calls) == 1  # tried once, then the log is off
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "request log" in ln]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "still serving" in lines[0]


# -- 7. damaged and unusable styles ---------------------------------------------------------------------
def test_a_damaged_style_is_skipped_and_the_rest_served(tiny, tmp_path):
    import hnkit

    folder = tmp_path / "styles"
    folder.mkdir()
    for name in ("noir", "whimsy"):
        shutil.copy(tiny["styles"] / f"{name}.safetensors", folder)
    (folder / "broken.safetensors").write_bytes(b"hello, not a style")
    shutil.copy(tiny["styles"] / "gothic.safetensors", folder / "noir+gothic.safetensors")
    shutil.copy(tiny["styles"] / "gothic.safetensors", folder / "gothic:2.safetensors")
    hnkit.save(hnkit.Hypernetwork(keys=[48]), folder / "elsewhere.safetensors")  # for a model 48 wide
    with pytest.raises(hnkit.HnkitError, match="broken"):  # the library stays strict
        hnkit.StyleLibrary(folder)["broken"]
    server = ServerThread(tiny["model"], folder)
    try:
        models = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        assert models == ["tiny", "tiny+noir", "tiny+whimsy"]
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "tiny+whimsy", "prompt": "The", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        server.close()
    skipped = [ln for ln in server.lines if "skipped style" in ln]
    assert len(skipped) == 4
    assert any("broken" in ln and "corrupt" in ln for ln in skipped)
    assert any("'elsewhere'" in ln for ln in skipped)
    assert any("noir+gothic" in ln and "'+' or ':'" in ln for ln in skipped)
    assert any("gothic:2" in ln and "'+' or ':'" in ln for ln in skipped)


def test_no_usable_style_serves_the_base_model(tiny, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x80 not a pickle")
    server = ServerThread(tiny["model"], tmp_path)
    try:
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["tiny"]
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "The", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        server.close()
    assert len([ln for ln in server.lines if "skipped style 'broken'" in ln]) == 1


# -- 8. one strength bound --------------------------------------------------------------------------------
def test_generate_text_has_the_strength_bound_of_serve(tiny, capsys):
    from hnkit.steer import MAX_STRENGTH  # the engine's bound too (it imports this one)

    assert MAX_STRENGTH == 4.0
    style = str(tiny["styles"] / "noir.safetensors")
    base = ["generate-text", "--model", str(tiny["model"]), "--prompt", "The", "--max-new-tokens", "2"]
    line = refused(capsys, base + ["--hypernetwork", f"{style}:1e6"])
    assert "strength 1e+06 is outside [-4, 4]" in line and "noir.safetensors" in line
    line = refused(capsys, base + ["--hypernetwork", f"{style}:0.8", "--strengths", "0,1,10"])
    assert "factor 10" in line and "strength 8 is outside [-4, 4]" in line
    assert main(base + ["--hypernetwork", f"{style}:-4", "--greedy"]) == 0  # the bound itself is allowed


# -- 9. the README's example -------------------------------------------------------------------------------
def test_the_readme_shows_the_safe_way_to_expose_a_server():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Serving styles: `hnkit serve`"):]
    section = section[:section.index("\n## ", 1)]
    assert "HNKIT_API_KEY" in section and "--api-key-file" in section
    commands = [ln.split("#")[0] for ln in section.splitlines() if re.match(r"^(\S+=\S+ )*hnkit serve ", ln)]
    assert len(commands) >= 3
    assert not any("--api-key " in c for c in commands)  # the trap: --api-key "$KEY" with KEY unset
    parser = build_parser()
    for command in commands:
        words = [w for w in shlex.split(command) if "=" not in w or w.startswith("--")]
        args = parser.parse_args([w.replace("...", "x") for w in words[1:]])  # every option exists
        if not serve.is_loopback(args.host):
            assert args.api_key is None and (args.api_key_file or "HNKIT_API_KEY=" in command)


# -- the whole command -----------------------------------------------------------------------------------
def test_the_command_serves_with_a_key_from_a_file(tiny, tmp_path):
    (tmp_path / "key").write_text("s3cret\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HNKIT_API_KEY", None)
    command = [sys.executable, "-m", "hnkit", "serve", "--model", str(tiny["model"]), "--styles", str(tiny["styles"]),
               "--port", str(port), "--device", "cpu", "--api-key-file", str(tmp_path / "key")]
    # at most 200 open files: the default --max-connections 256 is lowered to a quarter of that, said at start
    proc = subprocess.Popen(["sh", "-c", 'ulimit -n 200 && exec "$@"', "sh", *command],
                            env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1/models"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                r = httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret", "Host": "evil.example"}).status_code >= 400
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "s3cret" not in err and "key required" in err
    assert "at most 50 connections (--max-connections 256 lowered: the open-file limit is 200)" in said(err)
