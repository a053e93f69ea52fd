"""Batched, no-grad encoding of images and texts into L2-normalised features (float32, CPU)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from clipkit.data.eval_io import rank_share, tagged

log = logging.getLogger(__name__)


@dataclass
class SkipCounter:
    """Samples a loader dropped (undecodable images), with the first few names for the message."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, names: Sequence[str]) -> None:
        self.count += len(names)
        self.examples.extend(names[: max(0, 3 - len(self.examples))])

    def summary(self) -> str:
        return f"{self.count} unreadable image(s) skipped, e.g. {', '.join(self.examples)}"


def make_loader(dataset, batch_size: int, workers: int, collate_fn: Callable):
    """A DataLoader in dataset order; iterable datasets split their shards over the workers."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn,
        persistent_workers=False,
    )


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) unit-norm float32 on the CPU."""
    features = model.encode_image(images.to(device, non_blocking=True))
    return F.normalize(features.float(), dim=-1).cpu()


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    tokenizer: Callable,
    texts: Sequence[str],
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Captions -> (N, D) unit-norm float32 on the CPU, tokenised and encoded in batches."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


@dataclass
class EmbeddedPart:
    """What one process embedded of an evaluation set, row by row in the order it read them.

    `rows` holds the per-image values the caller asked for (e.g. "label"; "key", "captions",
    "source"), plus "order" when the dataset tags its items with their place in the whole set
    (a rank's share, `clipkit.eval.sharded`). With captions embedded too, `text_features` holds
    every row's captions in turn."""

    image_features: torch.Tensor  # (n, D)
    rows: dict[str, list]
    skipped: SkipCounter
    text_features: torch.Tensor | None = None  # (m, D), m = total captions of the n rows

    def __len__(self) -> int:
        return len(self.image_features)


def _values(batch_value) -> list:
    return batch_value.tolist() if isinstance(batch_value, torch.Tensor) else list(batch_value)


def embed_loader(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    fields: Sequence[str],
    bar: Callable[[Iterable], Iterable],
    tokenizer: Callable | None = None,
) -> EmbeddedPart:
    """Encode every decodable image of `loader` (and, given a `tokenizer`, every caption of a
    batch's "captions"), keeping the batch values named in `fields`; undecodable images are
    counted in `skipped` (the caller checks the counts: `check_skipped`)."""
    images, texts, skipped = [], [], SkipCounter()
    rows: dict[str, list] = {name: [] for name in fields}
    for batch in bar(loader):
        skipped.add(batch["bad"])
        if batch["image"] is None:
            continue
        images.append(encode_images(model, batch["image"], device))
        for name in fields:
            rows[name] += _values(batch[name])
        if tokenizer is not None:
            flat = [c for caps in batch["captions"] for c in caps]
            if flat:
                texts.append(encode_texts(model, tokenizer, flat, device))
    return EmbeddedPart(
        torch.cat(images) if images else torch.zeros(0, 0),
        rows,
        skipped,
        (torch.cat(texts) if texts else torch.zeros(0, 0)) if tokenizer is not None else None,
    )


def share_loader(dataset, collate: Callable, reading, rank: int = 0, world: int = 1):
    """A loader over a rank's share of an evaluation set (rank 0 of 1: all of it), each
    decodable item's place in the whole set collated as "order" (`clipkit.data.eval_io`)."""
    share = rank_share(dataset, rank, world)
    return make_loader(share, reading.batch_size, reading.workers, tagged(collate))


def share_total(num_samples: int | None, rank: int = 0, world: int = 1) -> int | None:
    """Images in a rank's share of a set of `num_samples` (None when unknown)."""
    return None if num_samples is None else len(range(rank, num_samples, world))


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


def progress(
    loader: Iterable, total_samples: int | None, batch_size: int, desc: str, show: bool = True
):
    """tqdm over batches (total known when the dataset size is); `show=False` hides it."""
    total = None if total_samples is None else -(-total_samples // batch_size)
    return tqdm(
        loader,
        total=total,
        desc=desc,
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=not show,
    )


def check_skipped(
    skipped: SkipCounter, seen: int, max_bad_fraction: float, where: str = "the data"
) -> None:
    """Warn about skipped images; stop when none were usable or too many were bad."""
    from clipkit.config import ConfigError

    if seen == 0 and skipped.count == 0:  # e.g. valid but empty tar shards
        raise ConfigError(f"no samples found in {where}; check the data root and split")
    if skipped.count == 0:
        return
    total = seen + skipped.count
    if seen == 0 or skipped.count / total > max_bad_fraction:
        raise ConfigError(
            f"{skipped.count} of {total} images could not be read (e.g. "
            f"{', '.join(skipped.examples)}); more than {max_bad_fraction:.0%}: check the data"
        )
    log.warning(skipped.summary())
