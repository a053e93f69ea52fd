"""Runs that get killed, preempted or fed bad checkpoints lose nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipkit import checkpoint

pytestmark = pytest.mark.slow


def _cmd(data, out, steps, *extra):
    return [
        sys.executable,
        "-m",
        "clipkit",
        "pretrain",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "test",
        "--steps",
        str(steps),
        "--batch-size",
        "16",
        "--workers",
        "2",
        "--threads",
        "1",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--log-every",
        "1",
        "--shuffle-buffer",
        "50",
        *map(str, extra),
    ]


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_then_resume_is_bit_identical(tmp_path, demo_root):
    """FLIP with exact accumulation, the hardest case: the second pass replays FLIP's token draws,
    so resume must restore every RNG. Plain CLIP's SIGKILL resume is checked bit for bit by
    test_fp16_scaler (fp16) and test_val_best (fp32, with evaluations)."""
    data, extra = demo_root / "train", ["--method", "flip", "--accum-steps", 2]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(data, ref, 12, "--save-every", 5, *extra), check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(data, run, 12, "--save-every", 5, *extra),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    _wait_for(run / "checkpoints" / "latest.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = checkpoint.load(run)["step"]
    assert saved_step in (5, 10)
    subprocess.run(
        _cmd(data, run, 12, "--save-every", 5, "--resume", *extra), check=True, capture_output=True
    )
    want, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, 13))
    assert all(got[s] == want[s] for s in range(1, 13)), (want, got)  # bit-identical
    a, b = checkpoint.load(ref), checkpoint.load(run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sigterm_saves_and_exits_cleanly(tmp_path, demo_root):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(demo_root / "train", run, 100000, "--save-every", 100000),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(run / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"--resume" in out
    assert (run / "curves.png").is_file()
    state = checkpoint.load(run)
    assert 1 <= state["step"] < 100000


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    checkpoint.save({"config": {}, "step": 1}, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        checkpoint.save({"config": {}, "step": 2}, path)
    assert path.read_bytes() == before and checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_untrusted_or_corrupt_checkpoints_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "config": {}, "x": Evil()}, evil)
    with pytest.raises(checkpoint.CheckpointError, match="pickled objects"):
        checkpoint.load(evil)
    good = tmp_path / "good.pt"
    checkpoint.save({"config": {}, "model": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="not a clipkit checkpoint"):
        checkpoint.load(foreign)


def _all_bad_shard(path: Path, n: int = 40) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as tw:
        for i in range(n):
            tw.write({"__key__": f"bad{i:04d}", "jpg": b"garbage", "txt": b"caption"})


def test_stalled_worker_stops_with_a_clear_error(tmp_path):
    """A worker that skips bad samples forever (allowed by --max-bad-fraction 1) never yields."""
    folder = tmp_path / "shards"
    folder.mkdir()
    _all_bad_shard(folder / "a.tar")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipkit",
            "pretrain",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "run"),
            "--model",
            "test",
            "--steps",
            "3",
            "--workers",
            "1",
            "--train-num-samples",
            "40",
            "--batch-size",
            "8",
            "--stall-timeout",
            "4",
            "--max-bad-fraction",
            "1",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no batch for 4s from data worker 0") and "a.tar" in last


def test_too_much_bad_data_stops_the_run(tmp_path, demo_root):
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(demo_root / "train", folder)
    for i in range(4):
        _all_bad_shard(folder / f"zz-bad-{i}.tar", n=128)
    (folder / "sizes.json").unlink()
    res = subprocess.run(
        _cmd(
            folder,
            tmp_path / "run",
            50,
            "--train-num-samples",
            1024,
            "--log-every",
            2,
            "--shuffle-buffer",
            10,
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "--max-bad-fraction" in last and "undecodable_image" in last and "zz-bad-" in last


def test_dying_rank_does_not_hang_the_other(tmp_path, demo_root):
    """One rank's data is all bad and it exits; the other rank must not wait forever."""
    import shutil

    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(demo_root / "train" / "shard-000000.tar", folder / "a.tar")
    _all_bad_shard(folder / "b.tar")
    t0 = time.time()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "clipkit",
            "pretrain",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "run"),
            "--model",
            "test",
            "--steps",
            "20",
            "--workers",
            "1",
            "--batch-size",
            "8",
            "--train-num-samples",
            "160",
            "--stall-timeout",
            "5",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode != 0
    assert time.time() - t0 < 150
    assert "no usable samples: 100% undecodable_image" in res.stderr


def test_data_check_counts_and_writes_sizes(tmp_path, demo_root):
    import shutil

    from click.testing import CliRunner

    from clipkit.cli.main import cli

    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(demo_root / "train" / "shard-000000.tar", folder / "a.tar")
    _all_bad_shard(folder / "b.tar", n=7)
    res = CliRunner().invoke(cli, ["data", "check", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["samples"] == 128 and report["bad_by_reason"] == {"undecodable_image": 7}
    assert json.loads((folder / "sizes.json").read_text()) == {"a.tar": 128, "b.tar": 0}


def test_non_finite_loss_is_skipped_then_stops(tmp_path, demo_root, monkeypatch):
    from clipkit.config import Config
    from clipkit.methods.clip import CLIPMethod
    from clipkit.train.run import pretrain
    from clipkit.train.trainer import TrainingError

    real = CLIPMethod.forward
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        loss, parts = real(self, batch)
        bad = calls["n"] in (2, 3) or calls["n"] >= 6
        return (loss * float("nan"), parts) if bad else (loss, parts)

    monkeypatch.setattr(CLIPMethod, "forward", flaky)
    cfg = Config.from_dict(
        {
            "data": {"data": str(demo_root / "train"), "batch_size": 8, "workers": 0},
            "model": {"name": "test"},
            "run": {"out": str(tmp_path / "run"), "steps": 20, "save_every": 2, "threads": 1},
        }
    )
    # calls 1, 4, 5 update (steps 1-3); 2 and 3 are skipped; calls 6-10 are 5 in a row
    with pytest.raises(TrainingError, match="non-finite for 5 steps in a row at step 3"):
        pretrain(cfg)
    state = checkpoint.load(tmp_path / "run")
    assert state["step"] == 2  # the last save before the failure stays
    assert all(torch.isfinite(v).all() for v in state["model"].values())
