"""What a training checkpoint holds besides the method's weights, and the run directory's
upkeep: the generators' state, each rank's data position, the finiteness check before a save and
the pruning of old step checkpoints (`--keep-last`). `Trainer.save` assembles the file."""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from clipkit.distributed import DistInfo
from clipkit.run_dir import RunDir


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
