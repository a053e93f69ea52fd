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

from clipkit.data.eval_sets import ClassificationSet, collate_labelled
from clipkit.eval import LoaderSettings
from clipkit.eval.embed import SkipCounter, check_skipped, encode_images, make_loader, progress
from clipkit.eval.probe import cached_features, few_shot_probe, train_linear_probe
from clipkit.eval.results import probe_record


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
    loader = make_loader(data.dataset, reading.batch_size, reading.workers, collate_labelled)
    feats, labels, skipped = [], [], SkipCounter()
    desc = f"features {data.split}"
    for batch in progress(loader, data.num_samples, reading.batch_size, desc):
        skipped.add(batch["bad"])
        if batch["image"] is not None:
            feats.append(encode_images(loaded.model, batch["image"], device))
            labels.append(batch["label"])
    where = f"{data.root} ({data.split})"
    check_skipped(skipped, sum(len(y) for y in labels), reading.max_bad_fraction, where)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


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


def _fit(train_x, train_y, test_x, test_y, shots, seeds, seed, val_fraction, probe_device):
    if shots:
        seed_list = list(range(seed, seed + seeds))
        fit = few_shot_probe(
            train_x,
            train_y,
            test_x,
            test_y,
            shots=shots,
            seeds=seed_list,
            val_fraction=val_fraction,
            device=probe_device,
        )
        metrics = {k: v for k, v in fit.items() if k.startswith("lp_")}
        details = {
            "fewshot_k": shots,
            "seeds": seed_list,
            "weight_decays": [r["best_weight_decay"] for r in fit["per_seed"]],
        }
    else:
        fit = train_linear_probe(
            train_x,
            train_y,
            test_x,
            test_y,
            seed=seed,
            val_fraction=val_fraction,
            device=probe_device,
        )
        metrics = {k: v for k, v in fit.items() if k.startswith("lp_")}
        details = {
            "weight_decay": fit["best_weight_decay"],
            "val_acc1": fit["val_acc1"],
            "sweep": fit["sweep"],
            "seeds": [seed],
        }
    return metrics, details


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
    train_x, train_y = split_features(loaded, train, cache_dir, device, reading)
    test_x, test_y = split_features(loaded, test, cache_dir, device, reading)
    probe_device = "cuda" if device.type == "cuda" else "cpu"
    with _few_threads(probe_device, train_x.size):
        metrics, details = _fit(
            train_x, train_y, test_x, test_y, shots, seeds, seed, val_fraction, probe_device
        )
    return probe_record(
        loaded,
        train,
        test,
        metrics=metrics,
        counts=(len(train_y), len(test_y)),
        seed=seed,
        val_fraction=val_fraction,
        cache_dir=str(cache_dir) if cache_dir else None,
        **details,
    )
