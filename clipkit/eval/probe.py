"""Linear probes on frozen, cached features (CLIP, Radford et al. 2021, arXiv 2103.00020, App. A.3).

A multinomial logistic regression, fitted by full-batch L-BFGS in torch (CPU or GPU,
deterministic from a zero start), minimises

    mean cross-entropy + wd / 2 * ||W||^2      (bias not penalised)

which is scikit-learn's `LogisticRegression(C=1 / (wd * n))` objective for n training rows.
The weight decay is swept on a stratified validation split carved from train (or on a given
validation set); the best is refined on a finer log grid, then the probe is refitted and scored
on test with CLIP_benchmark's metric names (`lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipkit.eval.metrics import classification_metrics
from clipkit.fileio import atomic_write_bytes

log = logging.getLogger(__name__)
DEFAULT_WD_GRID = tuple(float(w) for w in np.logspace(-6, 0, 7))
_METRICS = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def stratified_split(labels: Any, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, val_rows): ~`val_fraction` of every class, >= 1 per class with >= 2 rows."""
    labels = _numpy(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val = (
            0 if val_fraction <= 0 else min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
        )
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def few_shot_indices(labels: Any, shots: int, seed: int) -> np.ndarray:
    """Sorted row indices of `shots` random rows of every class, the same for the same seed."""
    labels = _numpy(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < shots:
            raise ValueError(f"class {c} has {len(rows)} examples, fewer than shots={shots}")
        picked.append(rng.choice(rows, shots, replace=False))
    return np.sort(np.concatenate(picked))


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) minimising mean CE + weight_decay / 2 * ||W||^2."""
    weight = torch.zeros(
        x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True
    )
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def _prepare(x: Any, device: str, ref: tuple | None, normalize: bool, standardize: bool):
    """float32 features, L2-normalised per row, then z-scored with the train statistics `ref`."""
    x = torch.as_tensor(_numpy(x), dtype=torch.float32, device=device)
    if normalize:
        x = F.normalize(x, dim=-1)
    if standardize:
        mean, std = ref if ref is not None else (x.mean(0), x.std(0).clamp_min(1e-6))
        return (x - mean) / std, (mean, std)
    return x, None


def _val_acc(train, val, num_classes: int, wd: float, max_iter: int) -> float:
    weight, bias = fit_logistic_regression(*train, num_classes, wd, max_iter)
    return ((val[0] @ weight + bias).argmax(1) == val[1]).sum().item() / len(val[1])


def _sweep(train, val, num_classes, wd_grid, max_iter, refine_steps) -> dict[float, float]:
    """Validation top-1 for every grid value, then for halving log-steps around the best."""
    scores = {wd: _val_acc(train, val, num_classes, wd, max_iter) for wd in wd_grid}
    grid = sorted(wd_grid)
    step = math.log10(grid[1] / grid[0]) / 2 if len(grid) > 1 else 0.0
    for _ in range(refine_steps if step > 0 else 0):
        best = _best(scores)
        for wd in (best * 10**-step, best * 10**step):
            if wd not in scores:
                scores[wd] = _val_acc(train, val, num_classes, wd, max_iter)
        step /= 2
    return scores


def _carve_validation(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int):
    """((x, y) to fit, (x, y) to validate): a seeded stratified split of the training rows."""
    fit, val = (
        torch.as_tensor(rows, device=x.device)
        for rows in stratified_split(y.cpu().numpy(), val_fraction, seed)
    )
    if len(val) == 0:
        raise ValueError(
            "no validation rows: raise val_fraction, pass val_x/val_y, or give one weight decay"
        )
    return (x[fit], y[fit]), (x[val], y[val])


def _best(scores: dict[float, float]) -> float:
    return max(scores, key=lambda wd: (scores[wd], wd))  # ties: the stronger decay


def train_linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    wd_grid: Sequence[float] = DEFAULT_WD_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 300,
    refine_steps: int = 2,
    device: str = "cpu",
    normalize: bool = True,
    standardize: bool = True,
    val_x: Any = None,
    val_y: Any = None,
) -> dict[str, Any]:
    """Sweep the weight decay on validation, refit, score on test.

    Without `val_x`/`val_y`, a stratified `val_fraction` of train (seeded) is held out for the
    sweep and the final probe is fitted on all of train. With them, the sweep scores on that set
    and the final probe is fitted on train only (CLIP_benchmark's few-shot protocol).
    A single-value `wd_grid` skips the sweep.
    """
    train_y = torch.as_tensor(_numpy(train_y), dtype=torch.long, device=device)
    test_y = torch.as_tensor(_numpy(test_y), dtype=torch.long, device=device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    x, stats = _prepare(train_x, device, None, normalize, standardize)
    scores: dict[float, float] = {}
    if len(wd_grid) > 1:
        if val_x is not None:
            val_x = _prepare(val_x, device, stats, normalize, standardize)[0]
            val_y = torch.as_tensor(_numpy(val_y), dtype=torch.long, device=device)
            fit_rows, val = (x, train_y), (val_x, val_y)
        else:
            fit_rows, val = _carve_validation(x, train_y, val_fraction, seed)
        scores = _sweep(fit_rows, val, num_classes, wd_grid, max_iter, refine_steps)
    best_wd = _best(scores) if scores else float(wd_grid[0])
    weight, bias = fit_logistic_regression(x, train_y, num_classes, best_wd, max_iter)
    test = _prepare(test_x, device, stats, normalize, standardize)[0]
    metrics = classification_metrics((test @ weight + bias).cpu(), test_y.cpu())
    return {
        **{f"lp_{name}": value for name, value in metrics.items()},
        "weight_decay": best_wd,
        "best_weight_decay": best_wd,
        "val_acc1": scores.get(best_wd),
        "sweep": sorted(scores.items()),
        "seed": seed,
        "normalized": normalize,
        "standardized": standardize,
        "n_train": len(train_y),
        "max_iter": max_iter,
    }


def few_shot_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    shots: int,
    seeds: Sequence[int] = (0, 1, 2),
    val_fraction: float = 0.2,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """K-shot probes over several seeds: mean and sample std (ddof=1) of the lp_* metrics.

    Per seed: a stratified validation split of train (for the weight-decay sweep), then `shots`
    rows per class from the rest; the probe is fitted on those K-shot rows only.
    """
    train_x, train_y = _numpy(train_x), _numpy(train_y)
    runs = []
    for seed in seeds:
        rest, val = stratified_split(train_y, val_fraction, seed)
        pick = rest[few_shot_indices(train_y[rest], shots, seed)]
        runs.append(
            train_linear_probe(
                train_x[pick],
                train_y[pick],
                test_x,
                test_y,
                seed=seed,
                val_x=train_x[val],
                val_y=train_y[val],
                **probe_kwargs,
            )
        )
    out: dict[str, Any] = {"fewshot_k": shots, "seeds": list(seeds), "per_seed": runs}
    for name in _METRICS:
        values = np.array([run[name] for run in runs], dtype=np.float64)
        out[name] = float(values.mean())
        out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def cache_key(key_parts: dict[str, Any]) -> str:
    """sha256 of the key parts as canonical JSON (sorted keys; non-JSON values via str)."""
    blob = json.dumps(key_parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(features, labels) of a cache entry, or None (logged) when it is damaged: truncated,
    not an .npz, or not an (N, D) / (N,) pair. The caller recomputes and replaces it."""
    try:
        with np.load(path) as f:
            x, y = f["x"], f["y"]
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"shapes {x.shape} and {y.shape} do not pair up")
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        # The type alone: numpy's text for a non-.npz file advises loading pickles.
        log.warning("feature cache %s is damaged (%s); recomputing it", path, type(e).__name__)
        return None
    return x, y


def cached_features(
    cache_dir: str | os.PathLike,
    key_parts: dict[str, Any],
    compute_fn: Callable[[], tuple[Any, Any]],
) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) from `cache_dir/features-<sha256>.npz`, computed and stored on a miss.

    `key_parts` should name everything the features depend on (checkpoint sha256, dataset and
    split, transform, model tower); the file is written to a temp name and renamed, so a crash
    never leaves a partial cache entry, and an entry damaged otherwise is recomputed.
    """
    key = cache_key(key_parts)
    path = Path(cache_dir) / f"features-{key}.npz"
    if path.is_file():
        cached = _read_cache(path)
        if cached is not None:
            return cached
    x, y = (_numpy(a) for a in compute_fn())
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y, key=np.array(json.dumps(key_parts, sort_keys=True, default=str)))
    atomic_write_bytes(path, buf.getvalue())
    return x, y
