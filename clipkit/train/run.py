"""`clipkit pretrain` as a library call: config -> model, method, loader, trainer -> summary."""

from __future__ import annotations

import errno
import math
import os
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from clipkit import checkpoint, distributed, methods
from clipkit.config import Config, ConfigError, load_yaml, save_yaml, validate
from clipkit.data.pipeline import DataPosition, build_loader
from clipkit.data.tokenize import build_tokenizer
from clipkit.devices import pick_device
from clipkit.distributed import DistInfo
from clipkit.losses import SIGLIP_INIT
from clipkit.methods import check_name, method_class
from clipkit.methods.base import Method
from clipkit.methods.restore import (
    LoadedMethod,
    load_method,
    restore_grad_scaler,
    restore_optimizer,
)
from clipkit.methods.teacher import Teacher, teacher_for
from clipkit.models import factory
from clipkit.run_dir import RunDir
from clipkit.train.accumulate import check_accum_mode
from clipkit.train.evaluation import (
    RunEvaluation,
    build_evaluation,
    check_eval_config,
    resume_evaluations,
)
from clipkit.train.logging import log
from clipkit.train.optim import build_optimizer, epoch_warmup
from clipkit.train.rng import set_rng_state
from clipkit.train.run_lock import RunLock
from clipkit.train.trainer import Trainer, TrainingError, TrainState


def set_threads(cfg: Config, dist: DistInfo) -> None:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size if dist.enabled else 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def total_steps(cfg: Config, dist: DistInfo) -> int:
    """--steps, or --samples over the global batch of every rank (not of this rank alone)."""
    if cfg.run.steps:
        return cfg.run.steps
    global_batch = dist.global_batch(cfg.data.batch_size, cfg.optim.accum_steps)
    return max(1, math.ceil(cfg.run.samples / global_batch))


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """Decide what this start does with the run directory (main rank, holding its lock).

    A checkpoint there: continue it with --resume, refuse without (two runs never mix). No
    checkpoint (a new directory, or a run that stopped before its first save): start at step 0,
    replacing the stopped run's logs; --resume on it says to start again instead. Temporary files
    a killed write left behind are removed either way.
    """
    run_dir = Path(cfg.run.out)
    layout = RunDir(run_dir)
    latest = layout.latest
    _remove_leftover_tmp(run_dir, layout.checkpoints)
    steps = layout.step_checkpoints()
    if resume and steps and not latest.is_file():  # killed between writing a step and linking
        log.warning("%s is missing; resuming from %s", latest, steps[-1].name)
        checkpoint.link_latest(steps[-1], latest)
    has_checkpoint = latest.is_file() or bool(steps)
    stopped_early = not has_checkpoint and _holds_run_config(run_dir)
    if resume and not has_checkpoint:
        if stopped_early:
            raise ConfigError(
                f"--resume: {run_dir} has no checkpoint (its run stopped before the first save); "
                "run the same command without --resume to start it again"
            )
        raise ConfigError(f"--resume: no checkpoint at {latest}; start without --resume")
    if not resume and has_checkpoint:
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if stopped_early:
        log.warning(
            "%s holds a run that stopped before its first checkpoint: starting it again at "
            "step 0 (its metrics.jsonl, tensorboard/ and curves.png are replaced)",
            run_dir,
        )
        for path in (layout.metrics, layout.curves, layout.wandb_id):  # a new W&B run too
            path.unlink(missing_ok=True)
        shutil.rmtree(layout.tensorboard, ignore_errors=True)
    return run_dir


def _holds_run_config(run_dir: Path) -> bool:
    """Whether run_dir/config.yaml is a clipkit run config; refuse any other config.yaml (the
    directory is not a run of ours, so nothing there is replaced)."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return False
    try:
        Config.from_dict(load_yaml(path))
    except ConfigError:
        raise ConfigError(
            f"{run_dir} holds a config.yaml that is not a clipkit run config; choose another --out"
        ) from None
    return True


def _remove_leftover_tmp(*folders: Path) -> None:
    """Delete `.NAME.tmp*` files of writes killed half-way (the run lock rules out a live one)."""
    for folder in folders:
        for tmp in folder.glob(".*.tmp*"):
            if tmp.is_file():
                log.info("removing %s, left by an interrupted write", tmp)
                tmp.unlink(missing_ok=True)


# errno values only a write produces; other errors count as write failures when they name a path
# inside the run directory.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _write_failure(e: OSError, run_dir: Path) -> str | None:
    """A failed write into the run directory as one line; None for any other OSError."""
    path = Path(e.filename) if isinstance(e.filename, (str, os.PathLike)) else None
    inside = path is not None and path.resolve().is_relative_to(run_dir.resolve())
    if e.errno not in _WRITE_ERRNOS and not inside:
        return None
    return (
        f"cannot write {path or run_dir}: {e.strerror or e}; the checkpoints already written "
        "are intact"
    )


def pretrain(cfg: Config, resume: bool = False) -> dict:
    validate(cfg)
    check_name(cfg.method.name)  # the config layer cannot see the registry; before any write
    check_accum_mode(method_class(cfg.method.name), cfg.optim.accum_steps, cfg.optim.accum_mode)
    method_class(cfg.method.name).check_objectives(cfg.method.loss, bool(cfg.method.distill_from))
    fit_model_to_loss(cfg)
    dist = distributed.env_info()
    student_arch = cfg.model.arch or factory.resolve_arch(cfg.model)
    teacher = teacher_for(cfg.method.distill_from, student_arch, pick_device(cfg.run.device, dist))
    # Opens every evaluation's data: a bad spec or layout is refused before anything is written.
    evaluation = build_evaluation(
        cfg, student_arch, method_class(cfg.method.name).has_ema, total_steps(cfg, dist), dist
    )
    # Only the main rank writes into the run directory, so only it takes the lock; it does so
    # before anything is written, which also proves the directory writable before any work.
    with RunLock(cfg.run.out) if dist.is_main else nullcontext():
        run_dir = prepare_run_dir(cfg, resume) if dist.is_main else Path(cfg.run.out)
        return _train(cfg, resume, run_dir, dist, teacher, evaluation)


def fit_model_to_loss(cfg: Config) -> None:
    """SigLIP trains a learnable logit bias: the model gets one, with the paper's start values
    (t' = log 10, b = -10) unless the model options set them."""
    if cfg.method.loss != "siglip":
        return
    if cfg.model.init_logit_scale is None:
        cfg.model.init_logit_scale = SIGLIP_INIT["logit_scale"]
    if cfg.model.init_logit_bias is None:
        cfg.model.init_logit_bias = SIGLIP_INIT["logit_bias"]


def _train(
    cfg: Config,
    resume: bool,
    run_dir: Path,
    dist: DistInfo,
    teacher: Teacher | None,
    evaluation: RunEvaluation | None,
) -> dict:
    layout = RunDir(run_dir)
    device = pick_device(cfg.run.device, dist)
    set_threads(cfg, dist)
    saved, method = _build_method(cfg, run_dir if resume else None, device)
    check_eval_config(cfg, method.has_ema)  # EMA weights: known per instance (A-CLIP's teacher)
    preprocess = factory.preprocess(cfg.model.arch)
    method.set_objectives(cfg.method.loss, teacher, cfg.method.distill_weight, preprocess)
    tokenizer = build_tokenizer(preprocess)
    dist = distributed.init(device)
    try:
        state = TrainState()
        shared = factory.shared_parameters(method.model, cfg.model.arch)
        optimizer = build_optimizer(method, cfg.optim, device, shared)
        if saved is not None:
            check_same_teacher(saved, teacher)
            state = _restore(saved, optimizer, dist, cfg.data.workers, device)
            resume_evaluations(run_dir, saved.checkpoint.state, evaluation, dist)
        loader, info = build_loader(
            cfg.data,
            preprocess,
            method.views,
            tokenizer,
            dist,
            cfg.run.seed,
            state.position,
            pin_memory=device.type == "cuda",
        )
        if cfg.optim.warmup_epochs is not None:  # needs the epoch size, known from the data
            global_batch = dist.global_batch(cfg.data.batch_size, cfg.optim.accum_steps)
            cfg.optim.warmup = epoch_warmup(cfg.optim, info.num_samples, global_batch)
        if dist.is_main:
            save_yaml(cfg, layout.config)
            log.info(
                "data: %d shard(s), %d samples/epoch, %d batches/epoch per rank",
                len(info.urls),
                info.num_samples,
                info.batches_per_epoch,
            )
        steps = total_steps(cfg, dist)
        trainer = Trainer(
            cfg, method, optimizer, loader, steps, dist, device, run_dir, state, evaluation
        )
        if saved is not None:
            restore_grad_scaler(saved.checkpoint, trainer.scaler)
        summary = trainer.fit()
    except torch.distributed.DistError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"rank {dist.rank} lost contact with another rank, which probably failed (see its "
            f"log): {first}"
        ) from None
    except OSError as e:
        message = _write_failure(e, run_dir)
        if message is None:
            raise
        raise TrainingError(message) from None
    finally:
        distributed.cleanup()
    summary["run_dir"] = str(run_dir)
    summary["checkpoint"] = str(layout.latest)
    summary["curves"] = str(layout.curves)
    return summary


def _build_method(
    cfg: Config, resume_from: Path | None, device: torch.device
) -> tuple[LoadedMethod | None, Method]:
    """The method to train, seeded; on resume rebuilt from the checkpoint (also returned)."""
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    if resume_from is None:
        return None, methods.build(cfg.method, factory.build(cfg.model)).to(device)
    saved = load_method(resume_from, run_config=cfg)
    return saved, saved.method.to(device)


def check_same_teacher(saved: LoadedMethod, teacher: Teacher | None) -> None:
    """A resumed run distils from the teacher it started with (the same bytes)."""
    recorded = saved.checkpoint.state.get("teacher")
    if teacher is not None and recorded and recorded["sha256"] != teacher.sha256:
        raise ConfigError(
            f"--distill-from {teacher.source}: the teacher's weights changed since the run "
            f"started (sha256 {recorded['sha256'][:12]}..., now {teacher.sha256[:12]}...); "
            "resume with the teacher the run was trained with"
        )


def _restore(
    loaded: LoadedMethod, optimizer, dist: DistInfo, workers: int, device: torch.device
) -> TrainState:
    """The optimizer, data position and RNG of a resumed run (its weights are in `loaded`)."""
    restore_optimizer(loaded.checkpoint, optimizer)
    saved = loaded.checkpoint.state
    positions = saved["data_position"]
    saved_workers = max(saved.get("workers", workers), 1)
    if saved.get("world_size", 1) != dist.world_size or saved_workers != max(workers, 1):
        # Each (rank, worker) reads its own share of the shards; a new split has no position.
        log.warning(
            "resuming with %d rank(s) x %d worker(s) a run of %d x %d: the data stream "
            "restarts its epoch order (not an exact resume)",
            dist.world_size,
            max(workers, 1),
            saved.get("world_size", 1),
            saved_workers,
        )
        position = DataPosition()
    else:
        position = DataPosition.from_state(positions[dist.rank])
    set_rng_state(saved["rng"], device)
    return TrainState(
        step=saved["step"],
        samples_seen=saved["samples_seen"],
        position=position,
        train_seconds=saved.get("train_seconds", 0.0),
        eval_seconds=saved.get("eval_seconds", 0.0),  # absent before in-training evaluation
        scaler_skipped_steps=saved.get("scaler_skipped_steps", 0),  # absent before fp16 scaling
    )
