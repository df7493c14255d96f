"""``hnkit serve`` against hostile and odd clients (issue 24): each through a real HTTP client
talking to a real server (uvicorn on a free port)."""

import json
import socket
import threading
import time

import pytest
import torch

import hnkit
from hnkit.engine import Engine, Job
from hnkit.testing import ServerThread

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def post_raw(url, path, data: bytes):
    return httpx.post(url + path, content=data, headers={"content-type": "application/json"}, timeout=60)


def events(response) -> list:
    return [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]


def text_of(url, body) -> str:
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def together(engine, send, bodies) -> list:
    """``send(body)`` for each body at once; they queue while the engine is busy and run as one batch."""
    results = [None] * len(bodies)

    def ask(i):
        results[i] = send(bodies[i])

    with engine.busy:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while len(engine.waiting) < len(bodies) and time.time() < deadline:
            time.sleep(0.02)
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.fixture
def server(served):
    """``hnkit serve`` as the command builds it (hnkit.testing.ServerThread: its protocol and limits),
    with the given options of ``create_app``."""
    made = []

    def make(**options):
        made.append(ServerThread(served["model"], served["styles"], **options))
        return made[-1]

    yield make
    for s in made:
        s.close()


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send ``head`` and ``body`` on a socket and read what comes back until the server closes or
    ``timeout`` passes (the body is never finished, unless it says so)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        try:
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
        except socket.timeout:
            pass
    return data


# -- 1. one row's failure is that row's ---------------------------------------------------------------
def test_a_tiny_temperature_is_greedy_and_fails_no_batch(served):
    url, engine = served["url"], served["server"].engine
    prompts = ["The grammar of", "A statement", "Identifiers are", "Lambda forms", "Names"]
    temperatures = [1e-40, 0, 5e-39, 0, 0]
    bodies = [{"model": "tiny+noir:0.5", "prompt": p, "max_tokens": 8, "temperature": t}
              for p, t in zip(prompts, temperatures)]
    alone = [text_of(url, {**b, "temperature": 0}) for b in bodies]
    results = together(engine, lambda b: post(url, "/v1/completions", b), bodies)
    assert [r.status_code for r in results] == [200] * 5, [r.text for r in results]
    assert [r.json()["choices"][0]["text"] for r in results] == alone


def test_a_row_that_fails_ends_alone_and_the_batch_goes_on(served):
    """A row whose emit raises (its client's loop is gone) ends with an error; the others finish."""
    engine = served["server"].engine
    ids = engine.tokenizer("The grammar of").input_ids
    got = {0: [], 1: [], 2: []}

    def emit_for(k):
        def emit(text, done, reason):
            got[k].append((text, done, reason))
            if k == 1 and reason is None:
                raise RuntimeError("Event loop is closed")
        return emit

    jobs = [Job(ids, {"noir": 1.0}, 6, emit_for(k), temperature=0, ignore_eos=True) for k in range(3)]
    with engine.busy:
        engine.run(jobs)
    assert [j.finish_reason for j in jobs] == ["length", "error", "length"]
    assert len(jobs[0].tokens) == len(jobs[2].tokens) == 6 and jobs[0].text == jobs[2].text
    assert got[1][-1][1:] == (True, "error") and "Event loop is closed" in got[1][-1][0]


# -- 2. hostile JSON -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path, data, words", [
    ("/v1/completions", b"[" * 100_000, "nested too deeply"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 100_000, "nested too deeply"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}', "surrogate"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "hypernetworks": {"noir": "\\udfff"}}', "surrogate"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "surrogate"),
])
def test_hostile_json_is_a_logged_openai_400(served, path, data, words):
    lines = served["server"].lines
    n = len(lines)
    r = post_raw(served["url"], path, data)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    assert any(path in line and "400" in line and words in line for line in lines[n:]), lines[n:]
    assert post(served["url"], "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_an_unexpected_failure_is_a_logged_json_500(served):
    class Broken:  # an engine whose library fails when read
        names, context, max_batch, stack = ["noir"], 128, 8, None
        library = {}

        def close(self):
            pass

    s = ServerThread(None, None, engine=Broken())
    try:
        r = httpx.get(s.url + "/hnkit/styles", timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert any(line.startswith("/hnkit/styles 500 KeyError") for line in s.lines), s.lines
        r = httpx.get(s.url + "/no/such/path", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
        assert any(line.startswith("/no/such/path 404") for line in s.lines), s.lines
    finally:
        s.close()


class Garbling:
    """An engine double whose every row sends "hello", then a piece that is not text (a bug on the
    engine's side): the stream fails after its first chunk has gone out."""
    names, context, max_batch, stack, library = [], 128, 8, None, {}

    def __init__(self, tokenizer):
        self.tokenizer, self.jobs = tokenizer, []

    def check_styles(self, styles):
        pass

    def check(self, styles, n_prompt, max_tokens):
        pass

    def submit(self, job):
        self.jobs.append(job)
        job.emit("hello", False, None)
        job.emit(object(), False, None)  # json.dumps cannot write it

    def close(self):
        pass


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "x", "n": 2}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})])
def test_an_unexpected_failure_mid_stream_ends_with_an_error_event_then_done(served, path, body):
    engine = Garbling(served["server"].engine.tokenizer)
    s = ServerThread(None, None, engine=engine)
    try:
        lines = []
        with httpx.stream("POST", s.url + path, json={"model": "tiny", "stream": True, **body}, timeout=30) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]  # raises if the response ends unfinished
        data = [line[6:] for line in lines]
        assert data[-1] == "[DONE]" and any("hello" in d for d in data[:-2]), data
        error = json.loads(data[-2])["error"]
        assert error["type"] == "server_error" and "TypeError" in error["message"]
        assert any(line.startswith(f"{path} stream 500 TypeError") for line in s.lines), s.lines
        assert all(job.cancelled for job in engine.jobs)  # the request's rows leave the batch
        assert httpx.get(s.url + "/v1/models", timeout=30).status_code == 200  # the server goes on
    finally:
        s.close()


# -- 3, 4. types and parameters not implemented -------------------------------------------------------
@pytest.mark.parametrize("extra, param", [
    ({"stream": "false"}, "stream"), ({"ignore_eos": "yes"}, "ignore_eos"), ({"echo": 1}, "echo"),
    ({"logprobs": 5}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"), ({"top_logprobs": 2}, "top_logprobs"), ({"suffix": "end"}, "suffix"),
    ({"logit_bias": {"50": 10}}, "logit_bias"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
])
def test_parameters_of_the_wrong_type_or_not_implemented_are_refused(served, extra, param):
    r = post(served["url"], "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert not r.headers["content-type"].startswith("text/event-stream")


def test_neutral_values_of_parameters_not_implemented_are_accepted(served):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": False, "logprobs": None, "echo": False,
            "best_of": 1, "top_logprobs": 0, "suffix": None, "logit_bias": {}}
    r = post(served["url"], "/v1/completions", body)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


# -- 5. shutdown -----------------------------------------------------------------------------------------
def test_closing_the_engine_ends_every_request_with_an_error(server):
    s = server()
    engine = s.engine
    hook = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))  # a slow model
    body = {"model": "tiny+noir", "prompt": "The grammar of", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    streamed, first = [], threading.Event()

    def stream(_):
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                streamed.append(line)
                first.set()

    results = {}
    running = threading.Thread(target=lambda: results.update(whole=post(s.url, "/v1/completions", body)))
    try:
        with engine.busy:
            threads = [threading.Thread(target=stream, args=(0,)), running]
            for t in threads:
                t.start()
            while len(engine.waiting) < 2:
                time.sleep(0.02)
        assert first.wait(30)
        queued = threading.Thread(target=lambda: results.update(queued=post(s.url, "/v1/completions", body)))
        queued.start()
        while len(engine.waiting) < 1:
            time.sleep(0.02)
        engine.close()
        for t in threads + [queued]:
            t.join(timeout=20)
    finally:
        hook.remove()
    data = [line[6:] for line in streamed if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and "the server is shutting down" in json.loads(data[-2])["error"]["message"]
    for key in ("whole", "queued"):
        assert results[key].status_code == 503, results[key].text
        assert results[key].json()["error"]["message"] == "the server is shutting down"
    late = post(s.url, "/v1/completions", body)  # after close: refused at once, not left waiting
    assert late.status_code == 503


# -- 6. unknown styles at strength 0 -------------------------------------------------------------------
@pytest.mark.parametrize("model, extra", [("tiny+nosuch:0", None), ("tiny", {"nosuch": 0}), ("tiny+noir:0", {"nosuch": 0.0})])
def test_an_unknown_style_at_strength_0_is_refused(served, model, extra):
    r = post(served["url"], "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2, "hypernetworks": extra})
    assert r.status_code == 400 and "unknown style 'nosuch'" in r.json()["error"]["message"]


# -- 7. many styles: a batch touches the ones it uses --------------------------------------------------
@pytest.fixture(scope="module")
def many_styles(served, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("many")
    model = AutoModelForCausalLM.from_pretrained(served["model"])
    config = hnkit.HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")
    for i in range(60):
        torch.manual_seed(100 + i)
        hnkit.save(hnkit.Hypernetwork.for_model(model, config, name=f"s{i:02d}"), folder / f"s{i:02d}.safetensors")
    return folder


def test_a_batch_sets_and_computes_only_the_styles_it_uses(served, many_styles, tmp_path):
    from hnkit.text import load_causal_lm

    def engine_for(names):  # a library of just these styles of many_styles
        folder = tmp_path / "-".join(names)
        folder.mkdir()
        for name in names:
            (folder / f"{name}.safetensors").write_bytes((many_styles / f"{name}.safetensors").read_bytes())
        model, tokenizer = load_causal_lm(str(served["model"]))
        return Engine(model.eval(), tokenizer, hnkit.StyleLibrary(folder))

    def run(engine, styles_per_row):
        ids = engine.tokenizer("The grammar of").input_ids
        jobs = [Job(ids, styles, 6, lambda *a: None, temperature=0, ignore_eos=True) for styles in styles_per_row]
        engine.run(jobs)
        return [j.tokens for j in jobs]

    model, tokenizer = load_causal_lm(str(served["model"]))
    big = Engine(model.eval(), tokenizer, hnkit.StyleLibrary(many_styles))
    assert big.stack is not None and len(big.names) == 60
    # the styles not used get NaN weights (a stack's tensors are [member, ...]): a batch that computed
    # any of them, even at strength 0 (0 * NaN is NaN), would give other tokens
    unused = [i for i, name in enumerate(big.names) if name not in ("s03", "s10", "s57")]
    with torch.no_grad():
        for p in big.stack.parameters():
            p[unused] = float("nan")
    rows = [{"s03": 1.0}, {"s57": -0.7}, {"s03": 0.5, "s57": 1.2}]
    # the 57 NaN styles, 52 of them between s03 and s57, are never computed: the same tokens as alone
    assert run(big, rows) == run(engine_for(["s03", "s57"]), rows)
    # the next batch: the last one's styles are back at 0
    assert run(big, [{"s10": 1.0}, {}]) == run(engine_for(["s10"]), [{"s10": 1.0}, {}])


class Recording:
    """A network's K or V module that says when it is run (its residual: 1 everywhere)."""

    dtype = torch.float32

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def residual(self, h):
        self.calls.append(self.name)
        return torch.ones_like(h)


def test_a_sum_of_many_networks_runs_those_not_at_0():
    """Styles that cannot share a stack are summed network by network: only the ones set are run."""
    from hnkit.kernels import Sum
    from hnkit.strengths import Strengths

    calls = []
    strengths = Strengths([0.0] * 500)
    kernel = Sum([(i, (Recording(f"k{i}", calls), Recording(f"v{i}", calls)), 1.0) for i in range(500)], strengths)
    x = torch.zeros(2, 3, 4)
    assert kernel(x, 0) is x and calls == []
    strengths.values[7], strengths.values[420] = 0.5, -1.0
    assert torch.equal(kernel(x, 1), torch.full_like(x, -0.5)) and calls == ["v7", "v420"]
    calls.clear()
    strengths.values[7] = 0.0
    assert torch.equal(kernel(x, 0), torch.full_like(x, -1.0)) and calls == ["k420"]


def test_a_chain_visits_only_the_networks_not_at_0():
    """At a site that some networks do not reach, those set elsewhere do not make the others active."""
    from hnkit.kernels import Chain
    from hnkit.strengths import Strengths

    calls = []
    strengths = Strengths([0.0, 0.0, 0.5])  # network 2 has no module at this site
    kernel = Chain([(i, (Recording(f"k{i}", calls), Recording(f"v{i}", calls)), 1.0) for i in range(2)], strengths)
    assert kernel.active() == []
    strengths.values[1] = 2.0
    assert [i for i, _, _ in kernel.active()] == [1]
    strengths.values[0] = -1.0
    assert [i for i, _, _ in kernel.active()] == [0, 1]


def test_strength_values_change_only_by_index():
    """The strengths a kernel reads know which are not 0; nothing can change them behind its back."""
    from hnkit.strengths import Strengths

    values = Strengths([0.0, 1.0, 0.0]).values
    assert sorted(values.nonzero) == [1] and list(values) == [0.0, 1.0, 0.0] and len(values) == 3
    values[-1] = 2.0
    values[1] = 0.0
    assert sorted(values.nonzero) == [2] and values[2] == 2.0
    for change in ("append", "extend", "insert", "pop", "remove", "clear", "__delitem__", "sort"):
        assert not hasattr(values, change), change  # a list's ways would leave nonzero stale
    with pytest.raises(IndexError):
        values[3] = 1.0


# -- limits: body, prompt, Host ------------------------------------------------------------------------
def test_a_body_over_the_limit_is_a_413_read_no_further(server):
    s = server(max_body_bytes=2000)
    r = post(s.url, "/v1/completions", {"model": "tiny", "prompt": "x" * 3000})
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
    assert any("/v1/completions 413" in line for line in s.lines)
    assert post(s.url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nContent-Type: application/json\r\n"
    # a declared length past the limit: answered without reading (the body never comes)
    start = time.time()
    answer = raw_request(s.port, (head + "Content-Length: 1000000000000\r\n\r\n").encode(), b'{"prompt": "')
    assert answer.startswith(b"HTTP/1.1 413") and b"2000 bytes" in answer and time.time() - start < 8
    # a chunked body: refused once past the limit, though its end never comes
    chunk = b"x" * 1500
    piece = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    answer = raw_request(s.port, (head + "Transfer-Encoding: chunked\r\n\r\n").encode(), piece * 2)
    assert answer.startswith(b"HTTP/1.1 413") and time.time() - start < 16


def test_a_prompt_over_the_token_limit_is_refused_and_tokenized_off_the_loop(server):
    s = server(max_prompt_tokens=8)
    r = post(s.url, "/v1/completions", {"model": "tiny", "prompt": "The grammar of names and lambda forms " * 2})
    assert r.status_code == 400 and "limit of 8 tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"
    r = post(s.url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hello " * 9}]})
    assert r.status_code == 400 and "limit of 8 tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages"  # the chat request's field: it has no prompt
    tokenizer = s.engine.tokenizer
    calls, release = [], threading.Event()

    class Slow:  # the engine's tokenizer, stuck until released
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kw):
            calls.append(args)
            release.wait(60)
            return tokenizer(*args, **kw)

    s.engine.tokenizer = Slow()
    try:
        huge = post(s.url, "/v1/completions", {"model": "tiny", "prompt": "x" * 900_000})  # refused untokenized
        assert huge.status_code == 400 and "900000 characters" in huge.json()["error"]["message"] and not calls
        slow = threading.Thread(target=post, args=(s.url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}))
        slow.start()
        while not calls:
            time.sleep(0.01)
        # answered while the tokenizer is still stuck: tokenizing does not hold the event loop
        assert httpx.get(s.url + "/v1/models", timeout=30).status_code == 200
        assert not release.is_set() and slow.is_alive()
        release.set()
        slow.join(timeout=30)
    finally:
        release.set()
        s.engine.tokenizer = tokenizer


def test_the_context_is_the_default_prompt_limit(served):
    r = post(served["url"], "/v1/completions", {"model": "tiny", "prompt": "x" * 100_000})
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"] and "context" in r.json()["error"]["message"]


def test_a_host_not_allowed_is_refused_on_every_path(server):
    s = server(allowed_hosts={"localhost", "127.0.0.1", "::1"})
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80"):
        for r in (httpx.get(s.url + "/", headers={"Host": host}), httpx.get(s.url + "/v1/models", headers={"Host": host}),
                  post(s.url, "/v1/completions", body, headers={"Host": host})):
            assert r.status_code == 400, (host, r.text)
            assert r.json()["error"]["code"] == "host_not_allowed" and "not allowed" in r.json()["error"]["message"]
    for host in ("[::1]evil", "[::1]evil:80", "[::1]:80x", "localhost:80x", "[::1"):
        r = httpx.get(s.url + "/v1/models", headers={"Host": host})  # only :port may follow the name
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", (host, r.text)
    assert any(line.startswith("/ 400 host") for line in s.lines)
    for host in ("localhost", f"localhost:{s.port}", f"LocalHost.:{s.port}", f"[::1]:{s.port}", "127.0.0.1"):
        assert httpx.get(s.url + "/v1/models", headers={"Host": host}).status_code == 200, host
    assert post(s.url, "/v1/completions", body).status_code == 200
