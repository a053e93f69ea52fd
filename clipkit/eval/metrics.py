"""Evaluation metrics with CLIP_benchmark's definitions (LAION-AI/CLIP_benchmark 1.6.2).

- Classification (`metrics/zeroshot_classification.py`): top-1/top-5 accuracy from
  `torch.topk` over the logits, top-5 only with >= 5 classes (else NaN), and mean per-class
  recall = sklearn's `balanced_accuracy_score(target, argmax)`: the mean, over the classes that
  occur in `target`, of that class's recall (classes only ever predicted are ignored).
- Retrieval (`metrics/zeroshot_retrieval.py`): with scores = text @ image.T,
  `image_retrieval_recall@k` = fraction of texts whose image is among the top-k images;
  `text_retrieval_recall@k` = fraction of images with at least one of their captions among the
  top-k texts (an image without captions counts as a miss, as CLIP_benchmark's 0/0 > 0 does).
  The score matrix is built `chunk_size` rows at a time, so memory is O(chunk_size * N), never
  N_txt x N_img, and each chunk gets one `torch.topk(max(ks))` sliced for every k where
  CLIP_benchmark calls `topk(k)` once per k; the sets are the same, ties included, and the float32
  mean is the same.
  Where CLIP_benchmark raises for k > N, k is clipped to N (recall 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def topk_accuracies(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """Fraction of rows whose target is among the k largest logits, for each k.

    Like CLIP_benchmark, one `topk(max(ks))` call is sliced for every k, so ties resolve the same.
    """
    top = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices  # (N, max k)
    correct = top == targets.view(-1, 1)
    return [correct[:, :k].sum().item() / len(targets) for k in ks]


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """sklearn's balanced accuracy: mean recall over the classes present in `targets`."""
    classes, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    correct = torch.zeros(len(classes), dtype=torch.float64)
    correct.index_add_(0, inverse, (predictions == targets).to(torch.float64))
    return float((correct / counts.to(torch.float64)).mean())


def classification_metrics(logits: Any, targets: Any) -> dict[str, float]:
    """`acc1`, `acc5` (NaN with < 5 classes) and `mean_per_class_recall` of logits (N, C)."""
    logits, targets = _as_tensor(logits).float().cpu(), _as_tensor(targets).long().cpu()
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits (N, C) and targets (N,), got {logits.shape}, {targets.shape}"
        )
    if len(targets) == 0:
        raise ValueError("no examples to score")
    if logits.shape[1] >= 5:
        acc1, acc5 = topk_accuracies(logits, targets, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracies(logits, targets, (1,)), float("nan")
    return {
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), targets),
    }


def _image_hits(image_ids: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """(T, k) retrieved image ids per text -> (T,) bool: the text's own image was retrieved."""
    return (image_ids == text_to_image.view(-1, 1)).any(dim=1)


def _text_hits(text_ids: torch.Tensor, image_rows: torch.Tensor, text_to_image: torch.Tensor):
    """(I, k) retrieved text ids per image -> (I,) bool: any caption of that image retrieved.
    Negative ids (faiss' "no result") never match."""
    owner = torch.where(text_ids >= 0, text_to_image[text_ids.clamp(min=0)], -1)  # (I, k)
    return (owner == image_rows.view(-1, 1)).any(dim=1)


def _check_pairs(n_images: int, text_to_image: torch.Tensor) -> None:
    if text_to_image.ndim != 1 or len(text_to_image) == 0:
        raise ValueError("text_to_image must be a non-empty 1-D tensor of image indices")
    if text_to_image.min() < 0 or text_to_image.max() >= n_images:
        raise ValueError(f"text_to_image holds indices outside [0, {n_images})")


def _topk_per_k(scores: torch.Tensor, ks: Sequence[int], k_max: int) -> dict[int, torch.Tensor]:
    """Indices of the top min(k, k_max) scores per row, for each k, from one `topk(k_max)`.

    The first k of a top-`k_max` are the top-k set unless the k-th and (k+1)-th scores tie;
    only those rows (rare with float features) get their own `topk(k)`, so ties at the
    boundary resolve exactly as CLIP_benchmark's per-k calls resolve them.
    """
    values, indices = scores.topk(k_max, dim=1)  # (c, k_max), best first
    out = {}
    for k in ks:
        n = min(k, k_max)
        top = indices[:, :n]
        if n < k_max:
            tied = (values[:, n - 1] == values[:, n]).nonzero().flatten()
            if len(tied):
                top = top.clone()
                top[tied] = scores[tied].topk(n, dim=1).indices
        out[k] = top
    return out


def retrieval_recall(
    image_features: torch.Tensor | np.ndarray,
    text_features: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Exact image<->text recall@k over all pairs, scored `chunk_size` queries at a time.

    Args:
        image_features: (N_img, D), L2-normalised.
        text_features: (N_txt, D), L2-normalised.
        text_to_image: (N_txt,) long, the image each caption belongs to.
    """
    images, texts = _as_tensor(image_features).float(), _as_tensor(text_features).float()
    t2i = _as_tensor(text_to_image).long().to(images.device)
    _check_pairs(len(images), t2i)
    if len(texts) != len(t2i):
        raise ValueError(f"{len(texts)} text features but {len(t2i)} text_to_image entries")
    image_hits: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    text_hits: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    k_img, k_txt = min(max(ks), len(images)), min(max(ks), len(texts))
    for start in range(0, len(texts), chunk_size):
        scores = texts[start : start + chunk_size] @ images.T  # (c, N_img)
        owners = t2i[start : start + chunk_size]
        for k, top in _topk_per_k(scores, ks, k_img).items():
            image_hits[k].append(_image_hits(top, owners))
    for start in range(0, len(images), chunk_size):
        # Rows of CLIP_benchmark's scores.T: this chunk of images against every text, copied
        # to contiguous rows so topk scans memory in order.
        scores = (texts @ images[start : start + chunk_size].T).T.contiguous()  # (c, N_txt)
        rows = torch.arange(start, start + len(scores), device=images.device)
        for k, top in _topk_per_k(scores, ks, k_txt).items():
            text_hits[k].append(_text_hits(top, rows, t2i))
    return _recall_dict(image_hits, text_hits, ks)


def _recall_dict(image_hits: dict, text_hits: dict, ks: Sequence[int]) -> dict[str, float]:
    out = {}
    for k in ks:
        if image_hits.get(k):
            out[f"image_retrieval_recall@{k}"] = torch.cat(image_hits[k]).float().mean().item()
        if text_hits.get(k):
            out[f"text_retrieval_recall@{k}"] = torch.cat(text_hits[k]).float().mean().item()
    return out


def retrieval_recall_from_index(
    text_to_image: Any,
    ks: Sequence[int] = (1, 5, 10),
    *,
    image_ids: Any = None,
    text_ids: Any = None,
) -> dict[str, float]:
    """Recall@k as `retrieval_recall` defines it, from approximate search results.

    Args:
        text_to_image: (N_txt,) long, the image each caption belongs to.
        image_ids: (N_txt, >= max(ks)) ids from an image index searched with the text
            features (ids = image row numbers), or None to skip image retrieval.
        text_ids: (N_img, >= max(ks)) ids from a text index searched with the image features
            (ids = text row numbers), or None to skip text retrieval.
    Comparing with `retrieval_recall` on the same features shows what the index loses.
    """
    t2i = _as_tensor(text_to_image).long()
    image_hits: dict[int, list[torch.Tensor]] = {}
    text_hits: dict[int, list[torch.Tensor]] = {}
    if image_ids is not None:
        ids = _as_tensor(image_ids).long()
        _check_width(ids, len(t2i), ks, "image_ids")
        image_hits = {k: [_image_hits(ids[:, :k], t2i)] for k in ks}
    if text_ids is not None:
        ids = _as_tensor(text_ids).long()
        _check_width(ids, None, ks, "text_ids")
        rows = torch.arange(len(ids))
        _check_pairs(len(ids), t2i)
        text_hits = {k: [_text_hits(ids[:, :k], rows, t2i)] for k in ks}
    return _recall_dict(image_hits, text_hits, ks)


def _check_width(ids: torch.Tensor, n_rows: int | None, ks: Sequence[int], name: str) -> None:
    if ids.ndim != 2 or (n_rows is not None and len(ids) != n_rows):
        raise ValueError(f"{name} must be (N, k) with one row per query, got {tuple(ids.shape)}")
    if ids.shape[1] < max(ks):
        raise ValueError(f"{name} has {ids.shape[1]} neighbours per query, need max(ks)={max(ks)}")
