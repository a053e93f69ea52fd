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
from clipkit.eval.embed import SkipCounter, check_skipped, encode_images, make_loader, progress
from clipkit.eval.metrics import classification_metrics
from clipkit.eval.results import results_dict


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
) -> torch.Tensor:
    """(D, C) class embeddings: mean over templates of unit text features, renormalised."""
    columns = []
    for name in tqdm(classnames, desc="classes", unit="class", leave=False, dynamic_ncols=True):
        tokens = tokenizer([t.format(c=name) for t in templates]).to(device)  # (T, L)
        features = F.normalize(model.encode_text(tokens).float(), dim=-1)  # (T, D)
        columns.append(F.normalize(features.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1).cpu()  # (D, C)


@torch.no_grad()
def image_logits(
    model, classifier, loader, device, total, batch_size, max_bad_fraction, where="the data"
):
    """(N, C) logits (100 x cosine, as CLIP_benchmark) and (N,) targets over the whole loader."""
    logits, targets, skipped = [], [], SkipCounter()
    for batch in progress(loader, total, batch_size, "images"):
        skipped.add(batch["bad"])
        if batch["image"] is None:
            continue
        features = encode_images(model, batch["image"], device)  # (B, D)
        logits.append(100.0 * features @ classifier)
        targets.append(batch["label"])
    n = sum(len(t) for t in targets)
    check_skipped(skipped, n, max_bad_fraction, where)
    return torch.cat(logits), torch.cat(targets), skipped


def run_zero_shot(
    loaded,
    data: ClassificationSet,
    *,
    device: torch.device,
    reading: LoaderSettings = LoaderSettings(),
) -> dict[str, Any]:
    """Zero-shot metrics of `loaded` (a LoadedModel) on `data`, as a results record."""
    from clipkit.config import ConfigError

    # (D, C) on the CPU, where encode_images returns the image features.
    classifier = zero_shot_classifier(
        loaded.model, loaded.tokenizer, data.classnames, data.templates, device
    )
    loader = make_loader(data.dataset, reading.batch_size, reading.workers, collate_labelled)
    logits, targets, skipped = image_logits(
        loaded.model,
        classifier,
        loader,
        device,
        data.num_samples,
        reading.batch_size,
        reading.max_bad_fraction,
        where=f"{data.root} ({data.split})",
    )
    if int(targets.max()) >= len(data.classnames) or int(targets.min()) < 0:
        raise ConfigError(
            f"{data.root}: labels go up to {int(targets.max())} but there are "
            f"{len(data.classnames)} class names"
        )
    metrics = classification_metrics(logits.cpu(), targets)
    return results_dict(
        dataset=data.name,
        loaded=loaded,
        task="zeroshot_classification",
        metrics=metrics,
        num_samples=len(targets),
        extra={
            "data_root": data.root,
            "split": data.split,
            "num_classes": len(data.classnames),
            "classnames": list(data.classnames),
            "templates": list(data.templates),
            "skipped_images": skipped.count,
            "seed": None,
        },
    )
