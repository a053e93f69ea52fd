"""Evaluation split over the ranks of a run: each rank embeds its share of a set (every
world-th sample, `clipkit.data.eval_io.rank_share`), the shares are gathered to every rank and
put back in the order one process reads the set (`clipkit.eval.embed.merge_parts`), so the
metrics come from exactly the features a single process computes.

Gathers go through `all_gather_object` (CPU tensors pickled): every rank calls it the same number
of times, whatever happened on it, so a failure on one rank never leaves the others waiting.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from clipkit.distributed import DistInfo


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """`obj` of every rank, rank order (just [obj] in a single process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def share_of(n: int, info: DistInfo) -> range:
    """The contiguous block of range(n) this rank works on (the blocks in rank order cover it),
    e.g. the zero-shot classes whose prompts it embeds."""
    per_rank = -(-n // info.world_size)
    start = min(n, info.rank * per_rank)
    return range(start, min(n, start + per_rank))


def join_columns(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' (D, k) column blocks, in rank order, as one (D, sum k); empty blocks skipped."""
    return torch.cat([b for b in blocks if b.numel()], dim=1)
