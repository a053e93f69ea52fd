"""scripts/gpu_check.sh --dry-run end to end on CPU: every step runs at tiny size and writes its
figures to gpu_check.json and gpu_check.md; a failing step is recorded and the exit code says so."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ("data", "bf16", "fp16", "resume", "methods", "index", "zeroshot")


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [str(SCRIPT), "--dry-run", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def numbers(value):
    """Every number inside a step's figures (nested dicts included), booleans left out."""
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = gpu_check(out)
    return proc, out


@pytest.mark.slow
def test_dry_run_writes_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "time limits (s):" in proc.stdout  # the budget is printed before any step runs
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert tuple(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["ok"], (name, step)
        assert step["seconds"] <= step["budget_s"]
        figures = {k: v for k, v in step.items() if k not in ("ok", "seconds", "budget_s")}
        values = list(numbers(figures))
        assert values, name
        bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
        assert not bad, (name, bad)
    table = (out / "gpu_check.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| step")]
    assert [row.split("|")[1].strip() for row in rows] == list(STEPS)
    assert all(row.split("|")[2].strip() == "yes" for row in rows)


@pytest.mark.slow
def test_dry_run_figures(dry_run):
    _, out = dry_run
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    bf16 = steps["bf16"]
    assert bf16["model"] == "test" and bf16["batch"] == 16
    assert bf16["samples_per_s"] > 0 and bf16["flops_per_sample"] > 0
    expected = bf16["flops_per_sample"] * bf16["samples_per_s"] / bf16["matmul_flops"]
    assert bf16["hardware_use"] == pytest.approx(expected)
    assert bf16["steps_per_s"] == pytest.approx(bf16["samples_per_s"] / 16)
    # fp16 starts at GradScaler's 2**16 and grows only after 2000 clean steps
    assert steps["fp16"]["loss_scale"] == 65536.0
    assert steps["fp16"]["scaler_skipped_steps"] == 0
    resume = steps["resume"]
    assert resume["backend"] == "gloo" and resume["resumed_at"] == 3
    assert resume["max_loss_diff"] == 0.0  # fp32 on CPU: the resumed steps repeat exactly
    ratios = steps["methods"]["ratio_to_clip"]
    assert set(ratios) == {"clip", "aclip", "aclip-eff", "flip"} and ratios["clip"] == 1.0
    index = steps["index"]
    assert index["on_gpu"] is False and index["recall_at_10"] >= 0.95
    assert steps["zeroshot"]["images"] == 64  # the dry run's demo eval split


def test_failing_step_is_recorded(tmp_path):
    """Without the data step, training finds no shards: recorded, exit code 1, files written."""
    proc = gpu_check(tmp_path, "--steps", "fp16")
    assert proc.returncode == 1
    step = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["fp16"]
    assert step["ok"] is False and "exit 1" in step["error"]
    assert "no shard matches" in step["error"]  # the cause, from the step's own error file
    assert "| fp16 | NO |" in (tmp_path / "gpu_check.md").read_text()


def test_unknown_step_is_refused(tmp_path):
    proc = gpu_check(tmp_path / "out", "--steps", "bf16,warp")
    assert proc.returncode == 2
    assert "unknown steps ['warp']" in proc.stderr
    assert not (tmp_path / "out").exists()
