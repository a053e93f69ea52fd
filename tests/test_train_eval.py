"""Evaluation during training (issue 17): `pretrain --eval SPEC --eval-every N` records at the
right steps, numbers equal to the stand-alone commands on the saved checkpoint, the same numbers
from 2 gloo ranks, bad input refused up front, and a failing evaluation that does not stop the
run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_util import run as run_cli
from cli_util import user_error
from test_val_best import naive_val_loss

from clipkit import checkpoint
from clipkit.train.logging import read_metrics

TINY = ["--model", "test", "--batch-size", 16, "--workers", 0, "--threads", 1, "--warmup", 2]
TINY += ["--lr", "1e-3", "--device", "cpu", "--log-every", 1, "--eval-workers", 0]


def _specs(demo_root: Path) -> list[str]:
    """A zero-shot and a retrieval spec on the demo data (names: shape, pairs)."""
    return [f"shape=zero-shot:demo:{demo_root},task=shape", f"pairs=retrieval:{demo_root}/eval"]


def _eval_records(run: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("eval") == name]


def _standalone_zero_shot(demo_root: Path, ckpt: Path, out: Path) -> dict:
    code, _, err = run_cli(
        "zero-shot", "demo", "--data-root", demo_root, "--task", "shape",
        "--checkpoint", ckpt, "--workers", 0, "--device", "cpu", "-o", out,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out.read_text())["metrics"]


@pytest.fixture(scope="module")
def eval_run(demo_root, tmp_path_factory):
    """5 steps, evaluating two specs every 2 steps (and at the last)."""
    run = tmp_path_factory.mktemp("train-eval") / "run"
    specs = [a for s in _specs(demo_root) for a in ("--eval", s)]
    args = ["--data", demo_root / "train", "--out", run, *TINY, "--steps", 5, "--eval-every", 2]
    code, out, err = run_cli("pretrain", *args, *specs)
    assert code == 0, err
    return run, out


def test_records_at_the_evaluation_steps(eval_run):
    run, out = eval_run
    for name in ("shape", "pairs"):
        records = _eval_records(run, name)
        assert [r["step"] for r in records] == [2, 4, 5]
        assert [r["samples_seen"] for r in records] == [32, 64, 80]
        assert all("error" not in r and r["eval_seconds"] > 0 for r in records)
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step-2", "step-4", "step-5"]
    for step in (2, 4, 5):
        shape = json.loads((run / "eval" / f"step-{step}" / "shape.json").read_text())
        assert shape["clipkit"]["step"] == step and shape["task"] == "zeroshot_classification"
        record = next(r for r in _eval_records(run, "shape") if r["step"] == step)
        assert record["eval/shape/acc1"] == pytest.approx(shape["metrics"]["acc1"], abs=1e-12)
        assert (run / "eval" / f"step-{step}" / "pairs.json").is_file()
    pairs = _eval_records(run, "pairs")[-1]
    assert {"eval/pairs/image_retrieval_recall@1", "eval/pairs/text_retrieval_recall@5"} <= set(
        pairs
    )
    train_steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5]  # evaluation records beside, not instead of, these


def test_eval_seconds_are_kept_apart_from_train_seconds(eval_run):
    run, out = eval_run
    assert "not counted as training time" in out
    state = checkpoint.load(run)
    records = [r for r in read_metrics(run / "metrics.jsonl") if "eval" in r]
    assert state["eval_seconds"] >= sum(r["eval_seconds"] for r in records) > 0
    train = [r for r in read_metrics(run / "metrics.jsonl") if "train_seconds" in r]
    assert state["train_seconds"] == pytest.approx(train[-1]["train_seconds"], abs=1e-3)


def test_last_step_zero_shot_equals_the_command(eval_run, demo_root, tmp_path):
    run, _ = eval_run
    last = _eval_records(run, "shape")[-1]
    ref = _standalone_zero_shot(demo_root, run, tmp_path / "zs.json")
    for metric in ("acc1", "acc5", "mean_per_class_recall"):
        assert last[f"eval/shape/{metric}"] == pytest.approx(ref[metric], abs=1e-6)


def test_yaml_eval_list_and_resume_changes_evaluations(demo_root, tmp_path):
    """`eval:` as a bare YAML list; --resume may change what is evaluated (eval folders past
    the resumed step are gone, those before kept)."""
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"eval": [_specs(demo_root)[0]]}))
    base = ["--data", demo_root / "train", "--out", run, *TINY, "--save-every", 2]
    code, _, err = run_cli("pretrain", "--config", config, *base, "--steps", 2)
    assert code == 0, err
    assert [r["step"] for r in _eval_records(run, "shape")] == [2]
    (run / "eval" / "step-3").mkdir()  # as a run killed past its checkpoint leaves it
    (run / "eval" / "step-3" / "shape.json").write_text("{}")
    code, _, err = run_cli(
        "pretrain", *base, "--steps", 3, "--resume", "--eval", _specs(demo_root)[1]
    )
    assert code == 0, err
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step-2", "step-3"]
    assert sorted(p.name for p in (run / "eval" / "step-3").iterdir()) == ["pairs.json"]
    assert [r["step"] for r in _eval_records(run, "pairs")] == [3]
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["specs"] == [
        _specs(demo_root)[1]
    ]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--eval", "zero-shot:demo:/no/such/dir"], "data folder not found: /no/such/dir"),
        (["--eval", "segment:demo:{root}"], "unknown task 'segment'"),
        (["--eval", "zero-shot:demo:{root}", "--keep-best", "eval/x/acc1"], "no evaluation"),
        (["--val-data", "{root}/eval", "--keep-best", "val/acc1"], "no evaluation"),
        (["--keep-best", "val/loss"], "logged: nothing"),
        (["--eval", "zero-shot:demo:{root}", "--eval-every", 0], "--eval-every must be >= 1"),
        (["--val-data", "/no/such/shards"], "/no/such/shards"),
        (["--eval-every", 3], "nothing to evaluate"),
        (["--val-data", ""], "--val-data: name the held-out shards"),
    ],
)
def test_bad_eval_options_are_one_line_and_write_nothing(demo_root, tmp_path, extra, words):
    run = tmp_path / "run"
    extra = [str(a).replace("{root}", str(demo_root)) for a in extra]
    line = user_error(
        "pretrain", "--data", demo_root / "train", "--out", run, *TINY, "--steps", 2, *extra
    )
    assert words in line, line
    assert not run.exists()


def test_a_failing_evaluation_is_logged_and_training_finishes(demo_root, tmp_path):
    """A retrieval set and held-out data whose shard is damaged mid-run: an error record for
    each, the other evaluation goes on, and the run ends normally."""
    pairs = tmp_path / "pairs"
    shutil.copytree(demo_root / "eval", pairs)
    shard = sorted(pairs.glob("*.tar"))[0]
    run = tmp_path / "run"
    specs = ["--eval", f"bad=retrieval:{pairs}", "--eval", _specs(demo_root)[0]]
    specs += ["--val-data", pairs]
    args = ["--data", demo_root / "train", "--out", run, *TINY, "--steps", 2, *specs]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated after the check
    code, out, err = run_cli("pretrain", *args)
    assert code == 0, err
    bad = _eval_records(run, "bad")
    assert [r["step"] for r in bad] == [2] and "damaged" in bad[0]["error"]
    (val,) = _eval_records(run, "val")
    assert val["step"] == 2 and "damaged" in val["error"] and "val/loss" not in val
    assert "eval/shape/acc1" in _eval_records(run, "shape")[0]
    assert checkpoint.load(run)["step"] == 2


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_numbers(demo_root, tmp_path):
    """torchrun, 2 ranks: each embeds half of every set; the gathered numbers equal one
    process's stand-alone evaluation of the same checkpoint."""
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "clipkit", "pretrain", "--data", str(demo_root / "train"), "--out", str(run),
        *map(str, TINY), "--steps", "2", "--eval", _specs(demo_root)[0],
        "--val-data", str(demo_root / "eval"),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert checkpoint.load(run)["world_size"] == 2
    (record,) = _eval_records(run, "shape")
    ref = _standalone_zero_shot(demo_root, run, tmp_path / "zs.json")
    for metric in ("acc1", "acc5", "mean_per_class_recall"):
        assert record[f"eval/shape/{metric}"] == pytest.approx(ref[metric], abs=1e-6)
    (val,) = [r["val/loss"] for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r]
    assert val == pytest.approx(naive_val_loss(run, demo_root / "eval", 16), abs=1e-5)
