"""`clipkit probe`: a linear probe on frozen image features, or a Visual Query Tuning probe.

The options come in groups, each parsed into a small dataclass: the dataset (shared with
zero-shot), the model and loader (shared with every evaluation command), the linear probe's
settings and the VQT settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from clipkit.cli import options
from clipkit.cli.main import fail, run_guarded, stack_options
from clipkit.eval import LoaderSettings

if TYPE_CHECKING:
    from clipkit.eval.vqt import VQTSettings


@dataclass(frozen=True)
class LinearSettings:
    """The linear probe: few-shot sampling, validation split and feature cache."""

    shots: int | None
    seeds: int
    val_fraction: float
    cache_dir: str | None
    no_cache: bool


def split_options(fn):
    rows = [
        ("--train-split", "train", None, "Split to fit on."),
        ("--test-split", "test", None, "Split to score on."),
    ]
    return stack_options(fn, options.option_rows(rows))


def linear_options(fn):
    rows = [
        ("--shots", None, options.POSITIVE_INT, "Few-shot: K training images per class."),
        ("--seeds", 3, options.POSITIVE_INT, "Few-shot: number of seeds."),
        ("--seed", 0, options.NON_NEGATIVE_INT, "Seed of the validation split."),
        (
            "--val-fraction",
            0.2,
            options.OPEN_FRACTION,
            "Share of train held out to sweep the weight decay, in (0, 1).",
        ),
        (
            "--cache-dir",
            None,
            click.Path(file_okay=False),
            "Feature cache (default $CLIPKIT_CACHE or ~/.cache/clipkit/features).",
        ),
    ]
    no_cache = click.option("--no-cache", is_flag=True, help="Always recompute the features.")
    return stack_options(fn, [*options.option_rows(rows), no_cache])


def vqt_options(fn):
    rows = [
        (
            ("--method", "probe_method"),
            "linear",
            click.Choice(["linear", "vqt"]),
            "linear: logistic regression on cached features; vqt: Visual Query Tuning "
            "(Tang et al., arXiv 2212.03220), learnable queries in every frozen ViT layer + a "
            "linear head.",
        ),
        ("--vqt-queries", 5, options.POSITIVE_INT, "vqt: query tokens per layer."),
        ("--vqt-epochs", 10, options.POSITIVE_INT, "vqt: passes over train."),
        ("--vqt-lr", 1e-3, options.POSITIVE_FLOAT, "vqt: AdamW learning rate."),
        ("--vqt-weight-decay", 1e-4, options.NON_NEGATIVE_FLOAT, "vqt: AdamW weight decay."),
        ("--vqt-batch-size", 32, options.POSITIVE_INT, "vqt: training batch."),
    ]
    return stack_options(fn, options.option_rows(rows))


@click.command()
@options.dataset_options
@split_options
@linear_options
@vqt_options
@options.model_options
@options.run_options
def probe(train_split, test_split, seed, probe_method, output, **kwargs):
    """Linear probe on frozen image features (weight decay swept on a validation split), or a
    Visual Query Tuning probe (--method vqt) on the frozen ViT.

    \b
    Examples:
      clipkit probe demo --data-root demo_data --checkpoint runs/demo
      clipkit probe folder --data-root /data/pets --checkpoint runs/x --shots 16 --seeds 3
      clipkit probe demo --data-root demo_data --checkpoint runs/demo --method vqt --vqt-queries 5
    """
    from clipkit.eval.vqt import VQTSettings

    linear = options.pick(LinearSettings, kwargs)
    vqt = options.pick(VQTSettings, kwargs, prefix="vqt_")
    chosen, reading, loaded, dev = options.load_for_dataset(kwargs, output)
    sets = [
        chosen.load(split, loaded.preprocess, strict_split=True)
        for split in (train_split, test_split)
    ]
    if probe_method == "vqt":
        if linear.shots is not None:
            fail("--shots is not supported with --method vqt")
        result, title = _run_vqt(loaded, sets, dev, vqt, reading, seed)
    else:
        result, title = _run_linear(loaded, sets, dev, linear, reading, seed)
    options.echo_metrics(result, title)
    options.write_output(output, result)


def _run_vqt(loaded, sets, dev, vqt: VQTSettings, reading: LoaderSettings, seed: int):
    """Train and score a VQT probe; returns (result, table title)."""
    from clipkit.eval.vqt import run_vqt_probe

    result = run_guarded(
        run_vqt_probe,
        loaded,
        *sets,
        device=dev,
        settings=vqt,
        workers=reading.workers,
        seed=seed,
        max_bad_fraction=reading.max_bad_fraction,
    )
    c = result["clipkit"]
    title = (
        f"VQT probe {sets[0].name} ({vqt.queries} queries/layer, {vqt.epochs} epochs; "
        f"{c['num_train']} train / {c['num_samples']} test images, {c['num_classes']} classes)"
    )
    return result, title


def _run_linear(loaded, sets, dev, linear: LinearSettings, reading: LoaderSettings, seed: int):
    """Fit and score the linear probe on (cached) features; returns (result, table title)."""
    from clipkit.eval.linear_probe import run_probe

    cache = _feature_cache(linear)
    try:
        result = run_guarded(
            run_probe,
            loaded,
            *sets,
            device=dev,
            reading=reading,
            cache_dir=cache,
            shots=linear.shots,
            seeds=linear.seeds,
            seed=seed,
            val_fraction=linear.val_fraction,
        )
    except ValueError as e:  # e.g. a class with fewer images than --shots
        fail(str(e))
    c = result["clipkit"]
    kind = f"{linear.shots}-shot x {linear.seeds} seeds" if linear.shots else "full"
    title = (
        f"linear probe {sets[0].name} ({kind}; {c['num_train']} train / "
        f"{c['num_samples']} test images, {c['num_classes']} classes)"
    )
    return result, title


def _feature_cache(linear: LinearSettings):
    """The feature cache folder (None with --no-cache), checked writable before any work."""
    from pathlib import Path

    from clipkit.eval.linear_probe import default_cache_dir
    from clipkit.fileio import check_writable

    if linear.no_cache:
        return None
    cache = Path(linear.cache_dir) if linear.cache_dir else default_cache_dir()
    run_guarded(check_writable, cache / "features.npz")  # a cache dir under a file...
    return cache
