"""Bad samples during training: counted on each rank, summed over ranks, and turned into the
message that stops a run when they exceed --max-bad-fraction."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from clipkit.distributed import DistInfo, all_reduce_mean

# Below this many samples seen, a few bad ones are too large a fraction to judge the data by.
MIN_SAMPLES_TO_JUDGE = 100


def bad_counts(bad: Counter, good_batches: int, batch_size: int, dist: DistInfo) -> tuple[int, int]:
    """(bad, bad + good) over all ranks."""
    n_bad = sum(bad.values())
    good = good_batches * batch_size
    t = torch.tensor([n_bad, n_bad + good], dtype=torch.float64)
    t = all_reduce_mean(t) * dist.world_size
    return int(t[0]), int(t[1])


def gather_bad(bad: Counter, bad_shards: Counter, dist: DistInfo) -> tuple[Counter, Counter]:
    """Bad-sample reasons and shards over all ranks (only when about to stop)."""
    mine = (dict(bad), dict(bad_shards))
    parts = [mine]
    if dist.enabled:
        import torch.distributed as tdist

        parts = [None] * dist.world_size
        tdist.all_gather_object(parts, mine)
    reasons, shards = Counter(), Counter()
    for r, s in parts:
        reasons.update(r)
        shards.update(s)
    return reasons, shards


def too_many_bad(
    n_bad: int, seen: int, limit: float, bad: Counter, bad_shards: Counter, dist: DistInfo
) -> str | None:
    """Why the run must stop (with the reasons and the worst shards), or None if it may go on."""
    if seen < MIN_SAMPLES_TO_JUDGE or n_bad / seen <= limit:
        return None
    reasons, shards = gather_bad(bad, bad_shards, dist)
    worst = ", ".join(f"{Path(s).name} ({n})" for s, n in shards.most_common(3))
    return (
        f"{n_bad} of {seen} samples were unusable ({n_bad / seen:.1%} > --max-bad-fraction "
        f"{limit:.1%}); reasons {dict(reasons)}; worst shards: {worst}"
    )
