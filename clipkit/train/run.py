"""`clipkit pretrain` as a library call: config -> model, method, loader, trainer -> summary."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch

from clipkit import checkpoint
from clipkit.config import Config, ConfigError, save_yaml, validate
from clipkit.data.pipeline import DataPosition, build_loader
from clipkit.distributed import DistInfo
from clipkit.train.logging import log
from clipkit.train.trainer import Trainer, TrainingError, TrainState


def pick_device(name: str, dist: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.enabled:
        name = f"cuda:{dist.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def set_threads(cfg: Config, dist: DistInfo) -> None:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size if dist.enabled else 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def total_steps(cfg: Config) -> int:
    if cfg.run.steps:
        return cfg.run.steps
    dist_world = int(os.environ.get("WORLD_SIZE", 1))
    global_batch = cfg.data.batch_size * dist_world * cfg.optim.accum_steps
    return max(1, math.ceil(cfg.run.samples / global_batch))


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """Refuse to mix runs: an existing run dir needs --resume and a compatible config."""
    run_dir = Path(cfg.run.out)
    latest = run_dir / "checkpoints" / "latest.pt"
    if resume and not latest.is_file():
        raise ConfigError(f"--resume: no checkpoint at {latest}; start without --resume")
    if not resume and (latest.is_file() or (run_dir / "config.yaml").is_file()):
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    return run_dir


def pretrain(cfg: Config, resume: bool = False) -> dict:
    from clipkit import distributed, methods
    from clipkit.models import factory
    from clipkit.train.optim import build_optimizer

    validate(cfg)
    run_dir = prepare_run_dir(cfg, resume)
    dist = distributed.env_info()
    device = pick_device(cfg.run.device, dist)
    set_threads(cfg, dist)
    saved = checkpoint.load(run_dir, map_location="cpu") if resume else None
    if saved is not None:
        cfg.model.arch = saved["config"]["model"]["arch"]
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    model = factory.build(cfg.model)
    method = methods.build(cfg.method, model).to(device)
    tokenizer = factory.tokenizer(cfg.model.arch)
    dist = distributed.init(device)
    try:
        state = TrainState()
        optimizer = build_optimizer(method, cfg.optim, device)
        if saved is not None:
            state = _restore(saved, method, optimizer, dist, cfg.data.workers)
        loader, info = build_loader(
            cfg.data,
            cfg.model.arch,
            method.views,
            tokenizer,
            dist,
            cfg.run.seed,
            state.position,
            pin_memory=device.type == "cuda",
        )
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, run_dir / "config.yaml")
            log.info(
                "data: %d shard(s), %d samples/epoch, %d batches/epoch per rank",
                len(info.urls),
                info.num_samples,
                info.batches_per_epoch,
            )
        trainer = Trainer(
            cfg, method, optimizer, loader, total_steps(cfg), dist, device, run_dir, state
        )
        summary = trainer.fit()
    except torch.distributed.DistError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"rank {dist.rank} lost contact with another rank, which probably failed (see its "
            f"log): {first}"
        ) from None
    finally:
        distributed.cleanup()
    summary["run_dir"] = str(run_dir)
    summary["checkpoint"] = str(run_dir / "checkpoints" / "latest.pt")
    summary["curves"] = str(run_dir / "curves.png")
    return summary


def _restore(saved: dict, method, optimizer, dist: DistInfo, workers: int) -> TrainState:
    method.model.load_state_dict(saved["model"])
    method.load_extra_state(saved["method_state"])
    optimizer.load_state_dict(saved["optimizer"])
    positions = saved["data_position"]
    if saved.get("world_size", 1) != dist.world_size:
        log.warning(
            "resuming on %d rank(s) from a %d-rank run: the data stream restarts its "
            "epoch order (not an exact resume)",
            dist.world_size,
            saved.get("world_size"),
        )
        position = DataPosition()
    else:
        position = DataPosition.from_state(positions[dist.rank])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"], torch.cuda.current_device())
    return TrainState(
        step=saved["step"],
        samples_seen=saved["samples_seen"],
        position=position,
        train_seconds=saved.get("train_seconds", 0.0),
    )
