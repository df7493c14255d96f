"""Small hostile files that would expand into gigabytes or hang: each is refused in one line that
names it, before anything is expanded (issue 24). Every builder here makes its file without
allocating what the file stands for."""

import collections
import io
import json
import pickle
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hnkit
from hnkit import HnkitError, Hypernetwork
from hnkit.checkpoint import to_a1111
from hnkit.commands import train_text
from hnkit.commands.cli import main
from hnkit.commands.options import read_recipe
from hnkit.safe_load import MAX_METADATA_CHARS
from conftest import load_refused

BOMB_BYTES = 150 << 20  # what the zip bomb expands to: above the 100 MB the loader may take


# -- builders ------------------------------------------------------------------------------------
class _Storage:
    def __init__(self, nbytes):
        self.nbytes = nbytes


class _Bytes:
    """Pickles as torch.save pickles a uint8 tensor of ``nbytes`` whose storage is archive/data/0."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def __reduce__(self):
        args = (_Storage(self.nbytes), 0, (self.nbytes,), (1,), False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):  # how torch.save refers to a storage kept in its own zip entry
        return ("storage", torch.ByteStorage, "0", "cpu", obj.nbytes) if isinstance(obj, _Storage) else None


def zip_bomb(path, nbytes=BOMB_BYTES):
    """A torch.save-style zip whose one storage, ``nbytes`` of zeros, is deflated to ~1/1000 of that."""
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump({"optional_info": _Bytes(nbytes)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            for _ in range(nbytes >> 20):
                f.write(bytes(1 << 20))
    return path


def overlapping_zip(path, copies=20):
    """A good web UI .pt whose zip directory lists its largest entry ``copies`` more times, all at the
    same bytes (overlapping stored entries: the uncompressed kind of zip bomb)."""
    good = hnkit.save(Hypernetwork(keys=[32]), path.with_name("good-for-overlap.pt")).read_bytes()
    path.write_bytes(good)
    with zipfile.ZipFile(path, "a") as z:
        big = max(z.infolist(), key=lambda e: e.file_size)
        for i in range(copies):
            z.writestr(f"archive/pad{i}", b"")  # makes zipfile rewrite the directory on close
            z.filelist[-1].header_offset = big.header_offset
            z.filelist[-1].file_size = z.filelist[-1].compress_size = big.file_size
    return path


def with_item(path, key: str, value_ops: bytes):
    """A good web UI .pt whose dict gets one more item, its value given as raw pickle opcodes."""
    good = hnkit.save(Hypernetwork(keys=[32]), path.with_name("good-for-item.pt"))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as out:
        for entry in src.infolist():
            data = src.read(entry)
            if entry.filename.endswith("data.pkl"):
                assert data.endswith(b"u.")  # ... SETITEMS, STOP: add a key and value before them
                data = data[:-2] + b"X" + len(key).to_bytes(4, "little") + key.encode() + value_ops + b"u."
            out.writestr(entry, data)
    return path


def deep_list_ops(levels):
    """Pickle opcodes for a list in a list ... ``levels`` deep (EMPTY_LIST each, then APPEND each)."""
    return b"]" * levels + b"a" * (levels - 1)


def shared_lists(levels, fanout=8):
    """A list holding the same list ``fanout`` times, ``levels`` deep: a few bytes pickled (the
    pickle's memo refers back), ``fanout ** levels`` values to anything that walks it."""
    x = ["x"]
    for _ in range(levels):
        x = [x] * fanout
    return x


def network_with(path, items: dict):
    hn = Hypernetwork(keys=[32])
    torch.save({**to_a1111(hn), **items}, path)
    return path


def safetensors_with(path, meta_text=None, **change):
    """A small network saved at ``path``, then written again with its hnkit metadata replaced by
    ``meta_text``, or changed by ``change`` (``config`` entries merged into the config)."""
    hnkit.save(Hypernetwork(keys=[32]), path)
    with safe_open(path, framework="pt") as f:
        tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
        meta = json.loads(f.metadata()["hnkit"])
    if meta_text is None:
        meta_text = json.dumps({**meta, **change, "config": {**meta["config"], **change.get("config", {})}})
    save_file(tensors, str(path), metadata={"hnkit": meta_text})
    return path


# name -> (how to build it at a path, what its one-line refusal must say)
HOSTILE = {
    "zip-bomb.pt": (zip_bomb, "compressed zip entries"),
    "overlap.pt": (overlapping_zip, "overlap"),
    "shared.pt": (lambda p: network_with(p, {"optional_info": shared_lists(20)}), "more than 100,000 values"),
    "deep.pt": (lambda p: with_item(p, "optional_info", deep_list_ops(100_000)), "nested more than 32 levels"),
    "widths.pt": (lambda p: network_with(p, {w: ({}, {}) for w in range(1, 100_001)}), "more than 500,000 operations"),
    "65-widths.pt": (lambda p: network_with(p, {w: ({}, {}) for w in range(1, 66)}), "65 width keys"),
    "deep-meta.safetensors": (lambda p: safetensors_with(p, "[" * 100_000 + "]" * 100_000), "nested more than"),
    "deep-extra.safetensors": (lambda p: safetensors_with(p, extra={"x": shared_lists(500, 1)}),
                               "nested more than 32 levels"),
    "long-meta.safetensors": (lambda p: safetensors_with(p, extra={"x": [0] * MAX_METADATA_CHARS}),
                              "hnkit metadata of"),
    "many-sites.safetensors": (lambda p: safetensors_with(
        p, keys=[f"s{i}" for i in range(5000)], widths=[32] * 5000, config={"per_site": True}), "5,000 keys"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return {name: (build(folder / name), says) for name, (build, says) in HOSTILE.items()}


# -- the library and the command line -------------------------------------------------------------
@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_file_is_refused_in_one_line_by_load_and_the_cli(hostile, name, tmp_path, capsys):
    path, says = hostile[name]
    load_refused(path, says)
    out = tmp_path / "out.safetensors"
    generate = ["generate-text", "--model", str(tmp_path / "no-model"), "--hypernetwork", str(path), "--prompt", "x"]
    for args in (["inspect", str(path)], ["convert", str(path), str(out)], generate):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and says in err, err
    assert not out.exists()


def test_hostile_files_take_little_memory_and_time(hostile, tmp_path):
    """All of them loaded one after another in a fresh process: the peak memory grows < 100 MB."""
    warm_up = [hnkit.save(Hypernetwork(keys=[32]), tmp_path / f"good{ext}") for ext in (".pt", ".safetensors")]
    script = textwrap.dedent("""
        import json, resource, sys, time
        import hnkit
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hnkit.load(sys.argv[1]), hnkit.load(sys.argv[2])  # all imports done
        base, report = peak(), {}
        for path in sys.argv[3:]:
            start = time.perf_counter()
            try:
                hnkit.load(path)
                report[path] = "loaded"
            except hnkit.HnkitError:
                report[path] = [time.perf_counter() - start, peak() - base]
        print(json.dumps(report))
    """)
    paths = [str(path) for path, _ in hostile.values()]
    run = subprocess.run([sys.executable, "-c", script, *map(str, warm_up), *paths], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.splitlines()[-1])
    for path, result in report.items():
        assert result != "loaded", path
        seconds, grown_mb = result
        assert seconds < 5 and grown_mb < 100, (path, seconds, grown_mb)


def test_a_real_network_is_far_inside_the_bounds(tmp_path):
    """A web UI .pt of 6 widths with 16 layers and layer norm (26,000 pickle operations) and its Adam
    sidecar (65,000) load: the bounds leave real files plenty of room."""
    torch.manual_seed(0)
    config = hnkit.HypernetworkConfig([1] + [1.5] * 14 + [1], "relu", layer_norm=True)
    hn = Hypernetwork(config, [8, 16, 24, 32, 40, 48])
    optimizer = torch.optim.AdamW(hn.parameters())
    for p in hn.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    hn.optimizer_state = {"optimizer_name": "AdamW", "optimizer_state_dict": optimizer.state_dict()}
    back = hnkit.load(hnkit.save(hn, tmp_path / "big.pt"))
    assert back.keys() == hn.keys() and back.optimizer_state["optimizer_name"] == "AdamW"
    assert all(torch.equal(a, b) for a, b in zip(hn.parameters(), back.parameters()))
    nested = {"extra": {"notes": [[["three lists deep"]]]}}
    assert hnkit.load(network_with(tmp_path / "notes.pt", {"optional_info": nested})).extra["optional_info"] == nested


def test_a_legacy_format_pt_is_scanned_too(tmp_path):
    """torch's older (non-zip) format: its pickles are bounded the same way, and it still loads."""
    hn = Hypernetwork(keys=[32])
    torch.save(to_a1111(hn), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert hnkit.load(tmp_path / "old.pt").keys() == [32]
    with open(tmp_path / "old-widths.pt", "wb") as f:  # a plain pickle of 100,000 widths
        pickle.dump({w: ({}, {}) for w in range(1, 100_001)}, f, protocol=2)
    with pytest.raises(HnkitError, match=r"old-widths.pt: refused: its pickle has more than 500,000 operations"):
        hnkit.load(tmp_path / "old-widths.pt")


# -- YAML recipes ---------------------------------------------------------------------------------
def billion_laughs(levels=9):
    """~300 bytes of YAML whose prompts stand for 9 ** levels strings, each list 9 aliases of the last."""
    lines = ["sample_prompts:", '  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


RECIPES = {
    "laughs.yaml": (billion_laughs(), "more than 10,000 values"),
    "deep.yaml": ("layer_structure: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 16 levels"),
    "loop.yaml": ("layer_structure: &a [1, *a]\n", "alias *a refers to no complete anchor"),
    "huge.yaml": ("name: x\n" + "#" * (65 << 10) + "\n", "a recipe is at most 64 KB"),
}


@pytest.mark.parametrize("name", RECIPES)
def test_a_hostile_recipe_is_refused_in_one_line(name, tmp_path, capsys):
    text, says = RECIPES[name]
    path = tmp_path / name
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(HnkitError) as err:
        read_recipe(str(path), train_text.OPTIONS)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and says in msg, msg
    assert main(["train-text", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_recipe_aliases_that_stay_small_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("model: m\ndata: d\nname: &n noir\noutput: *n\nlayer_structure: [1, 2, 1]\n")
    assert read_recipe(str(path), train_text.OPTIONS)["output"] == "noir"
