"""scripts/bench_generated.py --tiny: a smoke run of the style generator's bench (a tiny GPT-2, a random
generator, a synthetic style library), that it resumes from its kept results, and that a changed
option is not served a stale one."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_generated.py"
METHODS = ["bare", "prefix", "vector", "union", "nearest", "oracle", "generated", "wrong-style", "wrong-neutral"]


def bench(tmp_path, *extra):
    env = {**os.environ, "HNKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path / "out"), "--threads", "1",
                           *extra], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads((tmp_path / "out" / "summary.json").read_text())


def test_tiny_bench_measures_every_method_and_resumes(tmp_path):
    out, summary = bench(tmp_path)
    methods = summary["methods"]
    assert list(methods) == METHODS
    for m in METHODS:
        assert methods[m]["points"] >= 1
    assert methods["bare"]["median_share"] == 0.0
    held = summary["styles"]["heldout"]
    assert sorted(held) == ["desert", "garden"]  # --tiny: two held-out styles, two examples each
    assert len(held["desert"]["methods"]["generated"]) == 2
    assert {p["style"] for p in held["desert"]["methods"]["wrong-style"]} == {"garden"}
    for r in held.values():
        if r["oracle_gain"] is not None:  # the oracle at its best strength is the unit of share
            assert r["methods"]["oracle"][0]["share"] == 1.0
    assert list(summary["training_styles"]) == METHODS[:1] + ["oracle", "generated"]
    assert summary["timings"]["make_style_median_s"] > 0 and summary["generator"]["parameters"] > 0
    assert "training oracle-desert" in out and "training union" in out
    assert (tmp_path / "out" / "shares.png").stat().st_size > 0

    again, kept = bench(tmp_path)  # everything kept: nothing trained or measured again, the same figures
    assert re.search(r"training [\w-]+: \d+ documents", again) is None
    assert kept["methods"] == methods

    _, fewer = bench(tmp_path, "--baseline-examples", "1")  # the baselines on each style's first example only
    for r in fewer["styles"]["heldout"].values():
        ms = r["methods"]
        assert [len(ms[m]) for m in ("generated", "wrong-style", "wrong-neutral")] == [2, 2, 2]
        assert [len(ms[m]) for m in ("prefix", "vector", "nearest")] == [1, 1, 1]

    changed, summary = bench(tmp_path, "--oracle-steps", "4", "--only", "generated", "--train-styles", "0",
                             "--init-steps", "10")
    assert "training oracle-desert: 8 documents, 4 steps" in changed  # not the 3-step oracle kept
    init = summary["init"]  # train-text --init from a generated style, and from the identity
    for start in ("init", "identity"):
        assert [step for step, _ in init[start]["curve"]] == [5, 10]
    assert init["init"]["curve"] != init["identity"]["curve"]
