"""The run directory's layout, checkpoints read once (path + sha256 of the bytes read), and the
global batch / step count derived from DistInfo alone."""

import hashlib

import pytest
import torch

from clipkit import checkpoint, distributed
from clipkit.config import Config
from clipkit.distributed import DistInfo
from clipkit.methods.restore import load_method
from clipkit.run_dir import RunDir
from clipkit.train.run import total_steps


def test_layout_names_every_path_and_orders_steps_numerically(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest == tmp_path / "checkpoints" / "latest.pt"
    assert run.step_checkpoint(7) == tmp_path / "checkpoints" / "step-7.pt"
    assert (run.config.name, run.metrics.name, run.curves.name) == (
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
    )
    assert (run.tensorboard.name, run.lock.name) == ("tensorboard", ".lock")
    run.checkpoints.mkdir()
    for name in ("step-10.pt", "step-9.pt", "step-x.pt", "latest.pt", "step-2.pt"):
        (run.checkpoints / name).write_bytes(b"")
    assert [p.name for p in run.step_checkpoints()] == ["step-2.pt", "step-9.pt", "step-10.pt"]


def test_global_batch_counts_every_rank_and_accumulation():
    assert DistInfo().global_batch(32) == 32
    assert DistInfo(rank=1, world_size=4).global_batch(32, accum_steps=2) == 256


def test_samples_become_steps_of_the_global_batch_under_srun_without_world_size(monkeypatch):
    """srun sets SLURM_* but not WORLD_SIZE: --samples still counts the batches of both ranks."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist = distributed.env_info()
    assert dist == DistInfo(rank=1, local_rank=0, world_size=2)
    cfg = Config.from_dict({"data": {"batch_size": 10}, "run": {"samples": 1000}})
    assert total_steps(cfg, dist) == 50  # 1000 samples / (10 per rank x 2 ranks)
    assert total_steps(cfg, DistInfo()) == 100
    cfg.run.steps = 7
    assert total_steps(cfg, dist) == 7


def test_load_method_reports_the_sha256_of_the_file_it_read(tiny_checkpoint):
    file = tiny_checkpoint / "checkpoints" / "latest.pt"
    expected = hashlib.sha256(file.read_bytes()).hexdigest()
    loaded = load_method(tiny_checkpoint)
    assert loaded.path == file and loaded.sha256 == expected == checkpoint.sha256(file)
    assert "_path" not in loaded.checkpoint.state
    saved = checkpoint.load(file)["model"]
    for name, tensor in loaded.method.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert loaded.model() is loaded.method.model
    with pytest.raises(ValueError, match="keeps no EMA"):
        load_method(file, "ema").model()
