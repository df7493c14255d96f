"""Reliability stress check (not part of the test run): kill -9 training at random moments and
resume, and feed hostile and damaged files to every command that reads one.

    python scripts/stress_reliability.py               # 20 kills, every hostile file (~10 min, 2 cores)
    python scripts/stress_reliability.py --kills 5     # quicker

1. Kills: a straight run of a tiny GPT-2 (--steps steps, a checkpoint every step, the last two
   kept, so kills land inside checkpoint writes and pruning too) gives the reference weights and
   the time its training starts. Then, --kills times: the same run is started in a fresh folder,
   killed with SIGKILL at a random moment between just before its first step and its end, and
   continued with the same command (--resume when a complete checkpoint exists, else from the
   start) until it finishes. A kill is survived when the final weights equal the
   reference bit for bit and no partial checkpoint is left under a real name.
2. Hostile files: pickles that would run code, damaged and truncated files, declared sizes far
   beyond the tensors, non-finite and non-float weights, bad metadata, text, noise. Each goes
   through hnkit.load, `hnkit inspect`, `hnkit convert` and `hnkit generate-text`, and each damaged
   checkpoint file through `train-text --resume`. A file is refused when every command exits 2
   with one line and no traceback; a payload that runs touches a marker file, counted as a code
   execution. Peak memory: the growth of this process's peak RSS while hnkit.load reads them all.
3. Bombs and changed runs, each a command in a process of its own (its peak RSS from wait4, its
   time): small files that would expand into gigabytes or hang (a zip-bomb, shared references, 100,000
   widths, deep nesting in a .pt, in safetensors metadata and in a YAML recipe, a YAML alias bomb),
   damaged run state for --resume (a step that is not a number, a huge epoch, step 10^30, deep JSON),
   --resume with an option that changes what the run computes, a 200 MB one-line .jsonl, and a 30 MB
   .txt that must train in bounded memory. Targets: one line and exit 2 for each refusal, at most
   5 s, and peak RSS at most 100 MB over the same command on a good input.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hnkit  # noqa: E402
from hnkit.checkpoint import to_a1111  # noqa: E402
from hnkit.commands.cli import main as hnkit_main  # noqa: E402
from hnkit.run_folder import complete_checkpoints  # noqa: E402
from hnkit.testing import build_tiny_lm  # noqa: E402

MARKER = "code-ran.marker"


def train_command(lm, output, steps):
    return [sys.executable, "-m", "hnkit", "train-text", "--model", str(lm["model"]), "--data", str(lm["corpus"]),
            "--output", str(output), "--block-size", "32", "--batch-size", "4", "--max-steps", str(steps),
            "--save-every", "1", "--keep-last", "2", "--lr", "3e-3", "--log-every", "1"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# -- 1. kills -------------------------------------------------------------------------------------
def kills(lm, root: Path, n: int, steps: int, seed: int) -> tuple[int, list[str]]:
    straight = root / "straight"
    started, first_step = time.perf_counter(), None
    proc = subprocess.Popen(train_command(lm, straight, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env())
    while proc.poll() is None:  # when training starts (after imports and loading): kills aim at what follows
        if first_step is None and (straight / "metrics.jsonl").exists():
            first_step = time.perf_counter() - started
        time.sleep(0.05)
    if proc.returncode != 0:
        sys.exit("the reference run failed")
    duration = time.perf_counter() - started
    first_step = first_step or 0.0
    reference = load_file(str(straight / "hypernetwork.safetensors"))
    rng, survived, notes = random.Random(seed), 0, []
    for i in range(n):
        out = root / f"kill-{i:02d}"
        proc = subprocess.Popen(train_command(lm, out, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env())
        moment = rng.uniform(0.9 * first_step, duration)  # from just before the first step to the end
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for _ in range(3):  # continue until finished (a second try only if the first was refused)
            resume = ["--resume", str(out)] if complete_checkpoints(out) else []
            r = subprocess.run(train_command(lm, out, steps) + resume, capture_output=True, text=True, env=env())
            if r.returncode == 0:
                break
        final = out / "hypernetwork.safetensors"
        whole = all((c / "trainer_state.json").exists() for c in out.glob("checkpoints/step-*"))
        same = final.exists() and all(torch.equal(a, b) for a, b in
                                      zip(reference.values(), load_file(str(final)).values()))
        survived += bool(same and whole and r.returncode == 0)
        if not (same and whole and r.returncode == 0):
            notes.append(f"kill {i} at {moment:.1f} s: rc {r.returncode}, same weights {same}, whole checkpoints "
                         f"{whole}: {r.stderr.strip().splitlines()[-1:] }")
        print(f"kill {i + 1}/{n} at {moment:.1f} s of {duration:.1f}: {'survived' if same and whole else 'LOST'}",
              flush=True)
    return survived, notes


# -- 2. hostile files -----------------------------------------------------------------------------
class RunsCode:
    def __init__(self, where):
        self.where = where

    def __reduce__(self):
        return (os.system, (f"touch {self.where}",))


def hostile_networks(folder: Path) -> dict[str, Path]:
    hn = hnkit.Hypernetwork(keys=[32])  # the tiny GPT-2's width
    good_pt = hnkit.save(hn, folder / "good.pt").read_bytes()
    good_st = hnkit.save(hn, folder / "good.safetensors").read_bytes()
    files = {}

    def pt(name, data):
        torch.save(data, folder / name)
        files[name] = folder / name

    def raw(name, blob):
        (folder / name).write_bytes(blob)
        files[name] = folder / name

    marker = folder / MARKER
    pt("code.pt", {32: RunsCode(marker)})
    pt("code-in-metadata.pt", {**to_a1111(hn), "name": RunsCode(marker)})
    raw("code-legacy.pt", __import__("pickle").dumps({"x": RunsCode(marker)}, protocol=2))
    raw("truncated.pt", good_pt[: len(good_pt) // 2])
    raw("truncated.safetensors", good_st[: len(good_st) // 2])
    raw("noise.pt", os.urandom(4096))
    raw("noise.safetensors", os.urandom(4096))
    raw("empty.pt", b"")
    raw("text.pt", b"this is a shopping list, not a network\n")
    for name, change in {
        "huge-declared.pt": {"layer_structure": [1, 64, 1], 2048: to_a1111(hn)[32]},
        "deep.pt": {"layer_structure": [1] + [2] * 100 + [1]},
        "wide.pt": {"layer_structure": [1, 10 ** 6, 1]},
        "dropout-5.pt": {"dropout_structure": 5},
        "negative-width.pt": {-32: to_a1111(hn)[32]},
        "activation.pt": {"activation_func": "os.system"},
        "state-not-dict.pt": {32: ("weights", "here")},
    }.items():
        data = to_a1111(hn)
        if 2048 in change or -32 in change:
            del data[32]
        data.update(change)
        pt(name, data)
    for name, tensor in {"nan.pt": torch.full((64, 32), float("nan")), "inf.pt": torch.full((64, 32), float("inf")),
                         "int.pt": torch.ones(64, 32, dtype=torch.int64), "bool.pt": torch.ones(64, 32, dtype=torch.bool),
                         "complex.pt": torch.ones(64, 32, dtype=torch.complex64)}.items():
        data = to_a1111(hn)
        data[32][0]["linear.0.weight"] = tensor
        pt(name, data)
    tensors = load_file(str(folder / "good.safetensors"))
    from safetensors import safe_open

    with safe_open(str(folder / "good.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["hnkit"])
    for name, m in {"meta-list.safetensors": [meta], "meta-keys.safetensors": {**meta, "keys": "32"},
                    "meta-huge-width.safetensors": {**meta, "keys": ["h.0.attn"], "widths": [10 ** 9],
                                                    "config": {**meta["config"], "per_site": True}},
                    "meta-config.safetensors": {**meta, "config": {"layer_structure": 7}},
                    "meta-version.safetensors": {**meta, "format_version": 99}}.items():
        save_file(tensors, str(folder / name), metadata={"hnkit": json.dumps(m)})
        files[name] = folder / name
    save_file(tensors, str(folder / "no-meta.safetensors"))
    files["no-meta.safetensors"] = folder / "no-meta.safetensors"
    (folder / "a-folder.pt").mkdir()
    files["a-folder.pt"] = folder / "a-folder.pt"
    return files


def one_line_refusal(code: int, err: str) -> bool:
    return code == 2 and err.count("\n") == 1 and "Traceback" not in err


def run_cli(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = hnkit_main(args)
        except BaseException as exc:  # noqa: BLE001 - an escaped exception is what this counts
            code, err = -1, io.StringIO(f"Traceback: {type(exc).__name__}: {exc}\n")
    return code, err.getvalue()


def hostile(lm, root: Path) -> tuple[int, int, int, float, list[str]]:
    folder = root / "hostile"
    folder.mkdir()
    files = hostile_networks(folder)
    loaded = {}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, path in files.items():  # first, alone: what loading these files costs in memory
        try:
            hnkit.load(path)
            loaded[name] = False
        except hnkit.HnkitError as exc:
            loaded[name] = "\n" not in str(exc)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    refused, notes = 0, []
    for name, path in files.items():
        ok = loaded[name]
        if not ok:
            notes.append(f"{name}: hnkit.load did not refuse it in one line")
        for what, args in {
            "inspect": ["inspect", str(path)],
            "convert": ["convert", str(path), str(root / "converted.safetensors")],
            "generate-text": ["generate-text", "--model", str(lm["model"]), "--hypernetwork", str(path),
                              "--prompt", "x", "--max-new-tokens", "2"],
        }.items():
            if not one_line_refusal(*run_cli(args)):
                ok = False
                notes.append(f"{name}: {what} did not refuse it in one line")
        refused += ok
    # damaged checkpoint files, through --resume
    straight = root / "straight"
    damaged = 0
    for name in ("rng_state_0.pt", "training_state.pt", "hypernetwork.safetensors", "trainer_state.json"):
        for how in ("noise", "cut", "code"):
            out = root / f"resume-{name}-{how}"
            shutil.copytree(straight, out)
            target = sorted(out.glob("checkpoints/step-*"))[-1] / name
            if how == "noise":
                target.write_bytes(os.urandom(512))
            elif how == "cut":
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            else:
                torch.save({"optimizer": RunsCode(folder / MARKER)}, target)
            args = train_command(lm, out, 100)[3:] + ["--resume", str(out)]
            code, err = run_cli(args)
            damaged += 1
            if one_line_refusal(code, err) and name in err:
                refused += 1
            else:
                notes.append(f"resume with {how} {name}: rc {code}: {err.strip()[-200:]}")
    return refused, len(files) + damaged, int((folder / MARKER).exists()), peak_mb, notes


# -- 3. bombs and changed runs ---------------------------------------------------------------------
def run_measured(args: list[str], timeout: float = 600) -> tuple[int, str, float, float]:
    """``python -m hnkit ARGS`` in a process of its own: exit code, stderr, seconds, peak RSS in MB.
    The peak is the child's VmHWM, read every 10 ms until it exits (its rusage would report this
    process's peak: Linux keeps the high-water mark across fork and exec)."""
    started, peak = time.perf_counter(), 0.0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "hnkit", *args], stdout=subprocess.DEVNULL, stderr=err,
                                env=env())
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
                peak = max(peak, int(line.split()[1]) / 1024)
            except (OSError, StopIteration):  # exiting: its memory is gone
                pass
            if time.perf_counter() - started > timeout:
                proc.kill()
            time.sleep(0.01)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return proc.returncode, text, time.perf_counter() - started, peak


def bomb_files(folder: Path) -> dict[str, Path]:
    """Small hostile network files and recipes, each built without expanding it here."""
    import zipfile

    hn = hnkit.Hypernetwork(keys=[32])
    files = {}
    good = to_a1111(hn)
    # a zip-bomb: the web UI dict with one weight of 1.5 GB of zeros, deflated to a few MB
    blob = io.BytesIO()
    torch.save(good, blob)
    big = 1_500_000_000
    with zipfile.ZipFile(blob) as src, zipfile.ZipFile(folder / "zip-bomb.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.file_size == 64 * 32 * 4 and "/data/" in info.filename and "zip-bomb" not in files:
                with dst.open(info.filename, "w", force_zip64=True) as out:
                    chunk = bytes(1 << 24)
                    for _ in range(big // len(chunk)):
                        out.write(chunk)
                files["zip-bomb"] = folder / "zip-bomb.pt"
                continue
            dst.writestr(info.filename, data)
    shared: list = []
    for _ in range(40):  # 2^40 leaves when walked, a few hundred bytes on disk
        shared = [shared, shared]
    torch.save({**good, "sd_checkpoint_name": shared}, folder / "shared-references.pt")
    files["shared-references"] = folder / "shared-references.pt"
    torch.save({**{w: ({}, {}) for w in range(1, 100_001)}, "layer_structure": [1, 2, 1]}, folder / "widths.pt")
    files["100,000 empty widths"] = folder / "widths.pt"
    deep = io.BytesIO()  # a list nested 100,000 deep, written as opcodes (pickle itself would recurse)
    torch.save({**good, "name": "DEEP"}, deep)
    with zipfile.ZipFile(deep) as src, zipfile.ZipFile(folder / "deep.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                marker = b"X\x04\x00\x00\x00DEEP"
                data = data.replace(marker, b"]" * 100_000 + b"a" * 99_999, 1)
            dst.writestr(info, data)
    files["deep .pt"] = folder / "deep.pt"
    tensors = {f"{k}": v for k, v in load_file(str(folder.parent / "hostile" / "good.safetensors")).items()}
    save_file(tensors, str(folder / "deep-meta.safetensors"), metadata={"hnkit": "[" * 100_000 + "]" * 100_000})
    files["deep safetensors metadata"] = folder / "deep-meta.safetensors"
    return files


def bomb_recipes(folder: Path) -> dict[str, Path]:
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (folder / "alias-bomb.yaml").write_text("\n".join(laughs) + "\nlr: *a9\n")
    (folder / "deep.yaml").write_text("lr: " + "[" * 5000 + "]" * 5000 + "\n")
    return {"YAML alias bomb": folder / "alias-bomb.yaml", "deep YAML": folder / "deep.yaml"}


def damaged_states(straight: Path, root: Path) -> dict[str, Path]:
    """Copies of a finished run whose last checkpoint says something no run wrote."""
    def copy(name, change):
        out = root / f"state-{name}"
        shutil.copytree(straight, out)
        change(sorted(out.glob("checkpoints/step-*"))[-1], out)
        return out

    def state_edit(**fields):
        def change(step, out):
            state = json.loads((step / "trainer_state.json").read_text())
            (step / "trainer_state.json").write_text(json.dumps({**state, **fields}))
        return change

    return {
        "metrics.jsonl: a step that is not a number": copy(
            "metrics", lambda step, out: (out / "metrics.jsonl").open("a").write('{"step": "x", "loss": 1}\n')),
        "trainer_state.json: epoch 10^30": copy("epoch", state_edit(epoch=10 ** 30)),
        "trainer_state.json: step 10^30": copy("step", state_edit(step=10 ** 30)),
        "trainer_state.json: nested 100,000 deep": copy(
            "deep", lambda step, out: (step / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)),
    }


def with_option(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag`` set to ``value``: replaced where present, appended otherwise."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def bombs(lm, root: Path) -> tuple[int, int, list[str]]:
    """Each hostile input through its command: (refused within the targets, total, notes)."""
    folder = root / "bombs"
    folder.mkdir()
    good_pt = hnkit.save(hnkit.Hypernetwork(keys=[32]), folder / "good.pt")
    straight = root / "straight"
    base = train_command(lm, root / "unused", 12)[3:]

    def train(out, *extra):
        return with_option(base, "--output", str(out)) + list(extra)


    cases: dict[str, tuple[list[str], list[str], str]] = {}  # name -> (args, baseline args, word the line must hold)
    for name, path in bomb_files(folder).items():
        cases[name] = (["inspect", str(path)], ["inspect", str(good_pt)], path.name)
    for name, path in bomb_recipes(folder).items():
        cases[name] = (train(folder / "recipe-run", "--config", str(path), "--max-steps", "1"),
                       train(folder / "baseline-run", "--max-steps", "1"), path.name)
    for name, out in damaged_states(straight, root).items():
        cases[name] = (train(out, "--resume", str(out)), train(folder / "baseline-run", "--max-steps", "1", "--force"),
                       name.split(":")[0])
    changes = {"--data": str(lm["corpus"].parent / "other-corpus.txt"), "--preserve-data": str(lm["corpus"]),
               "--lr": "1e-3", "--seed": "1", "--batch-size": "2", "--block-size": "16", "--grad-accum": "2",
               "--lr-schedule": "cosine"}
    shutil.copy(lm["corpus"], lm["corpus"].parent / "other-corpus.txt")
    (lm["corpus"].parent / "other-corpus.txt").open("a").write("\n\nOne more paragraph of other text.\n")
    for option, value in changes.items():
        out = root / f"changed{option}"
        shutil.copytree(straight, out)
        args = with_option(train(out, "--resume", str(out), "--max-steps", "14"), option, value)
        cases[f"--resume with another {option}"] = (args, train(folder / "baseline-run", "--max-steps", "1", "--force"),
                                                    option)
    line = folder / "one-line.jsonl"
    with line.open("w") as f:
        f.write('{"text": "' + "word " * 40_000_000 + '"}\n')  # 200 MB on one line
    cases["a 200 MB one-line .jsonl"] = (train(folder / "jsonl-run", "--max-steps", "1", "--data", str(line)),
                                         train(folder / "baseline-run", "--max-steps", "1", "--force"), line.name)
    baselines: dict[tuple, tuple[float, float]] = {}  # the same command on a good input: seconds, peak MB
    refused, notes = 0, []
    for name, (args, baseline, word) in cases.items():
        if tuple(baseline) not in baselines:
            baselines[tuple(baseline)] = run_measured(baseline)[2:]
        code, err, seconds, peak = run_measured(args, timeout=120)
        slower, growth = seconds - baselines[tuple(baseline)][0], peak - baselines[tuple(baseline)][1]
        ok = one_line_refusal(code, err) and word in err and slower < 5 and growth < 100
        refused += ok
        print(f"{'ok ' if ok else 'BAD'} {name:45s} rc {code}, {seconds:.1f} s ({slower:+.1f}), peak {growth:+.0f} MB: "
              f"{err.strip()[-100:]}", flush=True)
        if not ok:
            notes.append(f"{name}: rc {code}, {seconds:.1f} s, peak {growth:+.0f} MB: {err.strip()[-200:]}")
    return refused, len(cases), notes


def large_text(lm, root: Path) -> tuple[float, float, int]:
    """A 30 MB .txt trained for one step: (peak RSS MB, the same on the small corpus, its tokens)."""
    big = root / "big.txt"
    text = lm["corpus"].read_text()
    with big.open("w") as f:
        while f.tell() < 30_000_000:
            f.write(text + "\n\n")
    base = train_command(lm, root / "big-run", 1)[3:] + ["--force"]
    small = run_measured(base)[3]
    code, err, seconds, peak = run_measured(with_option(base, "--data", str(big)), timeout=1800)
    if code != 0:
        print(f"  the 30 MB .txt run failed: rc {code}: {err.strip()[-300:]}")
    tokens = max(f.stat().st_size for f in (root / "cache" / "text").glob("*.int32")) // 4  # the big corpus's
    return peak, small, tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hnkit-stress-"))
    os.environ["HNKIT_CACHE"] = str(root / "cache")
    try:
        lm = build_tiny_lm(root / "lm")
        survived, kill_notes = kills(lm, root, args.kills, args.steps, args.seed)
        refused, total, executions, peak_mb, notes = hostile(lm, root)
        bombs_refused, bombs_total, bomb_notes = bombs(lm, root)
        notes += bomb_notes
        big_peak, small_peak, tokens = large_text(lm, root)
        for line in kill_notes + notes:
            print("  " + line)
        print(f"kills survived: {survived}/{args.kills}")
        print(f"hostile and damaged files refused in one line (exit 2, no traceback): {refused}/{total}")
        print(f"code executions: {executions}")
        print(f"peak memory growth while loading every hostile file: {peak_mb:.0f} MB")
        print(f"bombs, damaged run state and changed resumes refused in one line, exit 2, within 5 s and "
              f"+100 MB: {bombs_refused}/{bombs_total}")
        print(f"train-text on a 30 MB .txt ({tokens / 1e6:.1f} M tokens): peak RSS {big_peak:.0f} MB against "
              f"{small_peak:.0f} MB on the small corpus, {(big_peak - small_peak) * 2**20 / tokens:.1f} bytes a token")
    finally:
        if args.keep:
            print(f"work folder: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
