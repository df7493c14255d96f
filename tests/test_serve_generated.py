"""``hnkit serve`` with styles from one paragraph (issue 26): a request's ``style_example`` and
``POST /v1/styles``, on a real server spoken to by a real HTTP client."""

import argparse
import hashlib
import json
import socket
import threading
import time
from contextlib import nullcontext

import pytest
import torch

import hnkit
from hnkit.testing import ServerThread

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="hnkit serve needs fastapi and uvicorn (pip install -e .)")

# examples of at least 200 characters that the tiny tokenizer reads in under 100 tokens (its
# GPT-2 has 128 positions): "--------" is one of its tokens
EXAMPLES = [f"-------- the {a} and the {b} --------\n" * 5 for a, b in (
    ("statement", "expression"), ("name", "object"), ("class", "function"), ("list", "index"), ("module", "value"),
    ("string", "number"))]
MESSAGES = [{"role": "user", "content": "The grammar of"}]


def name_of(text: str) -> str:
    return "example-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hnkit.testing import build_tiny_generator, build_tiny_styles

    root = tmp_path_factory.mktemp("serve_generated")
    built = build_tiny_styles(root)
    return {**built, "generator": build_tiny_generator(built["model"], root / "gen.safetensors", seed=0)}


@pytest.fixture(scope="module")
def server(tiny):
    s = ServerThread(tiny["model"], tiny["styles"], generator=tiny["generator"])
    yield s
    s.close()


def alone(tiny, styles: dict, max_tokens: int, prompt: str | None = None) -> str:
    """The text ``generate()`` gives (greedy) for one request on its own: ``styles`` maps a style of
    the folder, or an example text, to its strength; an example's style is made by ``make_style``
    on a fresh model, and every style attached directly. A chat request unless ``prompt``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    library = hnkit.StyleLibrary(tiny["styles"])
    generator = hnkit.StyleGenerator.load(tiny["generator"])
    pairs = [(library[k] if k in library else generator.make_style(model, k, tokenizer), s) for k, s in styles.items()]
    if prompt is None:
        ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        ids = torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]])
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), (hnkit.attach(model, pairs, blend="sum") if pairs else nullcontext()):
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def chat(url, max_tokens=10, **body):
    return httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "temperature": 0,
                                                          "max_tokens": max_tokens, **body}, timeout=60)


def content(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def make(url, text):
    return httpx.post(url + "/v1/styles", json={"example": text}, timeout=60)


def test_the_examples_fit_the_tiny_model(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    for text in EXAMPLES:
        assert len(text.strip()) >= 200 and len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 100


def test_a_style_example_request_equals_make_style_attached_directly(server, tiny):
    r = chat(server.url, style_example=EXAMPLES[0])
    made = content(r)
    assert r.json()["model"] == f"tiny+{name_of(EXAMPLES[0])}"  # the answer names the style it made
    assert made == alone(tiny, {EXAMPLES[0]: 1.0}, 10)
    assert made != alone(tiny, {}, 10)  # the style does something
    # with a style of the folder, and the made style's strength given by its name
    mixed = chat(server.url, style_example=EXAMPLES[0], hypernetworks={"noir": 0.8, name_of(EXAMPLES[0]): 0.4})
    assert content(mixed) == alone(tiny, {EXAMPLES[0]: 0.4, "noir": 0.8}, 10)
    assert mixed.json()["model"] == f"tiny+{name_of(EXAMPLES[0])}:0.4"
    # /v1/completions, streamed
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "The grammar of", "max_tokens": 8,
                                                         "temperature": 0, "stream": True, "style_example": EXAMPLES[0]},
                   timeout=60)
    chunks = [line[6:] for line in r.text.split("\n") if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in map(json.loads, chunks))
    assert text == alone(tiny, {EXAMPLES[0]: 1.0}, 8, prompt="The grammar of")


def test_the_same_example_is_made_once_then_served_by_its_name(server, tiny):
    engine = server.engine
    before = engine.stats["generated"]
    first = make(server.url, EXAMPLES[1]).json()
    assert first["name"] == name_of(EXAMPLES[1]) and first["cached"] is False and 0 < first["tokens"] < 100
    assert first["seconds"] >= 0
    again = make(server.url, EXAMPLES[1]).json()
    assert again == {**first, "cached": True}
    content(chat(server.url, style_example=EXAMPLES[1]))
    assert engine.stats["generated"] == before + 1
    assert sum(f"made {first['name']} from" in line for line in server.lines) == 1  # said once, in the log
    # while kept, its name works like a style of the folder, and the lists show it
    by_name = content(chat(server.url, model=f"tiny+{first['name']}:0.5"))
    assert by_name == alone(tiny, {EXAMPLES[1]: 0.5}, 10)
    assert f"tiny+{first['name']}" in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    listed = {s["name"]: s for s in httpx.get(server.url + "/hnkit/styles").json()["styles"]}
    assert listed[first["name"]]["generated"] is True and listed["noir"]["generated"] is False
    assert "made from an example of" in listed[first["name"]]["description"]
    # two first requests for one text at once: made once
    with engine.busy:  # the engine takes no task while held
        threads = [threading.Thread(target=make, args=(server.url, EXAMPLES[2])) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while len(engine.tasks) < 2:
            assert time.time() < deadline
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert engine.stats["generated"] == before + 2


def test_the_styles_kept_are_bounded_the_least_recently_used_dropped_first(tiny):
    s = ServerThread(tiny["model"], tiny["styles"], generator=tiny["generator"], max_generated=2)
    try:
        a, b, c = (name_of(t) for t in EXAMPLES[:3])
        for text in EXAMPLES[:2]:
            assert make(s.url, text).json()["cached"] is False
        content(chat(s.url, model=f"tiny+{a}"))  # a used: b is now the least recently used
        assert make(s.url, EXAMPLES[2]).json()["cached"] is False
        names = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
        assert f"tiny+{a}" in names and f"tiny+{c}" in names and f"tiny+{b}" not in names
        gone = chat(s.url, model=f"tiny+{b}")
        assert gone.status_code == 400 and f"unknown style {b!r}" in gone.json()["error"]["message"]
        assert make(s.url, EXAMPLES[0]).json()["cached"] is True  # a is kept
        assert s.engine.stats["generated"] == 3
        assert make(s.url, EXAMPLES[1]).json()["cached"] is False  # b is made again
        assert s.engine.stats["generated"] == 4
    finally:
        s.close()


def test_one_batch_with_a_named_row_and_a_made_row_gives_each_what_it_gets_alone(server, tiny):
    engine = server.engine
    make(server.url, EXAMPLES[3])
    made = name_of(EXAMPLES[3])
    rows = [{"hypernetworks": {"noir": 1.0}}, {"style_example": EXAMPLES[3], "hypernetworks": {made: 0.6}},
            {}, {"model": f"tiny+{made}+gothic:0.5"}]
    expected = [{"noir": 1.0}, {EXAMPLES[3]: 0.6}, {}, {EXAMPLES[3]: 1.0, "gothic": 0.5}]
    results = [None] * len(rows)
    before = dict(engine.stats)

    def ask(i):
        results[i] = chat(server.url, max_tokens=4 + 2 * i, **rows[i])  # rows end at different steps

    with engine.busy:  # all queue up while the engine is busy, then run as one batch
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(rows))]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while len(engine.waiting) < len(rows):
            assert time.time() < deadline
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert engine.stats["batches"] == before["batches"] + 1 and engine.stats["generated"] == before["generated"]
    for i, (styles, r) in enumerate(zip(expected, results)):
        assert content(r) == alone(tiny, styles, 4 + 2 * i), styles


@pytest.mark.parametrize("value, words", [
    (123, "must be text, not int"), (["a"] * 300, "must be text, not list"), ("short " * 10, "too short: 59 characters"),
    ("a" * 16_001, "too long: 16,001 characters"), ("a" * 150 + "\x00" + "b" * 150, "NUL bytes")])
def test_a_bad_example_is_a_400_in_one_line(server, value, words):
    before = server.engine.stats["generated"]
    answers = ((chat(server.url, style_example=value), "style_example"), (make(server.url, value), "example"))
    for response, param in answers:
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param, response.text
        assert words in error["message"] and "\n" not in error["message"]
    assert server.engine.stats["generated"] == before


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_generator_made_for_another_model(tiny, tiny_model_dirs, tmp_path, capsys):
    from hnkit.commands.cli import main
    from hnkit.engine import Engine
    from hnkit.resident import GeneratedStyles
    from hnkit.testing import build_tiny_generator
    from hnkit.text import load_causal_lm

    other = build_tiny_generator(tiny_model_dirs["llama"], tmp_path / "llama-gen.safetensors")
    # given with --generator: the server does not start, one line naming both models
    argv = ["serve", "--model", str(tiny["model"]), "--styles", str(tiny["styles"]), "--port", str(free_port()),
            "--device", "cpu", "--generator", str(other)]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith(f"hnkit: error: --generator {other}: "), err
    assert "made for llama " in err[0] and str(tiny["model"]) in err[0]  # the folder's name; this model's path
    # read at the first request that needs it (as the default one is): a 400 naming both, each time
    model, tokenizer = load_causal_lm(str(tiny["model"]))
    engine = Engine(model.eval(), tokenizer, hnkit.StyleLibrary(tiny["styles"]), thread=True,
                    generated=GeneratedStyles(other))
    s = ServerThread(None, None, engine=engine)
    try:
        for _ in range(2):
            r = chat(s.url, style_example=EXAMPLES[0])
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "style_example" and "\n" not in error["message"]
            assert "made for llama " in error["message"] and str(tiny["model"]) in error["message"]
        assert chat(s.url).status_code == 200  # the rest is served
        assert engine.stats["generated"] == 0
    finally:
        s.close()


def test_the_default_generator_is_read_at_the_first_request_that_needs_it(tiny):
    from hnkit.generator import SHIPPED

    s = ServerThread(tiny["model"], tiny["styles"])  # started without reading it
    try:
        r = chat(s.url, style_example=EXAMPLES[0])
        message = r.json()["error"]["message"]
        if SHIPPED.exists():  # made for SmolLM2-135M-Instruct, not the tiny GPT-2
            assert r.status_code == 400 and str(tiny["model"]) in message and "SmolLM2" in message, message
        else:
            assert r.status_code == 503 and "no such style generator file" in message, message
        assert "\n" not in message
    finally:
        s.close()


def test_no_styles_made_with_max_generated_0_and_bad_values_refused(tiny):
    from hnkit.commands import serve

    s = ServerThread(tiny["model"], tiny["styles"], generator=tiny["generator"], max_generated=0)
    try:
        r = make(s.url, EXAMPLES[0])
        assert r.status_code == 400 and "--max-generated 0" in r.json()["error"]["message"]
    finally:
        s.close()
    args = argparse.Namespace(model=str(tiny["model"]), styles=str(tiny["styles"]), name=None, max_batch=8,
                              device="cpu", max_styles=64, poll_interval=0, generator=None, max_generated=-1)
    with pytest.raises(hnkit.HnkitError, match="--max-generated must be in 0..4096, got -1"):
        serve.build(args)


def test_a_style_asked_for_while_the_server_shuts_down_is_a_503(tiny):
    s = ServerThread(tiny["model"], tiny["styles"], generator=tiny["generator"])
    try:
        s.engine.close()
        r = make(s.url, EXAMPLES[5])
        assert r.status_code == 503 and r.json()["error"]["message"] == "the server is shutting down"
    finally:
        s.close()
