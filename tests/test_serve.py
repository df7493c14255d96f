"""``hnkit serve``: a real server on a free port, spoken to by a real HTTP client and by ``openai``."""

import argparse
import json
import threading
import time

import pytest
import torch

import hnkit
from hnkit import HnkitError
from hnkit.testing import ServerThread

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")

STYLES = ("noir", "whimsy", "gothic")


def alone(served, prompt, styles, max_tokens, chat=False):
    """The text ``generate()`` gives for one request on its own (greedy), styles attached with steer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served["model"])
    model = AutoModelForCausalLM.from_pretrained(served["model"]).eval()
    library = hnkit.StyleLibrary(served["styles"])
    if chat:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = torch.tensor([ids["input_ids"] if not isinstance(ids, list) else ids])
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), (hnkit.steer(model, styles, library=library, blend="sum") if styles else _null()):
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def sse(response) -> list:
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_lists_the_base_and_each_style(served):
    data = httpx.get(served["url"] + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny", "tiny+gothic", "tiny+noir", "tiny+whimsy"]  # the folder's order
    styles = {s["name"]: s for s in httpx.get(served["url"] + "/hnkit/styles").json()["styles"]}
    assert sorted(styles) == sorted(STYLES)
    assert styles["noir"]["front"] == "/hnkit/styles/noir/front.png" and styles["gothic"]["front"] is None
    assert httpx.get(served["url"] + styles["noir"]["front"]).content.startswith(b"\x89PNG")
    assert httpx.get(served["url"] + "/hnkit/styles/gothic/front.png").status_code == 404


@pytest.mark.parametrize("form", ["name", "field", "both", "none"])
def test_completion_equals_generate_alone_for_each_selection_form(served, form):
    prompt = "The grammar of"
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "model": "tiny"}
    styles = {}
    if form == "name":
        body["model"], styles = "tiny+noir:0.8+whimsy:-0.5", {"noir": 0.8, "whimsy": -0.5}
    elif form == "field":
        body["hypernetworks"], styles = {"gothic": 1.2}, {"gothic": 1.2}
    elif form == "both":  # the field wins for a style named in both
        body["model"], body["hypernetworks"], styles = "tiny+noir:0.3+gothic", {"noir": 1.0}, {"noir": 1.0, "gothic": 1.0}
    r = post(served["url"], "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] in ("length", "stop")
    assert 0 < out["usage"]["completion_tokens"] <= 12
    assert out["choices"][0]["text"] == alone(served, prompt, styles, 12)
    if form == "none":
        assert out["choices"][0]["text"] != alone(served, prompt, {"noir": 1.0}, 12)


def test_concurrent_requests_are_batched_and_each_row_equals_running_alone(served):
    engine = served["server"].engine
    requests = [("The grammar of", {"noir": 1.0}), ("A statement", {"whimsy": 0.7, "gothic": -0.4}),
                ("Identifiers are", {}), ("The grammar of", {"gothic": 1.5}), ("Lambda forms", {"noir": 0.5})]
    lengths = [10, 3, 7, 10, 5]  # rows leave the batch at different steps
    results = [None] * len(requests)
    before = dict(engine.stats)

    def ask(i, prompt, styles):
        results[i] = post(served["url"], "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": lengths[i],
                                                              "temperature": 0, "hypernetworks": styles}).json()

    with engine.busy:  # all five queue up while the engine is busy, then run as one batch
        threads = [threading.Thread(target=ask, args=(i, *r)) for i, r in enumerate(requests)]
        for t in threads:
            t.start()
        while len(engine.waiting) < len(requests):
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert engine.stats["batches"] == before["batches"] + 1 and engine.stats["largest"] >= len(requests)
    for (prompt, styles), n, out in zip(requests, lengths, results):
        assert out["choices"][0]["text"] == alone(served, prompt, styles, n), (prompt, styles)


def test_sampling_with_a_seed_is_the_same_batched_or_alone(served):
    engine = served["server"].engine
    body = {"model": "tiny+noir:0.6", "prompt": "Names", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    one = post(served["url"], "/v1/completions", body).json()["choices"][0]["text"]
    results = []
    with engine.busy:
        threads = [threading.Thread(target=lambda b=b: results.append(post(served["url"], "/v1/completions", b).json()))
                   for b in (body, {**body, "model": "tiny+gothic", "seed": 3})]
        for t in threads:
            t.start()
        while len(engine.waiting) < 2:
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert one in [r["choices"][0]["text"] for r in results]
    n3 = post(served["url"], "/v1/completions", {**body, "n": 3}).json()["choices"]
    assert [c["index"] for c in n3] == [0, 1, 2] and n3[0]["text"] == one  # seeds 7, 8, 9


def test_streaming_gives_the_same_text_in_pieces(served):
    body = {"model": "tiny+whimsy:0.9", "prompt": "The grammar of", "max_tokens": 14, "temperature": 0}
    whole = post(served["url"], "/v1/completions", body).json()["choices"][0]["text"]
    chunks = sse(post(served["url"], "/v1/completions", {**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert len(chunks) > 2 and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_end_the_text_before_them(served):
    body = {"model": "tiny", "prompt": "The grammar of", "max_tokens": 20, "temperature": 0}
    whole = post(served["url"], "/v1/completions", body).json()["choices"][0]["text"]
    stop = whole[5:8]
    assert len(stop) == 3 and stop.strip()
    for stream in (False, True):
        r = post(served["url"], "/v1/completions", {**body, "stop": [stop], "stream": stream})
        if stream:
            chunks = sse(r)
            text, reason = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert text == whole[:whole.index(stop)] and reason == "stop"


def test_chat_completions_use_the_chat_template(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define a lambda."}]
    body = {"model": "tiny+gothic:0.7", "messages": messages, "max_tokens": 9, "temperature": 0}
    out = post(served["url"], "/v1/chat/completions", body).json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == alone(served, messages, {"gothic": 0.7}, 9, chat=True)
    chunks = sse(post(served["url"], "/v1/chat/completions", {**body, "stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == out["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/completions", {"model": "tiny+pastel", "prompt": "x"}, 400, "unknown style 'pastel'"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "unknown model 'gpt-4'"),
    ("/v1/completions", {"model": "tiny+noir:lots", "prompt": "x"}, 400, "not a number"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "hypernetworks": {"noir": 99}}, 400, "style 'noir': strength 99 is outside"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "hypernetworks": {"noir": "high"}}, 400, "finite number"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "hypernetworks": ["noir"]}, 400, "hypernetworks must be"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 200}, 400, "context"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 100}, 400, "n must be"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt must be"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "empty"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages must be"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "hypernetworks": {"noir": 10**400}}, 400, "finite number"),
    ("/v1/completions", {"model": "tiny", "prompt": ["x"] * 50}, 400, "at most 8"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "{{ nope"}],
                              "max_tokens": 2, "seed": 2**70}, 200, ""),
    ("/v1/completions", "not json", 400, "not valid JSON"),
    ("/v1/completions", "text/plain", 400, "Content-Type: application/json"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(served, path, body, status, words):
    if body == "not json":
        r = httpx.post(served["url"] + path, content=b"{nope", headers={"content-type": "application/json"})
    elif body == "text/plain":  # what another web page could POST to this machine without a preflight
        r = httpx.post(served["url"] + path, content=b'{"model": "tiny", "prompt": "x"}', headers={"content-type": "text/plain"})
    else:
        r = post(served["url"], path, body)
    assert r.status_code == status, r.text
    if status == 200:  # a huge seed is a seed; message text is never a template
        return
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    ok = post(served["url"], "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_row(served):
    engine = served["server"].engine
    before = engine.stats["cancelled"]
    # as long as the tiny model's context (128) allows, without stopping at an end token
    body = {"model": "tiny+noir", "prompt": "The grammar of", "max_tokens": 110, "temperature": 0, "stream": True,
            "ignore_eos": True}
    for _ in range(3):  # a tiny model may finish its row before the server has seen the client go: try again
        with httpx.stream("POST", served["url"] + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one piece, then hang up
        deadline = time.time() + 10
        while engine.stats["cancelled"] == before and time.time() < deadline:
            time.sleep(0.05)
        if engine.stats["cancelled"] > before:
            break
    assert engine.stats["cancelled"] == before + 1
    assert post(served["url"], "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert any("disconnected" in line for line in served["server"].lines)


def test_requests_are_logged_one_line_each(served):
    n = len(served["server"].lines)
    post(served["url"], "/v1/completions", {"model": "tiny+noir:0.5", "prompt": "x", "max_tokens": 3})
    line = served["server"].lines[n]
    assert "/v1/completions" in line and "noir:0.5" in line and "new=3" in line


def test_the_openai_client_works_unchanged(served):
    openai = pytest.importorskip("openai", reason="pip install openai to test the official client")
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused")
    assert "tiny+noir" in [m.id for m in client.models.list()]
    text = client.completions.create(model="tiny+noir:0.8", prompt="The grammar of", max_tokens=8,
                                     temperature=0).choices[0].text
    assert text == alone(served, "The grammar of", {"noir": 0.8}, 8)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny+noir:0.8", prompt="The grammar of", max_tokens=8, temperature=0, stream=True))
    assert streamed == text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, extra_body={"hypernetworks": {"whimsy": 0.5}})
    assert chat.choices[0].message.content == alone(served, [{"role": "user", "content": "Hi"}], {"whimsy": 0.5}, 5,
                                                    chat=True)
    with pytest.raises(openai.BadRequestError, match="unknown style"):
        client.completions.create(model="tiny+pastel", prompt="x", max_tokens=2)


def test_api_key_is_required_when_set(served):
    server = ServerThread(served["model"], served["styles"], api_key="s3cret", max_batch=2)
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        assert post(server.url, "/v1/completions", body).status_code == 401
        assert post(server.url, "/v1/completions", body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert post(server.url, "/v1/completions", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(server.url + "/").status_code == 200  # the page itself asks for the key
    finally:
        server.close()


def test_bad_command_lines_are_one_line(served, tmp_path):
    from hnkit.commands.serve import build

    def args(**kw):
        base = dict(model=str(served["model"]), styles=str(served["styles"]), host="127.0.0.1", port=8000,
                    api_key=None, api_key_file=None, allow_unauthenticated=False, max_connections=256,
                    header_timeout=10.0, name=None, max_batch=8, device="cpu", max_styles=64, poll_interval=2.0)
        return argparse.Namespace(**{**base, **kw})

    with pytest.raises(HnkitError, match="no such folder of styles"):
        build(args(styles=str(tmp_path / "none")))
    (tmp_path / "bad.safetensors").write_text("hello")  # a damaged style is skipped with one line, not fatal
    said = []
    engine, _, _ = build(args(styles=str(tmp_path)), say=said.append)
    engine.close()
    assert engine.names == [] and len(said) == 1 and "skipped style 'bad'" in said[0]
    with pytest.raises(HnkitError, match="--max-batch"):
        build(args(max_batch=0))
    from hnkit.commands.serve import run

    taken = int(served["url"].rsplit(":", 1)[1])
    with pytest.raises(HnkitError, match=f"cannot listen on 127.0.0.1:{taken}"):
        run(args(port=taken))


def test_a_chat_template_that_refuses_the_messages_is_a_400(served):
    tokenizer = served["server"].engine.tokenizer
    kept = tokenizer.chat_template
    tokenizer.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}x"
    try:
        r = post(served["url"], "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": "a"}]})
    finally:
        tokenizer.chat_template = kept
    assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
