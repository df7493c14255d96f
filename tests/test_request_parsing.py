"""The server's parts without HTTP: request parsing (hnkit.request_parsing), the answer's JSON and
a request's rows in an engine (hnkit.server), each called directly with an engine double."""

import asyncio
import json

import pytest

from hnkit.engine import SHUTTING_DOWN, Engine
from hnkit.request_parsing import (CHARS_PER_TOKEN, RequestError, max_tokens_for, parse_json, parse_request,
                                   prompt_ids)
from hnkit.server import Completion, chunk_event, completion_json, error_body, event, usage


class CharTokenizer:
    """One token per character; ``calls`` counts what was tokenized."""
    chat_template = "{{ messages }}"

    def __init__(self):
        self.calls = 0

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        return type("Encoding", (), {"input_ids": [ord(c) % 50 for c in text]})

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        self.calls += 1
        if messages[0]["role"] == "assistant":
            raise ValueError("conversations start with the user")
        return [ord(c) % 50 for m in messages for c in m["role"] + m["content"]]


class Stub:
    """The engine's rules (its own check_styles and check) on a tiny context, no model."""
    names = ["noir", "whimsy"]
    library = {"noir": None, "whimsy": None}  # what `in engine.library` asks
    max_batch, context, max_styles = 4, 64, 64
    check_styles, check = Engine.check_styles, Engine.check

    def __init__(self):
        self.tokenizer, self.jobs = CharTokenizer(), []

    def submit(self, job):
        self.jobs.append(job)


def parse(body, chat=False, engine=None):
    return parse_request(body, engine or Stub(), "tiny", chat)


def refused(call) -> RequestError:
    with pytest.raises(RequestError) as info:
        call()
    assert "\n" not in info.value.message
    return info.value


# -- the body --------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, words", [(b"{", "not valid JSON"), (b"[1]", "JSON object"), (b"\xff", "not valid JSON"),
                                         (b"[" * 100_000, "nested too deeply"), (b'{"a": "\\ud800"}', "surrogate")])
def test_a_body_that_is_not_a_json_object_of_text_is_a_400(data, words):
    error = refused(lambda: parse_json(data))
    assert error.status == 400 and error.param is None and words in error.message


def test_a_completion_request_with_its_defaults():
    request = parse({"model": "tiny+noir:0.5+whimsy:0", "prompt": "hi", "hypernetworks": {"noir": 2}})
    assert request.styles == {"noir": 2.0}  # the field wins; zeros left out
    assert (request.chat, request.n, request.stream, request.max_tokens, request.texts) == (False, 1, False, 16, ["hi"])
    assert request.options == {"ignore_eos": False, "temperature": 1.0, "top_p": 1.0, "stop": [], "seed": None}
    chat = parse({"messages": [{"role": "user", "content": "hi", "name": "x"}], "max_completion_tokens": 3,
                  "stop": "\n", "stream": True}, chat=True)
    assert chat.messages == [{"role": "user", "content": "hi"}] and chat.max_tokens == 3 and chat.stream
    assert chat.options["stop"] == ["\n"] and chat.model == "tiny" and chat.prompt_field == "messages"


# each mistake: the status and the param OpenAI's error names (given where it is found, not guessed)
@pytest.mark.parametrize("body, chat, status, param", [
    ({"model": "other", "prompt": "x"}, False, 404, "model"),
    ({"model": 3, "prompt": "x"}, False, 400, "model"),
    ({"model": "tiny+noir:lots", "prompt": "x"}, False, 400, "model"),
    ({"model": "tiny+nosuch:0", "prompt": "x"}, False, 400, "model"),
    ({"model": "tiny+noir:99", "prompt": "x"}, False, 400, "model"),
    ({"prompt": "x", "hypernetworks": {"noir": "1"}}, False, 400, "hypernetworks"),
    ({"prompt": "x", "hypernetworks": {"nosuch": 0}}, False, 400, "hypernetworks"),
    ({"prompt": "x", "hypernetworks": {"noir": 10**400}}, False, 400, "hypernetworks"),
    ({"prompt": "x", "hypernetworks": ["noir"]}, False, 400, "hypernetworks"),
    ({"prompt": 7}, False, 400, "prompt"),
    ({"prompt": ["a"] * 5}, False, 400, "prompt"),
    ({"prompt": ["a", "b"], "n": 3}, False, 400, "n"),
    ({"prompt": "x", "n": 0}, False, 400, "n"),
    ({"messages": [{"role": "user", "content": 1}]}, True, 400, "messages"),
    ({"messages": []}, True, 400, "messages"),
    ({"prompt": "x", "stop": ["a", ""]}, False, 400, "stop"),
    ({"prompt": "x", "seed": True}, False, 400, "seed"),
    ({"prompt": "x", "temperature": 2.5}, False, 400, "temperature"),
    ({"prompt": "x", "top_p": "1"}, False, 400, "top_p"),
    ({"prompt": "x", "max_tokens": -1}, False, 400, "max_tokens"),
    ({"prompt": "x", "max_completion_tokens": 0}, False, 400, "max_completion_tokens"),
    ({"prompt": "x", "stream": "yes"}, False, 400, "stream"),
    ({"prompt": "x", "logprobs": 2}, False, 400, "logprobs"),
])
def test_each_mistake_names_its_param(body, chat, status, param):
    error = refused(lambda: parse(body, chat))
    assert (error.status, error.param) == (status, param), error.message


# -- prompts ---------------------------------------------------------------------------------------
def test_prompts_are_tokenized_within_the_limits():
    engine = Stub()
    assert prompt_ids(parse({"prompt": ["ab", "c"]}), engine, 10) == [[47, 48], [49]]
    huge = parse({"prompt": "x" * (CHARS_PER_TOKEN * 10 + 1)})
    error = refused(lambda: prompt_ids(huge, engine, 10))
    assert "characters" in error.message and error.param == "prompt"
    engine.tokenizer.calls = 0
    error = refused(lambda: prompt_ids(parse({"messages": [{"role": "user", "content": "x" * 400}]}, True), engine, 10))
    assert error.param == "messages" and engine.tokenizer.calls == 0  # refused before tokenizing
    error = refused(lambda: prompt_ids(parse({"prompt": "x" * 11}), engine, 10))
    assert "limit of 10 tokens" in error.message and error.param == "prompt"
    error = refused(lambda: prompt_ids(parse({"prompt": "x" * 60, "max_tokens": 5}), engine, 64))
    assert "context of 64 tokens" in error.message and error.param == "prompt"
    error = refused(lambda: prompt_ids(parse({"messages": [{"role": "user", "content": "x" * 61}]}, True), engine, 64))
    assert "65 tokens" in error.message and "(the model's context)" in error.message and error.param == "messages"
    error = refused(lambda: prompt_ids(parse({"messages": [{"role": "user", "content": "x" * 60}]}, True), engine, 64))
    assert "max_tokens is 1" in error.message and error.param == "messages"  # no room left to answer
    assert refused(lambda: prompt_ids(parse({"prompt": ""}), engine, 10)).param == "prompt"


def test_chat_prompts_go_through_the_template():
    engine = Stub()
    request = parse({"messages": [{"role": "assistant", "content": "hi"}]}, chat=True)
    assert "refused the messages" in refused(lambda: prompt_ids(request, engine, 64)).message
    engine.tokenizer.chat_template = None
    assert refused(lambda: prompt_ids(request, engine, 64)).param == "messages"
    request = parse({"messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert max_tokens_for(request, 6, 64) == 58 and max_tokens_for(request, 6, 10_000) == 512


# -- the answer's JSON -----------------------------------------------------------------------------
def test_the_answer_in_openai_json():
    head = {"id": "cmpl-1", "created": 5, "model": "tiny+noir"}
    whole = completion_json(head, False, ["a", "b"], ["length", "stop"], {"total_tokens": 3})
    assert whole == {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "tiny+noir",
                     "usage": {"total_tokens": 3},
                     "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": "length"},
                                 {"index": 1, "text": "b", "logprobs": None, "finish_reason": "stop"}]}
    chat = completion_json(head, True, ["a"], ["stop"], {})
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "a"}
    piece = chunk_event(head, True, 1, "x", None)
    assert piece.startswith("data: ") and piece.endswith("\n\n")
    assert json.loads(piece[6:])["choices"] == [{"index": 1, "delta": {"content": "x"}, "finish_reason": None}]
    assert json.loads(chunk_event(head, False, 0, "", "stop")[6:])["object"] == "text_completion"
    assert json.loads(event(error_body("boom", code="c", kind="server_error"))[6:]) == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": "c"}}
    jobs = [type("Row", (), {"tokens": [1, 2]}), type("Row", (), {"tokens": [3]})]
    assert usage([[7, 7, 7]], jobs) == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


# -- a request's rows in the engine ----------------------------------------------------------------
def run_rows(body, script):
    """A Completion of ``body`` on a Stub engine whose rows then emit ``script`` [(row, text, done, reason)];
    its whole answer, or its stream's events, and the engine."""
    engine, lines = Stub(), []
    request = parse(body)

    async def go():
        run = Completion(engine, request, prompt_ids(request, engine, 64), lines.append, "/v1/completions")
        for row, text, done, reason in script:
            if reason in ("error", "shutdown"):
                engine.jobs[row].finish_reason = reason
            engine.jobs[row].emit(text, done, "error" if reason == "shutdown" else reason)
        if request.stream:
            return [piece async for piece in run.stream()]
        return await run.answer(lambda: asyncio.sleep(0, result=False))

    return asyncio.run(go()), engine


def test_rows_are_seeded_apart_and_answered_together():
    answer, engine = run_rows({"prompt": "ab", "n": 2, "seed": 7, "temperature": 0},
                              [(1, "y", True, "length"), (0, "x", False, None), (0, "z", True, "stop")])
    assert [j.seed for j in engine.jobs] == [7, 8] and [j.prompt_ids for j in engine.jobs] == [[47, 48]] * 2
    assert [(c["text"], c["finish_reason"]) for c in answer["choices"]] == [("xz", "stop"), ("y", "length")]


def test_a_failed_row_fails_the_whole_answer_and_cancels_the_others():
    with pytest.raises(RequestError) as info:
        run_rows({"prompt": "ab", "n": 2}, [(0, "boom", True, "error")])
    assert info.value.status == 500 and "generation failed: boom" in info.value.message
    with pytest.raises(RequestError) as info:
        run_rows({"prompt": "ab"}, [(0, SHUTTING_DOWN, True, "shutdown")])
    assert info.value.status == 503 and info.value.code == "server_shutting_down"


def test_a_stream_that_fails_unexpectedly_still_ends_with_done():
    script = [(0, "x", False, None), (1, object(), False, None)]  # row 1 sends what is not text (a bug)
    pieces, engine = run_rows({"prompt": "ab", "n": 2, "stream": True}, script)
    data = [p[6:].strip() for p in pieces]
    assert json.loads(data[0])["choices"][0]["text"] == "x"
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["type"] == "server_error"
    assert all(j.cancelled for j in engine.jobs)
