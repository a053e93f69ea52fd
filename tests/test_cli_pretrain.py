"""`clipkit pretrain` through the CLI: training, checkpoints, resume, and user errors."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from clipkit import checkpoint
from clipkit.cli.main import cli
from clipkit.config import Config, OptimConfig
from clipkit.models import factory
from clipkit.train.optim import lr_at

BASE = ["--model", "test", "--batch-size", "32", "--workers", "1", "--threads", "1"]


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root):
    run = tmp_path_factory.mktemp("cli") / "run"
    res = run_cli(
        "pretrain",
        "--data",
        demo_root / "train",
        "--out",
        run,
        *BASE,
        "--steps",
        40,
        "--lr",
        "2e-3",
        "--warmup",
        4,
        "--log-every",
        4,
        "--save-every",
        20,
    )
    assert res.exit_code == 0, res.output + str(res.exception)
    return run, res


def test_pretrain_trains_and_writes_everything(trained):
    run, res = trained
    assert "checkpoint:" in res.output and "curves:" in res.output
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
        "checkpoints/latest.pt",
        "checkpoints/step-20.pt",
        "checkpoints/step-40.pt",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    recs = metrics(run)
    assert [r["step"] for r in recs] == list(range(4, 41, 4))
    for key in ("samples_seen", "loss", "lr", "samples_per_s", "data_wait_frac"):
        assert key in recs[0]
    first = sum(r["loss"] for r in recs[:2]) / 2
    last = sum(r["loss"] for r in recs[-2:]) / 2
    assert last < first - 0.2, (first, last)
    assert recs[-1]["samples_seen"] == 40 * 32


def test_checkpoint_is_self_describing_and_reloads_identically(trained):
    run, _ = trained
    state = checkpoint.load(run)
    assert state["step"] == 40 and state["format_version"] == 1
    cfg = Config.from_dict(state["config"])
    model = factory.build_from_arch(cfg.model.arch)
    model.load_state_dict(state["model"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key])
    step40 = torch.load(run / "checkpoints" / "step-40.pt", weights_only=True)
    assert all(torch.equal(step40["model"][k], v) for k, v in state["model"].items())
    assert model.logit_scale.exp().item() <= 100.0 + 1e-4


def test_resume_continues_at_step_lr_and_samples(tmp_path, demo_root):
    run = tmp_path / "run"
    common = [
        "--data",
        demo_root / "train",
        "--out",
        run,
        *BASE,
        "--lr",
        "1e-3",
        "--warmup",
        2,
        "--log-every",
        1,
        "--save-every",
        3,
    ]
    assert run_cli("pretrain", *common, "--steps", 3).exit_code == 0
    res = run_cli("pretrain", *common, "--steps", 6, "--resume")
    assert res.exit_code == 0, res.output
    recs = metrics(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["samples_seen"] for r in recs] == [32 * s for s in range(1, 7)]
    cfg = OptimConfig(lr=1e-3, warmup=2)
    for r in recs[3:]:  # lr logged at step s was set for update s-1 of the 6-step schedule
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 6, cfg), rel=1e-9)
    saved = checkpoint.load(run)
    assert saved["step"] == 6
    # training time accumulates across the resume (never restarts from zero)
    seconds = [r["train_seconds"] for r in recs]
    assert all(b > a > 0 for a, b in itertools.pairwise(seconds)), seconds
    assert saved["train_seconds"] == pytest.approx(seconds[-1], abs=1e-3)


def _assert_user_error(res, needle):
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in res.output
    assert needle in err, err


def test_user_errors_exit_2_with_one_line(tmp_path, demo_root):
    data = str(demo_root / "train")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: [unclosed\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("optim:\n  learning_rate: 1\n")
    (tmp_path / "empty").mkdir()
    existing = tmp_path / "existing"
    (existing).mkdir()
    (existing / "config.yaml").write_text("run: {}\n")
    (existing / "checkpoints").mkdir()  # a run dir without a checkpoint may be started again
    (existing / "checkpoints" / "latest.pt").write_bytes(b"")
    cases = [
        (["--data", tmp_path / "missing", "--steps", 1], "no shard matches"),
        (["--data", tmp_path / "empty", "--steps", 1], "no *.tar shards"),
        (["--data", tmp_path / "x-{000..003}.tar", "--steps", 1], "no shard matches"),
        (["--data", data, "--steps", 1, "--model", "nope-net"], "unknown model 'nope-net'"),
        (["--data", data, "--steps", 1, "--method", "magic"], "unknown method 'magic'"),
        (["--data", data, "--steps", 1, "--config", bad_yaml], "not valid YAML"),
        (["--data", data, "--steps", 1, "--config", tmp_path / "no.yaml"], "config file not found"),
        (["--data", data, "--steps", 1, "--config", unknown_key], "unknown option 'optim."),
        (["--data", data, "--steps", 1, "--samples", 10], "exactly one of --steps or --samples"),
        (["--data", data], "exactly one of --steps or --samples"),
        (["--data", data, "--steps", 1, "--batch-size", 0], "--batch-size must be >= 1"),
        (["--data", data, "--steps", 1, "--lr", -1], "--lr must be > 0"),
        (["--data", data, "--steps", 1, "--workers", 9], "at least one shard"),
        (["--data", data, "--steps", 1, "--pretrained", tmp_path / "w.pt"], "not found"),
        (["--data", data, "--steps", 1, "--precision", "fp8"], "Invalid value"),
        (["--data", data, "--steps", 1, "--bogus"], "No such option"),
        (["--data", data, "--steps", 1, "--resume"], "no checkpoint"),
    ]
    for args, needle in cases:
        out = tmp_path / "out"
        res = run_cli("pretrain", "--out", out, "--model", "test", "--workers", 1, *args)
        _assert_user_error(res, needle)
        assert not out.exists(), f"{args} wrote {out}"
    res = run_cli("pretrain", "--out", existing, "--data", data, "--steps", 1, "--model", "test")
    _assert_user_error(res, "already holds a run")


def test_yaml_config_and_flags_precedence(tmp_path, demo_root):
    from clipkit.cli.pretrain import resolve_config

    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 0.01\n  warmup: 7\nmodel:\n  name: tiny\n")
    cfg = resolve_config(str(f), False, {"optim": {"lr": 0.5}, "run": {"out": "x"}})
    assert cfg.optim.lr == 0.5 and cfg.optim.warmup == 7 and cfg.model.name == "tiny"


def test_help_is_instant_and_complete():
    res = run_cli("--help")
    assert res.exit_code == 0
    for cmd in ("pretrain", "zero-shot", "retrieve", "probe", "data", "models"):
        assert cmd in res.output
    res = run_cli("pretrain", "--help")
    for flag in (
        "--data",
        "--out",
        "--model",
        "--method",
        "--pretrained",
        "--batch-size",
        "--steps",
        "--samples",
        "--lr",
        "--warmup",
        "--weight-decay",
        "--workers",
        "--seed",
        "--device",
        "--precision",
        "--save-every",
        "--resume",
        "--config",
    ):
        assert flag in res.output, flag


def test_models_command(tmp_path):
    res = run_cli("models")
    assert res.exit_code == 0 and "tiny" in res.output and "ViT-B-32" in res.output
    res = run_cli("models", "tiny")
    assert res.exit_code == 0 and "7,962,625" in res.output
    _assert_user_error(run_cli("models", "nope-net"), "unknown model")


def test_json_config_and_pretrained_weights(tmp_path, demo_root):
    arch = factory.resolve_arch(factory.ModelConfig(name="test"))
    cfg_file = tmp_path / "my-model.json"
    cfg_file.write_text(json.dumps(arch["model_cfg"]))
    res = run_cli("models", cfg_file)
    assert res.exit_code == 0 and "total" in res.output
    torch.manual_seed(123)
    start = factory.build_from_arch(arch)
    weights = tmp_path / "weights.pt"
    torch.save(start.state_dict(), weights)
    run = tmp_path / "run"
    res = run_cli(
        "pretrain",
        "--data",
        demo_root / "train",
        "--out",
        run,
        "--model",
        cfg_file,
        "--pretrained",
        weights,
        "--steps",
        1,
        "--batch-size",
        8,
        "--workers",
        1,
        "--lr",
        "1e-12",
        "--warmup",
        0,
        "--grad-clip",
        "1e-12",
    )
    assert res.exit_code == 0, res.output
    trained = checkpoint.load(run)["model"]
    # one step at lr ~0 leaves the pretrained weights (to float precision)
    for k, v in start.state_dict().items():
        torch.testing.assert_close(trained[k], v, atol=1e-6, rtol=0)
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    res = run_cli(
        "pretrain",
        "--data",
        demo_root / "train",
        "--out",
        tmp_path / "r2",
        "--model",
        cfg_file,
        "--pretrained",
        wrong,
        "--steps",
        1,
    )
    _assert_user_error(res, "do not fit this model")


@pytest.mark.parametrize(
    "extra",
    [
        ["--resampled"],
        ["--accum-steps", 2],
        ["--grad-checkpointing"],
        ["--schedule", "constant", "--samples", 64],
    ],
)
def test_training_options(tmp_path, demo_root, extra):
    run = tmp_path / "run"
    steps = [] if "--samples" in extra else ["--steps", 2]
    res = run_cli(
        "pretrain",
        "--data",
        demo_root / "train",
        "--out",
        run,
        "--model",
        "test",
        "--batch-size",
        16,
        "--workers",
        1,
        "--threads",
        1,
        "--log-every",
        1,
        *steps,
        *extra,
    )
    assert res.exit_code == 0, res.output
    state = checkpoint.load(run)
    accum = 2 if "--accum-steps" in extra else 1
    assert state["step"] == (4 if "--samples" in extra else 2)
    assert state["samples_seen"] == state["step"] * 16 * accum
    assert state["config"]["data"]["resampled"] == ("--resampled" in extra)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
