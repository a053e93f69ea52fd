"""Zero-shot classification (CLIP, Radford et al. 2021, arXiv 2103.00020, Sec. 3.1.4 prompt
ensembling): each class is the mean of its prompts' normalised text embeddings, renormalised;
an image is scored against every class by cosine similarity. Metrics follow CLIP_benchmark
(`clipkit.eval.metrics.classification_metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from clipkit.data.eval_sets import ClassificationSet, collate_labelled
from clipkit.eval import LoaderSettings
from clipkit.eval.embed import (
    EmbeddedPart,
    check_skipped,
    embed_loader,
    merge_parts,
    progress,
    share_loader,
    share_total,
)
from clipkit.eval.metrics import classification_metrics
from clipkit.eval.results import results_dict

# prompts of several classes share one text forward (open_clip batches 10 classes)
PROMPTS_PER_FORWARD = 256


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    show: bool = True,
) -> torch.Tensor:
    """(D, C) class embeddings: mean over templates of unit text features, renormalised. The
    prompts of as many classes as fit in PROMPTS_PER_FORWARD go through one forward: one class
    per forward left the text tower running tiny batches (2.5x slower with 2 templates)."""
    per_forward = max(1, PROMPTS_PER_FORWARD // max(len(templates), 1))
    groups = [classnames[i : i + per_forward] for i in range(0, len(classnames), per_forward)]
    columns = []
    bar = tqdm(total=len(classnames), desc="classes", unit="class", leave=False,
               dynamic_ncols=True, disable=not show)  # fmt: skip
    with bar:
        for group in groups:
            prompts = [t.format(c=name) for name in group for t in templates]
            features = model.encode_text(tokenizer(prompts).to(device)).float()  # (G*T, D)
            features = F.normalize(features, dim=-1).view(len(group), len(templates), -1)
            columns.append(F.normalize(features.mean(dim=1), dim=-1))  # (G, D)
            bar.update(len(group))
    return torch.cat(columns).T.contiguous().cpu()  # (D, C)


def embed_labelled(
    model: nn.Module,
    dataset,
    device: torch.device,
    reading: LoaderSettings,
    *,
    total: int | None,
    desc: str = "images",
    rank: int = 0,
    world: int = 1,
    show: bool = True,
) -> EmbeddedPart:
    """Unit image features and "label" rows of a labelled dataset (zero-shot and probes), of
    rank `rank`'s share of `world` (all of it by default), in the order one process reads it
    whatever the loader workers (the "order" rows say each row's place in the whole set)."""
    loader = share_loader(dataset, collate_labelled, reading, rank, world)
    count = share_total(total, rank, world)
    part = embed_loader(
        model,
        loader,
        device,
        fields=("label", "order"),
        bar=lambda batches: progress(batches, count, reading.batch_size, desc, show),
    )
    return merge_parts([part])


def zero_shot_record(
    loaded, data: ClassificationSet, classifier: torch.Tensor, part: EmbeddedPart, reading
) -> dict[str, Any]:
    """The results record from the class embeddings (D, C) and every image's features."""
    from clipkit.config import ConfigError

    targets = torch.tensor(part.rows["label"], dtype=torch.long)
    where = f"{data.root} ({data.split})"
    check_skipped(part.skipped, len(targets), reading.max_bad_fraction, where)
    if int(targets.max()) >= len(data.classnames) or int(targets.min()) < 0:
        raise ConfigError(
            f"{data.root}: labels go up to {int(targets.max())} but there are "
            f"{len(data.classnames)} class names"
        )
    logits = 100.0 * part.image_features @ classifier  # (N, C), 100 x cosine as CLIP_benchmark
    return results_dict(
        dataset=data.name,
        loaded=loaded,
        task="zeroshot_classification",
        metrics=classification_metrics(logits, targets),
        num_samples=len(targets),
        extra={
            "data_root": data.root,
            "split": data.split,
            "num_classes": len(data.classnames),
            "classnames": list(data.classnames),
            "templates": list(data.templates),
            "skipped_images": part.skipped.count,
            "seed": None,
        },
    )


def run_zero_shot(
    loaded,
    data: ClassificationSet,
    *,
    device: torch.device,
    reading: LoaderSettings = LoaderSettings(),
) -> dict[str, Any]:
    """Zero-shot metrics of `loaded` (a LoadedModel) on `data`, as a results record."""
    # (D, C) on the CPU, where encode_images returns the image features.
    classifier = zero_shot_classifier(
        loaded.model, loaded.tokenizer, data.classnames, data.templates, device
    )
    part = embed_labelled(loaded.model, data.dataset, device, reading, total=data.num_samples)
    return zero_shot_record(loaded, data, classifier, part, reading)
