"""Run reports (issue 17): scalar names in TensorBoard and W&B, the evaluation panel of
curves.png, `--report-to` / `--wandb-project`, and W&B runs read back from their offline files."""

import importlib.util
import json
import logging
import struct
from pathlib import Path

import pytest
from cli_util import run, user_error

from clipkit import methods  # noqa: F401  (Config knows each method's settings from it)
from clipkit.cli.main import cli
from clipkit.config import Config, ConfigError, report_targets, validate
from clipkit.train.logging import (
    RunLog,
    curve_panels,
    main_metric,
    plot_curves,
    read_metrics,
    report_scalars,
)

TRAIN = {"step": 2, "samples_seen": 64, "train_seconds": 1.5, "loss": 3.25, "lr": 1e-4}
ZERO_SHOT = {
    "step": 2,
    "samples_seen": 64,
    "eval": "shapes",
    "weights": "online",
    "eval_seconds": 0.75,
    "eval/shapes/acc1": 0.5,
    "eval/shapes/acc5": 0.875,
    "eval/shapes/mean_per_class_recall": 0.4375,
}
ZERO_SHOT_EMA = {
    "step": 2,
    "samples_seen": 64,
    "eval": "shapes",
    "weights": "ema",
    "eval_seconds": 0.5,
    "eval/shapes/ema/acc1": 0.625,
}
RETRIEVAL = {
    "step": 2,
    "samples_seen": 64,
    "eval": "pairs",
    "weights": "online",
    "eval_seconds": 1.25,
    "eval/pairs/image_retrieval_recall@1": 0.25,
    "eval/pairs/text_retrieval_recall@1": 0.375,
    "eval/pairs/image_retrieval_recall@5": 0.75,
    "eval/pairs/text_retrieval_recall@5": 0.8125,
}
PROBE = {"step": 2, "eval": "probe", "eval_seconds": 2.0, "eval/probe/lp_acc1": 0.6875}
VAL = {"step": 2, "samples_seen": 64, "val/loss": 3.5, "eval_seconds": 0.25}
FAILED = {"step": 2, "samples_seen": 64, "eval": "broken", "weights": "online", "error": "bad tar"}


def later(record: dict, step: int, **values) -> dict:
    return {**record, "step": step, **values}


# ---- names -------------------------------------------------------------------------------------


def test_report_names_of_every_kind_of_record():
    assert report_scalars(TRAIN) == {
        "train/samples_seen": 64,
        "train/train_seconds": 1.5,
        "train/loss": 3.25,
        "train/lr": 1e-4,
    }
    assert report_scalars(ZERO_SHOT) == {
        "eval/shapes/acc1": 0.5,
        "eval/shapes/acc5": 0.875,
        "eval/shapes/mean_per_class_recall": 0.4375,
        "eval/shapes/seconds": 0.75,
    }
    assert report_scalars(ZERO_SHOT_EMA) == {
        "eval/shapes/ema/acc1": 0.625,
        "eval/shapes/ema/seconds": 0.5,
    }
    assert report_scalars(VAL) == {"val/loss": 3.5, "val/seconds": 0.25}
    # an undefined metric (acc5 with < 5 classes) is null in the record: no scalar
    undefined = report_scalars({**ZERO_SHOT, "eval/shapes/acc5": None})
    assert "eval/shapes/acc5" not in undefined and undefined["eval/shapes/acc1"] == 0.5
    assert report_scalars(FAILED) == {}
    # dicts and strings of a training record are not scalars
    assert report_scalars({"step": 1, "loss": 2.0, "bad_by_reason": {"decode": 1}}) == {
        "train/loss": 2.0
    }


def test_main_metric_of_each_evaluation():
    assert main_metric(ZERO_SHOT) == ("acc1", 0.5)
    assert main_metric(ZERO_SHOT_EMA) == ("acc1", 0.625)
    assert main_metric(RETRIEVAL) == ("R@1", (0.25 + 0.375) / 2)  # the smallest K
    assert main_metric(PROBE) == ("lp_acc1", 0.6875)


# ---- curves.png --------------------------------------------------------------------------------


def test_curves_without_evaluation_are_the_three_training_panels():
    records = [TRAIN, later(TRAIN, 4, loss=3.0)]
    panels = curve_panels(records)
    assert [title for title, _ in panels] == ["training loss", "learning rate", "samples/s"]
    assert panels[0][1] == [("training", [2, 4], [3.25, 3.0])]


def test_curves_gain_an_evaluation_panel_and_a_validation_line(tmp_path):
    records = [
        TRAIN,
        ZERO_SHOT,
        ZERO_SHOT_EMA,
        RETRIEVAL,
        VAL,
        FAILED,
        later(TRAIN, 4, loss=3.0),
        later(ZERO_SHOT, 4, **{"eval/shapes/acc1": 0.75}),
        later(VAL, 4, **{"val/loss": 3.125}),
    ]
    panels = dict(curve_panels(records))
    assert list(panels) == ["training loss", "learning rate", "samples/s", "evaluation"]
    assert panels["training loss"] == [
        ("training", [2, 4], [3.25, 3.0]),
        ("validation", [2, 4], [3.5, 3.125]),
    ]
    assert panels["evaluation"] == [
        ("shapes acc1", [2, 4], [0.5, 0.75]),
        ("shapes acc1 (ema)", [2], [0.625]),
        ("pairs R@1", [2], [0.3125]),
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_curves(metrics, tmp_path / "curves.png").stat().st_size > 0


# ---- TensorBoard -------------------------------------------------------------------------------


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_holds_evaluation_and_validation_scalars(tmp_path):
    runlog = RunLog(tmp_path, enabled=True)
    for record in (TRAIN, ZERO_SHOT, ZERO_SHOT_EMA, VAL, FAILED, later(TRAIN, 4, loss=3.0)):
        runlog.write(record)
    assert runlog.close() == tmp_path / "curves.png"
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    expected = {
        "train/loss": [(2, 3.25), (4, 3.0)],
        "eval/shapes/acc1": [(2, 0.5)],
        "eval/shapes/acc5": [(2, 0.875)],
        "eval/shapes/seconds": [(2, 0.75)],
        "eval/shapes/ema/acc1": [(2, 0.625)],
        "eval/shapes/ema/seconds": [(2, 0.5)],
        "val/loss": [(2, 3.5)],
        "val/seconds": [(2, 0.25)],
    }
    for tag, points in expected.items():
        assert scalars[tag] == points, tag  # all exact in float32
    assert not any("broken" in tag for tag in scalars)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 2, 2, 2, 2, 4]


def test_report_to_none_writes_no_events(tmp_path):
    cfg = Config.from_dict({"run": {"report_to": "none"}})
    runlog = RunLog(tmp_path, enabled=True, cfg=cfg)
    runlog.write(TRAIN)
    runlog.close()
    assert not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path / "metrics.jsonl") == [TRAIN]


# ---- --report-to -------------------------------------------------------------------------------


def test_report_targets():
    assert report_targets("tensorboard") == ("tensorboard",)
    assert report_targets("tensorboard, wandb") == ("tensorboard", "wandb")
    assert report_targets("none") == ()
    for bad in ("mlflow", "tensorboard,none"):
        with pytest.raises(ConfigError, match="--report-to: unknown report"):
            report_targets(bad)
    with pytest.raises(ConfigError, match="--report-to is empty"):
        report_targets(" , ")


def test_unknown_report_is_refused_before_training(tmp_path, demo_root):
    out = tmp_path / "run"
    line = user_error(
        "pretrain", "--data", demo_root / "train", "--out", out, "--steps", 1,
        "--report-to", "tensorboard,mlflow",
    )  # fmt: skip
    assert "unknown report 'mlflow'" in line
    assert not out.exists()


def test_wandb_without_its_package_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = Config.from_dict({"data": {"data": "x"}, "run": {"out": "r", "steps": 1}})
    cfg.run.report_to = "wandb"
    with pytest.raises(ConfigError, match="needs the wandb package: pip install wandb"):
        validate(cfg)
    cfg.run.report_to = "tensorboard"
    validate(cfg)


def test_help_explains_the_report_flags():
    from click.testing import CliRunner

    text = CliRunner().invoke(cli, ["pretrain", "--help"]).output
    assert "--report-to" in text and "--wandb-project" in text and "WANDB_MODE=offline" in text


# ---- W&B, read back from its offline run files ---------------------------------------------------

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed chunks
_HEADER = 7  # ':W&B' + magic (2 bytes) + version; every chunk: crc32, length (2 bytes), type
_FULL, _LAST = 1, 4


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunks += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_run(path: Path) -> dict:
    """run id, config and history rows ({key: value} with `_step`) of one offline run file."""
    out = {"config": {}, "history": [], "kinds": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        out["kinds"].append(kind)
        if kind in ("run", "config"):
            config = record.run.config if kind == "run" else record.config
            out["config"] |= {i.key: json.loads(i.value_json) for i in config.update}
        if kind == "run":
            out["id"] = record.run.run_id
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
    return out


def _key(item) -> str:
    """A history key: W&B keeps `train/loss` as a one-part nested key, an image's fields as
    `curves`, `size`, ... (joined here with '/')."""
    return item.key or "/".join(item.nested_key)


def offline_runs(run_dir: Path) -> list[dict]:
    """Every offline W&B run under run_dir, oldest first. W&B's service may still hold a finished
    run's last records in its write buffer: shut it down first (a process exit does the same)."""
    import wandb

    wandb.teardown()
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    return [wandb_run(p) for p in files]


@pytest.fixture
def fresh_wandb():
    """W&B reads its environment once per process (its setup singleton): tests that change it
    tear that down after themselves."""
    yield
    import wandb

    wandb.teardown()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_wandb_gets_every_record_under_its_report_name(tmp_path, wandb_offline):
    cfg = Config.from_dict({"run": {"report_to": "tensorboard,wandb", "wandb_project": "p"}})
    runlog = RunLog(tmp_path / "run", enabled=True, cfg=cfg)
    for record in (TRAIN, ZERO_SHOT, VAL, FAILED, later(TRAIN, 4, loss=3.0)):
        runlog.write(record)
    runlog.close()
    (run,) = offline_runs(tmp_path / "run")
    assert "run" in run["kinds"], run["kinds"]
    assert run["id"] == (tmp_path / "run" / "wandb_id").read_text().strip()
    assert run["config"]["run"]["wandb_project"] == "p"
    rows = {row["_step"]: row for row in run["history"]}
    step2 = report_scalars(TRAIN) | report_scalars(ZERO_SHOT) | report_scalars(VAL)
    assert {k: rows[2][k] for k in step2} == step2
    assert rows[4]["train/loss"] == 3.0
    # curves.png, at the last step, as drawn
    assert rows[4]["curves/_type"] == "image-file"
    assert rows[4]["curves/size"] == (tmp_path / "run" / "curves.png").stat().st_size
    assert not any("broken" in key for row in rows.values() for key in row)


def test_wandb_failure_leaves_training_alone(tmp_path, monkeypatch, caplog, fresh_wandb):
    """No server answers: one warning line, and the run's own logs are complete."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = Config.from_dict({"run": {"report_to": "wandb"}})
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        runlog = RunLog(tmp_path / "run", enabled=True, cfg=cfg)
        runlog.write(TRAIN)
        assert runlog.close() == tmp_path / "run" / "curves.png"
    warnings = [r.getMessage() for r in caplog.records if r.name == "clipkit"]
    assert len(warnings) == 1 and warnings[0].startswith("W&B could not start"), warnings
    assert "\n" not in warnings[0]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [TRAIN]


@pytest.mark.slow
def test_pretrain_reports_to_wandb_and_resume_continues_its_run(tmp_path, demo_root, wandb_offline):

    out = tmp_path / "run"
    common = [
        "pretrain", "--data", demo_root / "train", "--out", out, "--model", "test",
        "--batch-size", 16, "--workers", 1, "--threads", 1, "--device", "cpu",
        "--log-every", 1, "--save-every", 2, "--report-to", "tensorboard,wandb",
    ]  # fmt: skip
    code, stdout, stderr = run(*common, "--steps", 3)
    assert code == 0, stdout + stderr
    run_id = (out / "wandb_id").read_text().strip()
    code, stdout, stderr = run(*common, "--steps", 5, "--resume")
    assert code == 0, stdout + stderr
    assert (out / "wandb_id").read_text().strip() == run_id

    first, resumed = offline_runs(out)
    assert first["id"] == resumed["id"] == run_id
    assert first["config"]["run"]["steps"] == 3 and resumed["config"]["run"]["steps"] == 5
    assert first["config"]["model"]["name"] == "test"
    logged = {row["_step"]: row for run in (first, resumed) for row in run["history"]}
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for record in records:
        expected = report_scalars(record)
        assert {k: logged[record["step"]][k] for k in expected} == expected
    assert "curves/_type" in logged[3] and "curves/_type" in logged[5]


def test_a_run_restarted_from_step_0_gets_a_new_wandb_run(tmp_path):
    """A run that stopped before its first checkpoint starts again at step 0: its W&B run id is
    dropped with its metrics (W&B would ignore steps it has already seen)."""
    from clipkit.config import save_yaml
    from clipkit.run_dir import RunDir
    from clipkit.train.run import prepare_run_dir

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    cfg = Config.from_dict({"data": {"data": "x"}, "run": {"out": str(run.root), "steps": 1}})
    save_yaml(cfg, run.config)
    run.wandb_id.write_text("0123abcd\n")
    run.metrics.write_text(json.dumps(TRAIN) + "\n")
    prepare_run_dir(cfg, resume=False)
    assert not run.wandb_id.exists() and not run.metrics.exists()
    assert run.wandb_id.name == "wandb_id"
