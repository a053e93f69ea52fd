"""`clipkit probe` as a library call: frozen image features of the train and test splits
(cached on disk, keyed by model hash + data + transform), then `clipkit.eval.probe`'s
weight-decay-swept logistic regression, full or few-shot."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipkit.data.eval_sets import ClassificationSet
from clipkit.eval import LoaderSettings
from clipkit.eval.embed import EmbeddedPart, check_skipped
from clipkit.eval.probe import cached_features, few_shot_probe, train_linear_probe
from clipkit.eval.results import probe_record
from clipkit.eval.zero_shot import embed_labelled


def default_cache_dir() -> Path:
    """$CLIPKIT_CACHE, else $XDG_CACHE_HOME/clipkit, else ~/.cache/clipkit; features/ inside."""
    if os.environ.get("CLIPKIT_CACHE"):
        return Path(os.environ["CLIPKIT_CACHE"]) / "features"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clipkit" / "features"


def extract_features(
    loaded, data: ClassificationSet, device, reading: LoaderSettings
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) unit-norm image features and (N,) labels of one split."""
    part = embed_labelled(
        loaded.model,
        data.dataset,
        device,
        reading,
        total=data.num_samples,
        desc=f"features {data.split}",
    )
    return labelled_arrays(part, data, reading)


def labelled_arrays(
    part: EmbeddedPart, data: ClassificationSet, reading: LoaderSettings
) -> tuple[np.ndarray, np.ndarray]:
    """A split's embedded part as (features, labels) arrays, once its skipped images pass."""
    where = f"{data.root} ({data.split})"
    check_skipped(part.skipped, len(part), reading.max_bad_fraction, where)
    return part.image_features.numpy(), np.asarray(part.rows["label"], dtype=np.int64)


def split_features(
    loaded, data: ClassificationSet, cache_dir: Path | None, device, reading: LoaderSettings
):
    """Features of one split, from the cache when the model, data and transform are unchanged."""
    if cache_dir is None:
        return extract_features(loaded, data, device, reading)
    key = {
        "model_sha256": loaded.sha256 or f"random:{loaded.name}",
        "weights": loaded.weights,
        "arch": loaded.arch,
        "dataset": data.name,
        "root": str(Path(data.root).resolve()),
        "split": data.split,
        "files": data.fingerprint,
        "transform": repr(loaded.preprocess),
        "rows": "read order",  # rows in the order one process reads the set, whatever --workers
    }
    return cached_features(cache_dir, key, lambda: extract_features(loaded, data, device, reading))


@contextlib.contextmanager
def _few_threads(device: str, size: int):
    """One CPU thread for small probes: L-BFGS on a few thousand numbers is dominated by thread
    synchronisation (25 s with 2 busy threads vs 0.5 s with one, for 96 x 32 features)."""
    if device != "cpu" or size > 4_000_000:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(train_xy, test_xy, shots, seeds, seed, val_fraction, probe_device, fit_settings):
    """(metrics, details) of a full or few-shot probe; `fit_settings` go to every fit."""
    common = {"val_fraction": val_fraction, "device": probe_device, **fit_settings}
    if shots:
        seed_list = list(range(seed, seed + seeds))
        fit = few_shot_probe(*train_xy, *test_xy, shots=shots, seeds=seed_list, **common)
        details = {
            "fewshot_k": shots,
            "seeds": seed_list,
            "weight_decays": [r["best_weight_decay"] for r in fit["per_seed"]],
        }
    else:
        fit = train_linear_probe(*train_xy, *test_xy, seed=seed, **common)
        details = {
            "weight_decay": fit["best_weight_decay"],
            "val_acc1": fit["val_acc1"],
            "sweep": fit["sweep"],
            "seeds": [seed],
        }
    metrics = {k: v for k, v in fit.items() if k.startswith("lp_")}
    return metrics, details


def probe_from_features(
    loaded,
    train: ClassificationSet,
    test: ClassificationSet,
    train_xy: tuple[np.ndarray, np.ndarray],
    test_xy: tuple[np.ndarray, np.ndarray],
    *,
    device: torch.device,
    shots: int | None = None,
    seeds: int = 3,
    seed: int = 0,
    val_fraction: float = 0.2,
    fit_settings: dict[str, Any] | None = None,
    **record_extra: Any,
) -> dict[str, Any]:
    """Fit and score the probe on the two splits' (features, labels); the results record.
    `fit_settings` (wd_grid, max_iter, refine_steps) override `train_linear_probe`'s defaults
    and are recorded as `probe_fit`."""
    probe_device = "cuda" if device.type == "cuda" else "cpu"
    with _few_threads(probe_device, train_xy[0].size):
        metrics, details = _fit(
            train_xy, test_xy, shots, seeds, seed, val_fraction, probe_device, fit_settings or {}
        )
    if fit_settings:
        details["probe_fit"] = dict(fit_settings)
    return probe_record(
        loaded,
        train,
        test,
        metrics=metrics,
        counts=(len(train_xy[1]), len(test_xy[1])),
        seed=seed,
        val_fraction=val_fraction,
        **record_extra,
        **details,
    )


def run_probe(
    loaded,
    train: ClassificationSet,
    test: ClassificationSet,
    *,
    device: torch.device,
    reading: LoaderSettings = LoaderSettings(),
    cache_dir: Path | None = None,
    shots: int | None = None,
    seeds: int = 3,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> dict[str, Any]:
    """Linear-probe metrics (`lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall`) as a record."""
    train_xy = split_features(loaded, train, cache_dir, device, reading)
    test_xy = split_features(loaded, test, cache_dir, device, reading)
    return probe_from_features(
        loaded,
        train,
        test,
        train_xy,
        test_xy,
        device=device,
        shots=shots,
        seeds=seeds,
        seed=seed,
        val_fraction=val_fraction,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
