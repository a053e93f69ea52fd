"""What a training checkpoint holds besides the method's weights, and the run directory's
upkeep: the generators' state, each rank's data position, the finiteness check before a save and
the pruning of old step checkpoints (`--keep-last`), and what one file holds
(`checkpoint_state`, which `Trainer.save` writes)."""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from clipkit.distributed import DistInfo
from clipkit.run_dir import RunDir
from clipkit.train.rng import rng_state


def checkpoint_state(trainer, positions: list[dict]) -> dict:
    """Everything a step checkpoint of `trainer` (a `clipkit.train.trainer.Trainer`) holds:
    config, weights, method and optimizer state, counters, every rank's data position, RNG
    states, and what the run's evaluations keep (the --keep-best tracker)."""
    t, state = trainer, trainer.state
    out = {
        "config": t.cfg.to_dict(),
        "model": t.method.model.state_dict(),
        "method_state": t.method.extra_state(),
        "optimizer": t.optimizer.state_dict(),
        "step": state.step,
        "samples_seen": state.samples_seen,
        "train_seconds": state.train_seconds,
        "eval_seconds": state.eval_seconds,
        "scaler_skipped_steps": state.scaler_skipped_steps,
        "data_position": positions,
        "world_size": t.dist.world_size,
        "workers": t.cfg.data.workers,
        "rng": rng_state(t.device),
    }
    if t.method.teacher is not None:  # its path and hash, never its weights
        out["teacher"] = t.method.teacher.record()
    if t.scaler.is_enabled():  # fp16: loss scale and growth tracker, for exact resume
        out["grad_scaler"] = t.scaler.state_dict()
    if t.evaluation is not None:
        out.update(t.evaluation.checkpoint_state())
    return out


def gather_positions(mine: dict, dist: DistInfo) -> list[dict]:
    """Every rank's data position, in rank order (a collective: every rank calls it)."""
    if not dist.enabled:
        return [mine]
    out: list = [None] * dist.world_size
    tdist.all_gather_object(out, mine)
    return out


def first_non_finite(module: nn.Module) -> str | None:
    """The name of a parameter holding inf or nan (None: all finite)."""
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def prune(layout: RunDir, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` step checkpoints (None: keep every one)."""
    if not keep_last:
        return
    for old in layout.step_checkpoints()[:-keep_last]:
        old.unlink(missing_ok=True)
