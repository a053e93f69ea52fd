"""scripts/bench_eval.py's own arithmetic (not its timings): step seconds from metrics records,
evaluations counted in training steps, the two tools' medians and ratio, the specs it times."""

from __future__ import annotations

import pytest

from clipkit.eval.specs import parse_specs
from tests.script_loader import load_script

BENCH = load_script("bench_eval")


def test_step_seconds_skip_the_first_steps():
    records = [{"step": s, "samples_per_s": sps} for s, sps in ((1, 10.0), (2, 50.0), (3, 40.0))]
    # batch 100: 100 / 50 = 2 s and 100 / 40 = 2.5 s; step 1 is start-up.
    assert BENCH.step_seconds(records, 100, skip=1) == [2.0, 2.5]
    assert BENCH.step_seconds(records, 100, skip=3) == []


def test_cost_summary_counts_training_steps():
    def round_(run_seconds, shape, probe):
        return {
            "run_seconds": run_seconds,
            "records": [
                {"eval": "zero-shot-shape", "eval_seconds": shape},
                {"eval": "probe-shape", "eval_seconds": probe},
            ],
        }

    rows = BENCH.cost_summary([2.0, 4.0, 3.0], [round_(20.0, 6.0, 12.0), round_(16.0, 3.0, 12.0)])
    by_name = {r["eval"]: r for r in rows}
    assert by_name["zero-shot-shape"]["seconds"] == {"median": 4.5, "all": [6.0, 3.0]}
    assert by_name["zero-shot-shape"]["training_steps"] == pytest.approx(1.5)  # 4.5 s / 3 s
    assert by_name["probe-shape"]["training_steps"] == pytest.approx(4.0)
    assert rows[-1]["seconds"]["median"] == 18.0 and rows[-1]["training_steps"] == 6.0


def test_zeroshot_summary_medians_parts_and_ratio():
    def row(tool, seconds, classes, acc1):
        return {"tool": tool, "seconds": seconds, "class_embeddings_s": classes, "acc1": acc1}

    rows = [
        row("clipkit", 10.0, 8.0, 0.002),
        row("open_clip", 12.0, 9.0, 0.002),
        row("clipkit", 14.0, 10.0, 0.002),
        row("open_clip", 16.0, 13.0, 0.002),
    ]
    summary = BENCH.zeroshot_summary(rows)
    assert summary["clipkit"]["seconds"] == {"median": 12.0, "all": [10.0, 14.0]}
    assert summary["clipkit"]["class_embeddings_s"] == 9.0
    assert summary["clipkit"]["images_s"] == 3.0  # medians of 2 and 4
    assert summary["open_clip"]["images_s"] == 3.0
    assert summary["clipkit_over_open_clip"] == pytest.approx(12.0 / 14.0)


def test_demo_specs_parse_and_name_what_the_demo_evaluates(tmp_path):
    (tmp_path / "eval").mkdir()  # the specs' folders must exist
    specs = parse_specs(BENCH.demo_specs(tmp_path))
    assert [(s.name, s.task, s.dataset) for s in specs] == [
        ("zero-shot-shape", "zero-shot", "demo"),
        ("zero-shot-colour", "zero-shot", "demo"),
        ("retrieval", "retrieval", None),
        ("probe-shape", "probe", "demo"),
    ]
    assert specs[1].option("task") == "colour" and specs[3].option("sweep") == "quick"
    assert specs[2].path == str(tmp_path / "eval")


def test_synset_names_sort_as_the_class_index():
    names = BENCH.synset_names(1000)
    assert names[:2] == ["n00000000", "n00000001"] and names[-1] == "n00000999"
    assert sorted(names) == names and len(set(names)) == 1000
