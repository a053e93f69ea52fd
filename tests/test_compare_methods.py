"""scripts/compare_methods.py: the quick mode end to end (smoke), and the report's arithmetic."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from compare.report import paired, primary, verdict  # noqa: E402


def _run(method, seed, budget, shape, colour, samples=256, seconds=1.0):
    ev = {"zeroshot_shape": shape, "zeroshot_colour": colour}
    return {
        "method": method,
        "seed": seed,
        "budget": budget,
        "samples": samples,
        "train_seconds": seconds,
        "eval": {"online": ev, "ema": ev},
    }


def test_paired_difference_and_verdicts_by_hand():
    runs = [
        _run("a", 0, "samples", 0.50, 0.70),  # primary 0.60
        _run("a", 1, "samples", 0.40, 0.60),  # 0.50
        _run("a", 2, "samples", 0.60, 0.80),  # 0.70
        _run("b", 0, "samples", 0.40, 0.60),  # 0.50
        _run("b", 1, "samples", 0.30, 0.50),  # 0.40
        _run("b", 2, "samples", 0.40, 0.60),  # 0.50
        _run("b", 3, "samples", 0.90, 0.90),  # no partner seed: ignored
    ]
    d = paired({"runs": runs}, "samples", "a", "b")
    # differences 0.10, 0.10, 0.20 -> mean 0.1333, stdev 0.05774, SE 0.03333
    assert d["n"] == 3
    assert d["diff"] == pytest.approx(0.4 / 3)
    assert d["se"] == pytest.approx(0.0577350 / 3**0.5, rel=1e-5)
    assert verdict(d) == "holds"
    assert verdict({"diff": -0.1, "se": 0.01}) == "does not hold (reversed)"
    assert verdict({"diff": 0.01, "se": 0.01}) == "not resolved (within 2 SE)"
    assert verdict({"diff": -0.01, "se": 0.01}, at_least=True).startswith("holds within noise")
    assert verdict({"diff": -0.05, "se": 0.01}, at_least=True) == "does not hold (worse)"
    assert primary(runs[0]["eval"]["online"]) == pytest.approx(0.6)


def test_quick_comparison_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "scripts/compare_methods.py"), "--quick"]
    cmd += ["--methods", "clip,aclip", "--seeds", "0", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    summary = json.loads((out / "results.json").read_text())
    runs = summary["runs"]
    # 2 methods x 2 seeds at equal samples; at equal time CLIP's runs count again, A-CLIP reruns
    assert sorted((r["budget"], r["method"], r["seed"]) for r in runs) == sorted(
        (b, m, s) for b in ("samples", "time") for m in ("clip", "aclip") for s in (0,)
    )
    setup = summary["setup"]
    for r in runs:
        if r["budget"] == "samples":
            assert r["samples"] == setup["samples"]
        assert set(r["eval"]) == ({"online", "ema"} if r["method"] == "aclip" else {"online"})
        for weights, ev in r["eval"].items():  # the numbers are the CLI's own result files
            folder = out / "runs" / f"{r['budget']}-{r['method']}-s{r['seed']}" / f"eval-{weights}"
            if r["method"] == "clip":
                folder = out / "runs" / f"samples-clip-s{r['seed']}" / f"eval-{weights}"
            shape = json.loads((folder / "zeroshot_shape.json").read_text())["metrics"]["acc1"]
            probe = json.loads((folder / "probe_shape.json").read_text())["metrics"]["lp_acc1"]
            assert ev["zeroshot_shape"] == shape and ev["probe_shape"] == probe
            assert 0.0 <= ev["t2i_r1"] <= ev["t2i_r5"] <= 1.0
    # equal wall-clock: A-CLIP's samples come from CLIP's median time / A-CLIP's s per sample
    want = round(summary["clip_time_budget_s"] / summary["seconds_per_sample"]["aclip"])
    for r in runs:
        if r["budget"] == "time" and r["method"] == "aclip":
            assert r["samples"] == pytest.approx(max(setup["batch"], want), abs=setup["batch"])
            steps = [p["step"] for p in r["curve"]]
            assert steps == sorted(steps) and steps[-1] * setup["batch"] == r["samples"]
    # the report: table means from results.json, claims, plot, commands
    report = (out / "results.md").read_text()
    clip_shape = [
        r["eval"]["online"]["zeroshot_shape"]
        for r in runs
        if r["method"] == "clip" and r["budget"] == "samples"
    ]
    mean = 100 * statistics.fmean(clip_shape)
    row = next(line for line in report.splitlines() if line.startswith("| equal samples | clip"))
    assert f"| {mean:.1f} ± " in row
    assert "A-CLIP > CLIP at equal samples" in report and "clipkit pretrain" in report
    png = out / "images" / "compare-zeroshot-time.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("runs/*/checkpoints/*.pt"))  # weights removed unless asked to keep
