"""Evaluation split over the ranks of a run: each rank embeds its share of a set (every
world-th sample, `clipkit.data.eval_io.rank_share`), the shares are gathered to every rank and
put back in the order one process reads the set, so the metrics come from exactly the features a
single process computes.

Gathers go through `all_gather_object` (CPU tensors pickled): every rank calls it the same number
of times, whatever happened on it, so a failure on one rank never leaves the others waiting.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from clipkit.distributed import DistInfo
from clipkit.eval.embed import EmbeddedPart, SkipCounter


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


def merge_parts(parts: list[EmbeddedPart]) -> EmbeddedPart:
    """The ranks' parts as one, rows sorted by their "order" tags (captions follow their image)."""
    filled = [p for p in parts if len(p)]
    skipped = SkipCounter()
    for p in parts:
        skipped.add(p.skipped.examples)
        skipped.count += p.skipped.count - len(p.skipped.examples)
    if not filled:
        return EmbeddedPart(torch.zeros(0, 0), {k: [] for k in parts[0].rows}, skipped)
    rows = {name: [v for p in filled for v in p.rows[name]] for name in filled[0].rows}
    permutation = sorted(range(len(rows["order"])), key=rows["order"].__getitem__)
    images = torch.cat([p.image_features for p in filled])[permutation]
    merged = {name: [values[i] for i in permutation] for name, values in rows.items()}
    texts = None
    if filled[0].text_features is not None:
        texts = _text_rows(filled, rows["captions"], permutation)
    return EmbeddedPart(images, merged, skipped, texts)


def _text_rows(parts: list[EmbeddedPart], captions: list, permutation: list[int]):
    """Every caption row, grouped by image in the merged image order."""
    texts = [p.text_features for p in parts if len(p.text_features)]
    if not texts:
        return torch.zeros(0, 0)
    all_texts = torch.cat(texts)
    starts, at = [], 0
    for caps in captions:
        starts.append(at)
        at += len(caps)
    order = [r for i in permutation for r in range(starts[i], starts[i] + len(captions[i]))]
    return all_texts[order]
