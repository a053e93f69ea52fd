"""A-CLIP / A-CLIP-eff / AttMask-high / FLIP through the real entry points: `clipkit pretrain`
(CLI, checkpoints, metrics, exact resume, 2-process gloo) and `clipkit inspect masks`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipkit import checkpoint
from clipkit.cli.main import cli
from clipkit.methods.ema import ema_momentum

ACLIP_FAMILY = ("aclip", "aclip-eff", "attmask-high")
TINY = [
    "--model", "test", "--image-size", "64", "--batch-size", "8", "--workers", "1",
    "--threads", "1", "--warmup", "1", "--log-every", "1",
]  # fmt: skip
SMALL_HEADS = ["--ssl-hidden-dim", "32", "--ssl-embed-dim", "16"]  # A-CLIP family settings


def pretrain(data: Path, out: Path, method: str, *extra: str):
    heads = SMALL_HEADS if method in ACLIP_FAMILY else []
    args = ["pretrain", "--data", str(data), "--out", str(out), "--method", method, *TINY, *heads]
    return CliRunner().invoke(cli, [*args, *extra], catch_exceptions=False)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def aclip_run(demo_root, tmp_path_factory):
    """An A-CLIP run of 4 steps with a checkpoint at step 2 (reused by the resume and inspect
    tests)."""
    run = tmp_path_factory.mktemp("aclip") / "A"
    result = pretrain(demo_root / "train", run, "aclip", "--steps", "4", "--save-every", "2")
    assert result.exit_code == 0, result.output
    return run


def check_teacher(state: dict, steps: int) -> None:
    """The EMA teacher is saved whole, is not the online tower, shares the frozen patch embedding,
    and carries the schedule position."""
    method_state, model = state["method_state"], state["model"]
    teacher = {
        k[len("teacher_visual.") :]: v
        for k, v in method_state.items()
        if k.startswith("teacher_visual.")
    }
    online = {k[len("visual.") :]: v for k, v in model.items() if k.startswith("visual.")}
    assert teacher.keys() == online.keys()
    assert torch.equal(teacher["conv1.weight"], online["conv1.weight"])  # frozen, EMA'd: equal
    assert not torch.equal(teacher["ln_post.weight"], online["ln_post.weight"])  # EMA lags
    assert int(method_state["ema_step"]) == steps
    assert float(method_state["ema_momentum_now"]) == pytest.approx(1.0)  # cosine end at last step


@pytest.mark.parametrize("method", ["aclip-eff", "attmask-high"])
def test_pretrain_aclip_variants_through_cli(demo_root, tmp_path, method):
    run = tmp_path / method
    result = pretrain(demo_root / "train", run, method, "--steps", "2")
    assert result.exit_code == 0, result.output
    state = checkpoint.load(run)
    assert state["config"]["method"]["name"] == method
    check_teacher(state, steps=2)
    assert state["method_state"]["simclr_head.0.weight"].shape == (32, 32)  # --ssl-hidden-dim 32
    first, last = records(run)
    assert first["ema_momentum"] == pytest.approx(0.996)  # the forward reports the momentum in use
    assert last["ema_momentum"] == pytest.approx(ema_momentum(1, 2, 0.996, 1.0))
    for key in ("clip_loss_view0", "clip_loss_view1", "simclr_loss", "byol_loss"):
        assert 0 < last[key] < 20
    assert last["loss"] == pytest.approx(
        last["clip_loss"] + last["simclr_loss"] + 2 * last["byol_loss"], rel=1e-5
    )


def test_pretrain_aclip_logs_every_part_and_saves_teacher(aclip_run):
    state = checkpoint.load(aclip_run)
    check_teacher(state, steps=4)
    assert sorted(p.name for p in (aclip_run / "checkpoints").glob("step-*.pt")) == [
        "step-2.pt",
        "step-4.pt",
    ]
    steps = [r["step"] for r in records(aclip_run)]
    assert steps == [1, 2, 3, 4]
    for r in records(aclip_run):
        assert {"simclr_loss", "byol_loss", "clip_loss", "ema_momentum"} <= r.keys()


def test_pretrain_flip_through_cli(demo_root, tmp_path):
    run = tmp_path / "flip"
    result = pretrain(demo_root / "train", run, "flip", "--steps", "2", "--mask-ratio", "0.75")
    assert result.exit_code == 0, result.output
    state = checkpoint.load(run)
    assert state["method_state"] == {}  # no teacher, no heads
    assert state["config"]["method"]["mask_ratio"] == 0.75
    last = records(run)[-1]
    assert last["loss"] == pytest.approx(last["clip_loss"])
    assert "simclr_loss" not in last


def resume_from_step_2(run_a: Path, run_b: Path, method: str, *extra: str):
    """Run B = run A's step-2 checkpoint (an interrupted run), continued with --resume to step 4."""
    (run_b / "checkpoints").mkdir(parents=True)
    shutil.copy(run_a / "config.yaml", run_b / "config.yaml")
    shutil.copy(run_a / "checkpoints" / "step-2.pt", run_b / "checkpoints" / "latest.pt")
    data = Path(checkpoint.load(run_a)["config"]["data"]["data"])
    result = pretrain(data, run_b, method, "--steps", "4", "--resume", *extra)
    assert result.exit_code == 0, result.output


def differences(a, b, path="") -> list[str]:
    """Paths where two checkpoint trees differ (tensors compared bit-exactly)."""
    if isinstance(a, dict):
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    if isinstance(a, torch.Tensor):
        return [] if torch.equal(a, b) else [path]
    return [] if a == b else [path]


def comparable(state: dict) -> dict:
    # wall-clock training time is the one field a resumed run may not repeat exactly
    state = {k: v for k, v in state.items() if k != "train_seconds"}
    state["config"]["run"].pop("out")
    return state


def test_resume_restores_teacher_and_whole_state_exactly(aclip_run, tmp_path):
    run_b = tmp_path / "B"
    resume_from_step_2(aclip_run, run_b, "aclip")
    a, b = comparable(checkpoint.load(aclip_run)), comparable(checkpoint.load(run_b))
    teacher = [k for k in a["method_state"] if k.startswith("teacher_visual.")]
    assert teacher and all(torch.equal(a["method_state"][k], b["method_state"][k]) for k in teacher)
    # Everything else too: model, heads, optimizer moments, data position, step, RNG state.
    assert differences(a, b) == []


def test_resume_restores_the_global_rng(demo_root, tmp_path):
    run_a, run_b = tmp_path / "A", tmp_path / "B"
    result = pretrain(demo_root / "train", run_a, "flip", "--steps", "4", "--save-every", "2")
    assert result.exit_code == 0, result.output
    resume_from_step_2(run_a, run_b, "flip")
    assert differences(comparable(checkpoint.load(run_a)), comparable(checkpoint.load(run_b))) == []


def test_two_process_gloo_run(demo_root, tmp_path):
    """torchrun with 2 CPU ranks; clip weight 0 leaves the text tower unused, which DDP only
    accepts because the method sets `has_unused_parameters` (the harder case for DDP: with the
    CLIP loss on, every parameter gets a gradient)."""
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "clipkit", "pretrain", "--data", str(demo_root / "train"), "--out", str(run),
        "--method", "aclip", "--steps", "2", "--clip-weight", "0", *TINY, *SMALL_HEADS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = checkpoint.load(run)
    assert state["world_size"] == 2 and state["samples_seen"] == 2 * 2 * 8
    check_teacher(state, steps=2)
    last = records(run)[-1]
    assert "clip_loss" not in last
    assert {"simclr_loss", "byol_loss"} <= last.keys()


def test_inspect_masks_writes_png(aclip_run, demo_root, tmp_path):
    out = tmp_path / "pics" / "masks.png"
    args = ["inspect", "masks", "--checkpoint", str(aclip_run), "--data", str(demo_root / "eval")]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--n", "3"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as png:
        # 3 rows (samples) x 3 columns (teacher + 2 views) of 2.2-inch panels at 110 dpi
        assert png.format == "PNG" and png.size == (726, 726)
        assert len(png.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 100
    assert [p.name for p in out.parent.iterdir()] == ["masks.png"]  # no temp file left


def test_inspect_online_weights_score_with_the_online_tower(aclip_run):
    from clipkit.methods.aclip_viz import load_aclip_method

    ema, _ = load_aclip_method(aclip_run, "ema")
    online, _ = load_aclip_method(aclip_run, "online")
    saved = checkpoint.load(aclip_run)["method_state"]
    assert torch.equal(ema.teacher_visual.ln_post.weight, saved["teacher_visual.ln_post.weight"])
    for name, p in online.teacher_visual.state_dict().items():
        assert torch.equal(p, online.model.visual.state_dict()[name])


def test_inspect_masks_errors_are_one_line_exit_2(demo_root, tmp_path):
    flip_run = tmp_path / "flip"
    assert pretrain(demo_root / "train", flip_run, "flip", "--steps", "1").exit_code == 0
    runner = CliRunner()
    base = ["inspect", "masks", "--data", str(demo_root / "eval"), "--out", str(tmp_path / "m.png")]
    for ckpt, words in ((flip_run, "trained with method 'flip'"), (tmp_path / "nope", "not found")):
        result = runner.invoke(cli, [*base, "--checkpoint", str(ckpt)])
        assert result.exit_code == 2
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0]
        assert "Traceback" not in result.output
    assert not (tmp_path / "m.png").exists()
