"""The benchmark scripts' own arithmetic (not their timings): the hardware-use row in both
precisions (the bf16 autocast path is the one a GPU run takes) and bench.py's partial re-runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]


def mfu_row(*args: str) -> dict:
    script = ROOT / "scripts" / "bench" / "mfu.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--model", "test", "--batch", "4", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mfu_row_arithmetic():
    rows = {p: mfu_row("--precision", p) for p in ("fp32", "bf16")}
    for precision, row in rows.items():
        assert row["row"].startswith(f"hardware use: test CLIP, batch 4, {precision} CPU")
        expected = row["flops_per_sample"] * row["samples_per_s"] / row["matmul_flops"]
        assert row["clipkit"] == pytest.approx(expected, rel=1e-12)
        # issue 21's eager CPU target (the row runs without --compile)
        assert row["reference"] == 0.55 and row["ratio"] == pytest.approx(row["clipkit"] / 0.55)
    # FLOPs are counted from the model, not the precision: both runs count the same work.
    assert rows["fp32"]["flops_per_sample"] == rows["bf16"]["flops_per_sample"] > 1e6


def load_bench():
    return load_script("bench")


def test_partial_rerun_keeps_other_rows_of_the_same_cpu(tmp_path):
    bench = load_bench()
    out = tmp_path / "results.json"
    cpu, other = "Intel(R) Xeon(R) Processor, 2 CPUs", "AMD EPYC 7B13, 2 CPUs"
    rows = [
        {"bench": "train", "row": "t", "clipkit": 1, "cpu_model": cpu},
        {"bench": "index", "row": "i", "cpu_model": cpu},
        {"bench": "data", "row": "d", "cpu_model": other},  # another machine: never mixed in
        {"bench": "zeroshot", "row": "z"},  # from before rows named their CPU
    ]
    out.write_text(json.dumps({"quick": False, "rows": rows}))
    assert bench._earlier_rows(out, False, cpu) == {"train": rows[0], "index": rows[1]}
    assert bench._earlier_rows(out, False, other) == {"data": rows[2]}
    assert bench._earlier_rows(out, True, cpu) == {}  # another mode's file is not merged
    assert bench._earlier_rows(tmp_path / "missing.json", False, cpu) == {}


def test_rows_of_another_machine_are_set_aside_not_lost(tmp_path):
    bench = load_bench()
    out = tmp_path / "results.json"
    cpu = "Intel(R) Xeon(R) Processor, 2 CPUs"
    rows = [{"bench": "train", "cpu_model": cpu}, {"bench": "data"}]  # the second: no CPU named
    out.write_text(json.dumps({"quick": False, "date": "2026-11-25", "rows": rows}))
    aside = bench._set_aside(out, False, cpu)
    assert aside == tmp_path / "results-2026-11-25.json"
    assert json.loads(aside.read_text())["rows"] == rows
    assert bench._set_aside(out, False, cpu) == tmp_path / "results-2026-11-25-2.json"
    out.write_text(json.dumps({"quick": False, "date": "2026-12-03", "rows": rows[:1]}))
    assert bench._set_aside(out, False, cpu) is None  # nothing would be dropped
    assert bench._set_aside(tmp_path / "missing.json", False, cpu) is None


def test_cpu_model_names_the_processor():
    name = load_script("bench").train_rows.cpu_model()
    assert re.fullmatch(r".+, \d+ CPUs", name) and not name.startswith("unknown")


def load_bench_accum():
    return load_script("bench_accum")


def test_bench_accum_quick_memory_rows(tmp_path):
    """The quickest run end to end (3 fresh `clipkit pretrain` processes, no open_clip): one
    exact and one plain row per effective batch, K = effective / micro-batch."""
    out = tmp_path / "accum.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_accum.py"), "--quick", "--no-reference"]
    cmd += ["--parts", "memory", "--max-batch", "16", "--threads", "1"]
    cmd += ["--work-dir", str(tmp_path), "--out", str(out), "--plot", str(tmp_path / "m.png")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    results = json.loads(out.read_text())
    rows = {(r["mode"], r["effective_batch"]): r for r in results["memory"]}
    assert sorted(rows) == [("exact", 8), ("exact", 16), ("plain", 8), ("plain", 16)]
    assert [rows["exact", e]["accum"] for e in (8, 16)] == [1, 2]
    assert [rows["plain", e]["micro_batch"] for e in (8, 16)] == [8, 16]
    for r in rows.values():
        assert r["peak_rss_mb"] > 100 and r["cpu_s"] > 0 and r["steps"] == 2
    assert (tmp_path / "m.png").stat().st_size > 1000 and results["time"] == []


def test_bench_accum_time_summary_arithmetic():
    bench = load_bench_accum()
    assert bench.time_configs((4,), reference=True) == [
        ("plain", 1),
        ("independent", 4),
        ("exact", 4),
        ("open_clip", 4),
    ]
    rows = [
        {"config": c, "accum": k, "samples_per_s": s, "cpu_s": 2.0, "wall_s": 4.0}
        for c, k, s in [("plain", 1, 120), ("independent", 4, 100), ("independent", 4, 80)]
        + [("exact", 4, 60), ("exact", 4, 70), ("exact", 4, 50), ("open_clip", 4, 30)]
    ]
    summary = {(r["config"], r["accum"]): r for r in bench.time_summary(rows)}
    exact = summary["exact", 4]
    assert exact["samples_per_s"] == 60 and exact["repeats"] == 3  # the median
    assert exact["ms_per_sample"] == pytest.approx(1000 / 60)
    assert exact["time_vs_independent"] == pytest.approx(90 / 60)
    assert exact["time_vs_plain"] == pytest.approx(120 / 60)
    assert exact["time_vs_open_clip"] == pytest.approx(30 / 60)
    assert exact["cpu_per_wall"] == 0.5 and "time_vs_plain" not in summary["plain", 1]
    table = bench.markdown({"memory": [], "time_summary": list(summary.values())})
    assert "| exact | 4 | 60.0 | 16.67 | 2.00x | 1.50x | 0.50x | 0.50 |" in table


def test_step_profile_splits_a_clipkit_step_into_phases(demo_root, tmp_path):
    """scripts/bench/step_profile.py on the `test` model: every phase it wraps was timed, the
    phases and the loop's rest add up to the step, and the CPU shares are read."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "step_profile.py"), "clipkit"]
    cmd += [str(tmp_path / "run"), "--warmup-steps", "2", "--"]
    cmd += ["--data", str(demo_root / "train"), "--model", "test", "--steps", "6"]
    cmd += ["--batch-size", "8", "--workers", "1", "--threads", "1", "--log-every", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["tool"] == "clipkit" and report["timed_steps"] == 4
    phases = report["phases_s"]
    timed = {"forward image", "forward text", "loss", "backward", "clip gradients", "optimizer"}
    assert timed | {"data wait", "zero_grad", "other"} == set(phases)
    assert all(phases[k] > 0 for k in timed)
    assert sum(phases.values()) == pytest.approx(report["seconds_per_step"], rel=1e-9)
    assert 0 < report["trainer_cores"] <= 1.5 and report["worker_cores"] >= 0
    assert report["torch_threads"] == 1


def test_demo_shape_supervised_check_runs(demo_root):
    """scripts/bench/demo_shape_supervised.py: a few steps on the small demo set, one JSON line
    with every accuracy the docs quote (the 400-step figures are in docs/benchmarks.md)."""
    script = ROOT / "scripts" / "bench" / "demo_shape_supervised.py"
    cmd = [sys.executable, str(script), "--data-root", str(demo_root), "--steps", "3"]
    out = subprocess.run(cmd + ["--batch", "8"], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["model"] == "tiny-rn-64" and row["steps"] == 3
    keys = ["training_images", "new_images_seen_pairs", "new_images_held_out_pairs"]
    for key in [*keys, "zeroshot_test_split"]:
        assert 0.0 <= row[f"acc_{key}"] <= 1.0, (key, row)
    assert row["final_loss"] > 0
