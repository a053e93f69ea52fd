"""Results JSON in CLIP_benchmark's shape (`dataset`, `model`, `pretrained`, `task`, `metrics`,
`language`) plus a `clipkit` block saying exactly what was measured, and readable tables."""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from clipkit.fileio import write_output_file

_PACKAGES = ("clipkit", "torch", "open_clip_torch", "faiss-gpu", "faiss-cpu", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# CLIP_benchmark dataset groups whose names hold a '/' (`vtab/cifar10`, `tfds/...`).
def results_dict(
    *,
    dataset: str,
    loaded,
    task: str,
    metrics: dict[str, Any],
    num_samples: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One result record; `loaded` is the `LoadedModel` that was evaluated."""
    block = {
        "checkpoint_sha256": loaded.sha256,
        "weights": loaded.weights,
        "method": loaded.method,
        **({"augment": loaded.augment} if loaded.augment else {}),
        "architecture": loaded.arch,
        "num_samples": num_samples,
        "versions": package_versions(),
        **(extra or {}),
    }
    return {
        "dataset": dataset,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": task,
        "metrics": metrics,
        "language": "en",
        "clipkit": block,
    }


def probe_record(
    loaded,
    train,
    test,
    *,
    metrics: dict[str, Any],
    counts: tuple[int, int],
    seed: int,
    method: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The record of a probe fitted on `train` and scored on `test` (linear or VQT), in
    CLIP_benchmark's `linear_probe` task: `counts` is (train, test) images; the clipkit block
    says where the data came from, then `extra` (a named `method` goes first, as probe_method)."""
    num_train, num_test = counts
    block = {"probe_method": method} if method else {}
    block |= {
        "data_root": train.root,
        "train_split": train.split,
        "test_split": test.split,
        "num_train": num_train,
        "num_classes": len(train.classnames),
        "classnames": list(train.classnames),
        "templates": None,
        "seed": seed,
        **extra,
    }
    return results_dict(
        dataset=train.name,
        loaded=loaded,
        task="linear_probe",
        metrics=metrics,
        num_samples=num_test,
        extra=block,
    )


def retrieval_record(loaded, pairs, emb, out: dict, ks: list, seed) -> dict[str, Any]:
    """The results JSON of `retrieve eval` for `pairs` (a PairedSet) embedded as `emb`
    (PairEmbeddings): `out` holds "metrics" (exact) and, when indexes were built,
    "index_metrics" and "indexes"."""
    return results_dict(
        dataset=pairs.name,
        loaded=loaded,
        task="zeroshot_retrieval",
        metrics=out["metrics"],
        num_samples=len(emb.keys),
        extra={
            "data_root": pairs.root,
            "num_captions": len(emb.text_features),
            "index_metrics": out.get("index_metrics"),
            "indexes": out.get("indexes"),
            "ks": ks,
            "templates": None,
            "seed": seed,
            "skipped_images": emb.skipped.count,
        },
    )


def _clean(obj: Any) -> Any:
    """NaN is not JSON: write null (CLIP_benchmark writes NaN, which strict parsers reject)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically (temp file + rename): a crash never leaves a half-written results file; an
    OSError is one line naming the path (OutputError)."""
    text = json.dumps(_clean(obj), indent=2, sort_keys=False, default=str) + "\n"
    write_output_file(Path(path), text.encode())


def table(rows: list[tuple[str, Any]], title: str | None = None) -> str:
    """Two aligned columns; floats in [0, 1] as percentages with two decimals."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{100 * v:6.2f}%"
        return str(v)

    width = max(len(name) for name, _ in rows)
    lines = [title] if title else []
    lines += [f"  {name:<{width}}  {fmt(value)}" for name, value in rows]
    return "\n".join(lines)
