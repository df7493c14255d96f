"""``hnkit serve`` with a live styles folder (issue 27): styles added, replaced or removed while the
server runs are served without a restart, a file still being written is never read, a damaged one is
skipped with one line, and at most ``--max-styles`` stay attached (the least recently used go)."""

import argparse
import os
import shutil
import threading
import time

import pytest
import torch

import hnkit

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="hnkit serve needs fastapi and uvicorn (pip install -e .)")

from hnkit.commands import serve  # noqa: E402
from hnkit.testing import ServerThread  # noqa: E402

POLL = 0.05
PROMPT = "The grammar of"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hnkit.testing import build_tiny_styles

    built = build_tiny_styles(tmp_path_factory.mktemp("live"))
    built["lm"] = AutoModelForCausalLM.from_pretrained(built["model"]).eval()  # for the expected texts
    built["tokenizer"] = AutoTokenizer.from_pretrained(built["model"])
    return built


def make_style(tiny, path, seed, description=""):
    """A random [1, 2, 1] style for the tiny model saved at ``path`` (atomically, as hnkit saves)."""
    config = hnkit.HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")
    torch.manual_seed(seed)
    hnkit.save(hnkit.Hypernetwork.for_model(tiny["lm"], config, description=description), path)


def expected(tiny, path, strength=1.5, tokens=8):
    """The greedy continuation with the style in ``path`` alone (read now)."""
    ids = tiny["tokenizer"](PROMPT, return_tensors="pt").input_ids
    with torch.no_grad(), hnkit.attach(tiny["lm"], hnkit.load(path), strength):
        out = tiny["lm"].generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return tiny["tokenizer"].decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class Live:
    """A server on a copy of ``names`` of the tiny styles, polling its folder every POLL seconds."""

    def __init__(self, tiny, folder, names=("noir",), max_styles=64, poll=POLL):
        self.folder = folder
        folder.mkdir()
        for name in names:
            shutil.copy(tiny["styles"] / f"{name}.safetensors", folder)
        self.lines = []
        args = argparse.Namespace(model=str(tiny["model"]), styles=str(folder), name="tiny", max_batch=8,
                                  device="cpu", max_styles=max_styles, poll_interval=poll)
        engine, _, _ = serve.build(args, thread=True, say=self.lines.append)
        self.server = ServerThread(None, None, engine=engine, log=self.lines.append)
        self.url, self.engine = self.server.url, engine

    def models(self) -> dict:
        return {m["id"]: m for m in httpx.get(self.url + "/v1/models", timeout=30).json()["data"]}

    def complete(self, model, tokens=8):
        return httpx.post(self.url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0})

    def said(self, words) -> list:
        return [line for line in self.lines if words in line]

    def wait(self, ready, what, timeout=10.0):
        deadline = time.time() + timeout
        while not ready():
            assert time.time() < deadline, f"{what}: not within {timeout} s; log: {self.lines}"
            time.sleep(POLL / 2)


@pytest.fixture
def live(tiny, tmp_path):
    servers = []

    def start(**kw):
        servers.append(Live(tiny, tmp_path / f"styles{len(servers)}", **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.server.close()


def test_a_style_added_replaced_then_removed_is_served_without_a_restart(tiny, live):
    s = live()
    assert list(s.models()) == ["tiny", "tiny+noir"]
    make_style(tiny, s.folder / "pastel.safetensors", seed=7, description="soft colours")
    s.wait(lambda: "tiny+pastel" in s.models(), "the new style listed")
    entry = s.models()["tiny+pastel"]
    assert entry["description"] == "soft colours" and entry["base_model"] == tiny["lm"].config._name_or_path
    first = expected(tiny, s.folder / "pastel.safetensors")
    r = s.complete("tiny+pastel:1.5")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == first

    make_style(tiny, s.folder / "pastel.safetensors", seed=8, description="bold colours")  # an atomic rename
    s.wait(lambda: s.models()["tiny+pastel"]["description"] == "bold colours", "the replaced style listed")
    second = expected(tiny, s.folder / "pastel.safetensors")
    assert second != first  # the test can tell the two files apart
    assert s.complete("tiny+pastel:1.5").json()["choices"][0]["text"] == second  # the new weights

    os.remove(s.folder / "pastel.safetensors")
    s.wait(lambda: "tiny+pastel" not in s.models(), "the removed style gone")
    r = s.complete("tiny+pastel:1.5")
    assert r.status_code == 400 and "unknown style 'pastel'" in r.json()["error"]["message"]
    assert s.said("style 'pastel' removed")
    assert s.complete("tiny+noir").status_code == 200
    assert s.engine.members == ["noir"]  # taken off before the next batch


def test_a_file_still_being_written_is_never_read(tiny, live, tmp_path):
    s = live(poll=0.1)
    make_style(tiny, tmp_path / "whole.safetensors", seed=3)
    data = (tmp_path / "whole.safetensors").read_bytes()
    with open(s.folder / "slow.safetensors", "wb") as f:  # as cp writes: under its final name, in pieces
        size = len(data) // 30 + 1
        for i in range(0, len(data), size):
            assert "slow" not in s.engine.library  # not whole yet
            f.write(data[i:i + size])
            f.flush()
            time.sleep(0.02)  # each listing sees it grow
    s.wait(lambda: "tiny+slow" in s.models(), "the whole file listed")
    assert not s.said("skipped"), s.lines  # never read half-written (it would not load)
    r = s.complete("tiny+slow:1.5")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(tiny, s.folder / "slow.safetensors")


def test_a_damaged_file_is_skipped_with_one_line_and_the_rest_served(tiny, live):
    s = live()
    (s.folder / ".bad.tmp").write_bytes(b"not a hypernetwork" * 10)
    os.replace(s.folder / ".bad.tmp", s.folder / "bad.safetensors")
    s.wait(lambda: s.said("skipped style 'bad'"), "the damaged file said")
    time.sleep(10 * POLL)  # said once, not at every listing
    assert len(s.said("skipped style 'bad'")) == 1 and len(s.said("bad")) == 1, s.lines
    assert "tiny+bad" not in s.models()
    assert s.complete("tiny+noir:1.5").status_code == 200
    make_style(tiny, s.folder / "bad.safetensors", seed=5)  # mended: served
    s.wait(lambda: "tiny+bad" in s.models(), "the mended file listed")
    assert s.complete("tiny+bad").status_code == 200


def test_at_most_max_styles_stay_attached_the_least_recently_used_go(tiny, live):
    s = live(names=("noir", "whimsy", "gothic"), max_styles=2)

    def attached():
        styles = httpx.get(s.url + "/hnkit/styles", timeout=30).json()["styles"]
        return {x["name"] for x in styles if x["attached"]}

    assert len(s.models()) == 4 and len(attached()) == 2  # all listed, two attached
    texts = {}
    for name, now in [("noir", None), ("whimsy", None), ("gothic", {"whimsy", "gothic"}),
                      ("whimsy", {"whimsy", "gothic"}), ("noir", {"whimsy", "noir"})]:
        r = s.complete(f"tiny+{name}:1.5")
        assert r.status_code == 200
        texts.setdefault(name, r.json()["choices"][0]["text"])
        assert r.json()["choices"][0]["text"] == texts[name]  # read again, the same weights
        if now is not None:
            assert attached() == now
    for name in texts:
        assert texts[name] == expected(tiny, s.folder / f"{name}.safetensors")
    r = s.complete("tiny+noir+whimsy+gothic")
    assert r.status_code == 400 and "at most 2" in r.json()["error"]["message"]
    # two requests waiting together with three styles between them run as two batches
    batches = s.engine.stats["batches"]
    replies = []
    with s.engine.busy:
        threads = [threading.Thread(target=lambda m=m: replies.append(s.complete(m))) for m in
                   ("tiny+noir+whimsy", "tiny+gothic")]
        for t in threads:
            t.start()
        s.wait(lambda: len(s.engine.waiting) == 2, "both requests waiting")
    for t in threads:
        t.join()
    assert [r.status_code for r in replies] == [200, 200] and s.engine.stats["batches"] == batches + 2


def test_a_waiting_request_whose_style_is_removed_is_refused(tiny, live):
    s = live(names=("noir", "whimsy"))
    replies = []
    with s.engine.busy:  # the request waits while the style goes
        t = threading.Thread(target=lambda: replies.append(s.complete("tiny+whimsy")))
        t.start()
        s.wait(lambda: len(s.engine.waiting) == 1, "the request waiting")
        os.remove(s.folder / "whimsy.safetensors")
        s.wait(lambda: s.said("style 'whimsy' removed"), "the removal seen")
    t.join()
    assert replies[0].status_code == 400 and "unknown style 'whimsy'" in replies[0].json()["error"]["message"]
    assert s.complete("tiny+noir").status_code == 200


def test_bad_max_styles_and_poll_interval_are_one_line(tiny, tmp_path):
    from hnkit import HnkitError

    base = dict(model=str(tiny["model"]), styles=str(tiny["styles"]), name="tiny", max_batch=8, device="cpu")
    with pytest.raises(HnkitError, match="--max-styles must be in"):
        serve.build(argparse.Namespace(**base, max_styles=0, poll_interval=2.0))
    with pytest.raises(HnkitError, match="--poll-interval must be"):
        serve.build(argparse.Namespace(**base, max_styles=4, poll_interval=-1.0))


def test_the_resident_set_changes_only_in_update_least_recently_used_first(tiny, tmp_path):
    from hnkit.resident import ResidentStyles

    for name in ("noir", "whimsy", "gothic"):
        shutil.copy(tiny["styles"] / f"{name}.safetensors", tmp_path)
    library = hnkit.StyleLibrary(tmp_path)
    resident = ResidentStyles(tiny["lm"], library, max_styles=2)
    try:
        assert len(resident.members) == 2 and resident.builds == 1 and resident.stack is not None
        first = resident.members[0]
        (left_out,) = set(library) - set(resident.members)
        assert resident.update({left_out, resident.members[1]}) == {}  # the least recently used makes room
        assert set(resident.members) == set(library) - {first} and resident.builds == 2
        attachment = resident.attachment
        assert resident.update({left_out}) == {} and resident.attachment is attachment  # nothing to change
        assert "unknown style 'nope'" in resident.update({"nope"})["nope"] and resident.builds == 2

        make_style(tiny, tmp_path / f"{left_out}.safetensors", seed=9)  # replaced: not whole until listed twice
        library.refresh()
        assert resident.update(set()) == {} and resident.attachment is attachment
        library.refresh()
        assert resident.update(set()) == {} and left_out not in resident.members  # the old weights taken off
        assert resident.builds == 3
    finally:
        resident.close()
    assert resident.attachment is None
