"""The benchmark scripts' own arithmetic (not their timings): the hardware-use row in both
precisions (the bf16 autocast path is the one a GPU run takes) and bench.py's partial re-runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
        assert row["reference"] == 0.5 and row["ratio"] == pytest.approx(row["clipkit"] / 0.5)
    # FLOPs are counted from the model, not the precision: both runs count the same work.
    assert rows["fp32"]["flops_per_sample"] == rows["bf16"]["flops_per_sample"] > 1e6


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_partial_rerun_keeps_other_rows(tmp_path):
    bench = load_bench()
    out = tmp_path / "results.json"
    rows = [{"bench": "train", "row": "t", "clipkit": 1}, {"bench": "index", "row": "i"}]
    out.write_text(json.dumps({"quick": False, "rows": rows}))
    assert bench._earlier_rows(out, quick=False) == {"train": rows[0], "index": rows[1]}
    assert bench._earlier_rows(out, quick=True) == {}  # another mode's file is not merged
    assert bench._earlier_rows(tmp_path / "missing.json", quick=False) == {}
