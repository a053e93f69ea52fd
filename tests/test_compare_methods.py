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

from compare.report import paired, primary, retrieval, verdict, write_report  # noqa: E402


def _run(method, seed, budget, shape, colour, samples=256, seconds=1.0, augment="clip", t2i=0.1):
    ev = {"zeroshot_shape": shape, "zeroshot_colour": colour}
    if colour is None:  # the no-colour task evaluates zero-shot shape only
        del ev["zeroshot_colour"]
    ev.update(t2i_r1=t2i, i2t_r1=0.2, probe_shape=0.3)
    return {
        "method": method,
        "augment": augment,
        "seed": seed,
        "budget": budget,
        "samples": samples,
        "train_seconds": seconds,
        "command": f"clipkit pretrain --method {method} --augment {augment}",
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
    cmd += ["--methods", "clip,aclip", "--augment", "clip", "--seeds", "0", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    summary = json.loads((out / "results.json").read_text())
    runs = summary["runs"]
    # 2 methods x 2 seeds at equal samples; at equal time CLIP's runs count again, A-CLIP reruns
    assert sorted((r["budget"], r["method"], r["seed"]) for r in runs) == sorted(
        (b, m, s) for b in ("samples", "time") for m in ("clip", "aclip") for s in (0,)
    )
    assert {r["augment"] for r in runs} == {"clip"}
    setup = summary["setup"]
    for r in runs:
        if r["budget"] == "samples":
            assert r["samples"] == setup["samples"]
        assert set(r["eval"]) == ({"online", "ema"} if r["method"] == "aclip" else {"online"})
        for weights, ev in r["eval"].items():  # the numbers are the CLI's own result files
            budget = "samples" if r["method"] == "clip" else r["budget"]  # CLIP's run counts twice
            folder = out / "runs" / f"{budget}-clip-{r['method']}-s{r['seed']}" / f"eval-{weights}"
            shape = json.loads((folder / "zeroshot_shape.json").read_text())["metrics"]["acc1"]
            probe = json.loads((folder / "probe_shape.json").read_text())["metrics"]["lp_acc1"]
            assert ev["zeroshot_shape"] == shape and ev["probe_shape"] == probe
            assert 0.0 <= ev["t2i_r1"] <= ev["t2i_r5"] <= 1.0
    # equal wall-clock: A-CLIP's samples come from CLIP's median time / A-CLIP's s per sample
    per_sample = summary["seconds_per_sample"]["clip"]["aclip"]
    want = round(summary["clip_time_budget_s"]["clip"] / per_sample)
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
    row = next(x for x in report.splitlines() if x.startswith("| equal samples | clip | clip |"))
    assert f"| {mean:.1f} ± " in row
    assert "| A-CLIP > CLIP | equal samples | clip |" in report and "clipkit pretrain" in report
    # A-CLIP ran under CLIP's pipeline, without its colour jitter
    config = (out / "runs" / "samples-clip-aclip-s0" / "config.yaml").read_text()
    assert "augment: clip" in config and "photometric: false" in config
    png = out / "images" / "compare-zeroshot-time.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("runs/*/checkpoints/*.pt"))  # weights removed unless asked to keep


def test_two_augmentations_on_the_no_colour_task(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "scripts/compare_methods.py"), "--quick", "--methods"]
    cmd += ["clip", "--augment", "clip,slip", "--seeds", "0", "--budgets", "samples"]
    cmd += ["--task", "no-colour", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert json.loads((out / "data" / "demo.json").read_text())["captions"] == "no-colour"
    assert list(summary["augments"]) == ["clip", "slip"] and summary["zeroshot_tasks"] == ["shape"]
    runs = summary["runs"]
    assert sorted((r["budget"], r["augment"], r["method"]) for r in runs) == [
        ("samples", "clip", "clip"),
        ("samples", "slip", "clip"),
    ]
    report = (out / "results.md").read_text()
    lines = report.splitlines()
    for r in runs:
        run = out / "runs" / f"samples-{r['augment']}-clip-s0"
        config = (run / "config.yaml").read_text()  # the flags reached the trainer
        assert f"augment: {r['augment']}" in config and "photometric: false" in config
        assert r["command"].endswith(f"--augment {r['augment']} --no-photometric")
        assert sorted(p.name for p in (run / "eval-online").glob("zeroshot_*.json")) == [
            "zeroshot_shape.json"
        ]
        shape = 100 * r["eval"]["online"]["zeroshot_shape"]
        row = next(x for x in lines if x.startswith(f"| equal samples | {r['augment']} | clip |"))
        assert f"| {shape:.1f} ± 0.0 |" in row
    assert "zero-shot colour" not in report.split("## Earlier confounded")[0]
    assert "Zero-shot colour is not evaluated" in report
    assert "| equal samples | aclip | aclip | 12,800 | 11.7 ± 3.2 | 67.1 ± 9.9 |" in report  # v1
    # a working folder holds one task's data: the other task is refused, nothing is rewritten
    cmd[cmd.index("no-colour")] = "colour"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "--captions no-colour, not all" in res.stderr


def _no_colour_summary(runs):
    return {
        "setup": dict(
            train_samples=512,
            image_size=32,
            width=32,
            layers=2,
            heads=1,
            patch_size=8,
            context=32,
            batch=32,
            lr=1e-3,
            warmup_share=0.1,
            seeds=[0, 1, 2],
            samples=256,
            ema_momentum=0.9,
            ssl_dims=[32, 32],
        ),  # fmt: skip
        "task": "no-colour",
        "zeroshot_tasks": ["shape"],
        "augments": {"clip": "clip (...)", "aclip": "aclip (...)"},
        "parameters": {"clip": 1_000_000},
        "methods": [
            {"name": "clip", "family": "clip", "has_ema": False, "group": "main"},
            {"name": "aclip", "family": "clip", "has_ema": False, "group": "main"},
        ],
        "clip_time_budget_s": {},
        "total_seconds": 60.0,
        "machine": "test",
        "date": "2026-12-03",
        "script": "scripts/compare_methods.py --task no-colour",
        "runs": runs,
    }


def test_no_colour_report_reads_claims_on_shape_and_retrieval(tmp_path):
    runs = []
    for aug, shift in (("clip", 0.0), ("aclip", 0.2)):
        for seed, (clip, aclip) in enumerate([(0.30, 0.40), (0.20, 0.35), (0.25, 0.30)]):
            runs.append(_run("clip", seed, "samples", clip, None, augment=aug))
            # A-CLIP's text-to-image R@1 is lower by 0.02, 0.04, 0.06: retrieval -1, -2, -3 points
            t2i = 0.1 - 0.02 * (seed + 1)
            runs.append(_run("aclip", seed, "samples", aclip + shift, None, augment=aug, t2i=t2i))
    summary = _no_colour_summary(runs)
    d = paired(summary, "samples", "aclip", "clip", augment="clip")
    assert d["diff"] == pytest.approx(0.1) and d["n"] == 3  # shape alone: 0.10, 0.15, 0.05
    assert paired(summary, "samples", "aclip", "clip", augment="aclip")["diff"] == pytest.approx(
        0.3
    )
    d = paired(summary, "samples", "aclip", "clip", augment="clip", metric=retrieval)
    assert d["diff"] == pytest.approx(-0.02) and d["se"] == pytest.approx(0.01 / 3**0.5)
    write_report(summary, tmp_path / "r.md", tmp_path / "p.png")
    report = (tmp_path / "r.md").read_text()
    head = report.split("## Earlier confounded")[0]
    assert "zero-shot colour" not in head
    assert "| claim | budget | augmentation | metric | difference (points, mean ± SE" in head
    shape, r1 = "zero-shot shape top-1", "retrieval R@1, mean of T→I and I→T"
    assert f"| A-CLIP > CLIP | equal samples | clip | {shape} | +10.0 ± 2.9 (n=3) | holds |" in head
    assert (
        f"| A-CLIP > CLIP | equal samples | aclip | {shape} | +30.0 ± 2.9 (n=3) | holds |" in head
    )
    want = f"| A-CLIP > CLIP | equal samples | clip | {r1} | -2.0 ± 0.6 (n=3) | does not hold"
    assert want in head
    table = [x for x in head.splitlines() if x.startswith("| equal samples | aclip | clip |")]
    assert table == ["| equal samples | aclip | clip | online | 1.00 M | 256 | 1 ± 0 | 25.0 ± 5.0 |"
                     " 10.0 ± 0.0 | 20.0 ± 0.0 | 30.0 ± 0.0 |"]  # fmt: skip
    assert not (tmp_path / "p.png").exists()  # no equal-time runs, no plot


@pytest.mark.parametrize(
    "argv, plot",
    [
        ([], ROOT / "docs/images/compare-zeroshot-time.png"),
        (["--task", "no-colour"], ROOT / "docs/images/compare-zeroshot-time-no-colour.png"),
        (["--report", "/r/results-ablation.md"], "/r/images/compare-zeroshot-time-ablation.png"),
        (["--report", "/r/mine.md"], "/r/images/compare-zeroshot-time-mine.png"),
        (["--report", "/r/mine.md", "--plot", "/p.png"], "/p.png"),
    ],
)
def test_plot_is_named_after_the_report(argv, plot, monkeypatch):
    """A report of one's own (the ablation rows, say) must not overwrite another report's plot."""
    from script_loader import load_script

    # Importing the script sets TQDM_DISABLE for its in-process runs; had it leaked into this
    # worker's environment, every later `clipkit pretrain` subprocess would run without a
    # progress bar (and the signal tests, which wait for it, would time out). Owning the
    # variable here makes the script's setdefault a no-op and restores the old state afterwards.
    monkeypatch.setenv("TQDM_DISABLE", "1")
    args = load_script("compare_methods").parse_args(argv)
    assert args.plot == Path(plot)


def test_no_colour_task_defaults_to_16x_the_samples(monkeypatch):
    """At the colour task's budget the colour-free captions teach nothing an evaluation can see;
    the default grows for that task alone and never leaks into the next parse (one process)."""
    from script_loader import load_script

    monkeypatch.setenv("TQDM_DISABLE", "1")  # see test_plot_is_named_after_the_report
    script = load_script("compare_methods")
    assert script.parse_args(["--task", "no-colour"]).setup.samples == 204_800
    assert script.parse_args([]).setup.samples == 12_800
    assert script.parse_args(["--task", "no-colour", "--samples", "256"]).setup.samples == 256
    assert script.parse_args(["--task", "no-colour", "--quick"]).setup.samples == 256
    assert script.parse_args(["--seeds", "5"]).setup.seeds == [5]
    assert script.parse_args([]).setup.seeds == [0, 1, 2]
