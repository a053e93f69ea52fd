"""`clipkit probe`: a linear probe on frozen image features, or a Visual Query Tuning probe.

The options come in groups, each parsed into a small dataclass: the dataset (shared with
zero-shot), the model and loader (shared with every evaluation command), the linear probe's
settings and the VQT settings."""

from __future__ import annotations

from dataclasses import dataclass

import click

from clipkit.cli.main import fail, run_guarded, stack_options
from clipkit.cli.options import (
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    OPEN_FRACTION,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    DatasetChoice,
    LoaderSettings,
    ModelSource,
    check_output,
    dataset_options,
    echo_metrics,
    load_for_eval,
    model_options,
    pick,
    run_options,
    write_output,
)


@dataclass(frozen=True)
class LinearSettings:
    """The linear probe: few-shot sampling, validation split and feature cache."""

    shots: int | None
    seeds: int
    val_fraction: float
    cache_dir: str | None
    no_cache: bool


@dataclass(frozen=True)
class VQTSettings:
    """--vqt-*: the Visual Query Tuning probe's training."""

    queries: int
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int


def split_options(fn):
    options = [
        click.option("--train-split", default="train", show_default=True, help="Split to fit on."),
        click.option("--test-split", default="test", show_default=True, help="Split to score on."),
    ]
    return stack_options(fn, options)


def linear_options(fn):
    options = [
        click.option("--shots", type=POSITIVE_INT, help="Few-shot: K training images per class."),
        click.option(
            "--seeds",
            default=3,
            type=POSITIVE_INT,
            show_default=True,
            help="Few-shot: number of seeds.",
        ),
        click.option(
            "--seed",
            default=0,
            type=NON_NEGATIVE_INT,
            show_default=True,
            help="Seed of the validation split.",
        ),
        click.option(
            "--val-fraction",
            default=0.2,
            type=OPEN_FRACTION,
            show_default=True,
            help="Share of train held out to sweep the weight decay, in (0, 1).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False),
            help="Feature cache (default $CLIPKIT_CACHE or ~/.cache/clipkit/features).",
        ),
        click.option("--no-cache", is_flag=True, help="Always recompute the features."),
    ]
    return stack_options(fn, options)


def vqt_options(fn):
    options = [
        click.option(
            "--method",
            "probe_method",
            type=click.Choice(["linear", "vqt"]),
            default="linear",
            show_default=True,
            help="linear: logistic regression on cached features; vqt: Visual Query Tuning "
            "(Tang et al., arXiv 2212.03220), learnable queries in every frozen ViT layer + a "
            "linear head.",
        ),
        click.option(
            "--vqt-queries",
            default=5,
            type=POSITIVE_INT,
            show_default=True,
            help="vqt: query tokens per layer.",
        ),
        click.option(
            "--vqt-epochs",
            default=10,
            type=POSITIVE_INT,
            show_default=True,
            help="vqt: passes over train.",
        ),
        click.option(
            "--vqt-lr",
            default=1e-3,
            type=POSITIVE_FLOAT,
            show_default=True,
            help="vqt: AdamW learning rate.",
        ),
        click.option(
            "--vqt-weight-decay",
            default=1e-4,
            type=NON_NEGATIVE_FLOAT,
            show_default=True,
            help="vqt: AdamW weight decay.",
        ),
        click.option(
            "--vqt-batch-size",
            default=32,
            type=POSITIVE_INT,
            show_default=True,
            help="vqt: training batch.",
        ),
    ]
    return stack_options(fn, options)


@click.command()
@dataset_options
@split_options
@linear_options
@vqt_options
@model_options
@run_options
def probe(train_split, test_split, seed, probe_method, output, **kwargs):
    """Linear probe on frozen image features (weight decay swept on a validation split), or a
    Visual Query Tuning probe (--method vqt) on the frozen ViT.

    \b
    Examples:
      clipkit probe demo --data-root demo_data --checkpoint runs/demo
      clipkit probe folder --data-root /data/pets --checkpoint runs/x --shots 16 --seeds 3
      clipkit probe demo --data-root demo_data --checkpoint runs/demo --method vqt --vqt-queries 5
    """
    chosen = pick(DatasetChoice, kwargs)
    source = pick(ModelSource, kwargs)
    loader = pick(LoaderSettings, kwargs)
    linear = pick(LinearSettings, kwargs)
    vqt = pick(VQTSettings, kwargs, prefix="vqt_")
    check_output(output, source, *chosen.local_inputs())
    loaded, dev = load_for_eval(source, loader.device)
    sets = [
        chosen.load(split, loaded.preprocess, strict_split=True)
        for split in (train_split, test_split)
    ]
    if probe_method == "vqt":
        if linear.shots is not None:
            fail("--shots is not supported with --method vqt")
        result, title = _run_vqt(loaded, sets, dev, vqt, loader, seed)
    else:
        result, title = _run_linear(loaded, sets, dev, linear, loader, seed)
    echo_metrics(result, title)
    write_output(output, result)


def _run_vqt(loaded, sets, dev, vqt: VQTSettings, loader: LoaderSettings, seed: int):
    """Train and score a VQT probe; returns (result, table title)."""
    from clipkit.eval.vqt import run_vqt_probe

    result = run_guarded(
        run_vqt_probe,
        loaded,
        *sets,
        device=dev,
        num_queries=vqt.queries,
        epochs=vqt.epochs,
        lr=vqt.lr,
        weight_decay=vqt.weight_decay,
        batch_size=vqt.batch_size,
        workers=loader.workers,
        seed=seed,
        max_bad_fraction=loader.max_bad_fraction,
    )
    c = result["clipkit"]
    title = (
        f"VQT probe {sets[0].name} ({vqt.queries} queries/layer, {vqt.epochs} epochs; "
        f"{c['num_train']} train / {c['num_samples']} test images, {c['num_classes']} classes)"
    )
    return result, title


def _run_linear(loaded, sets, dev, linear: LinearSettings, loader: LoaderSettings, seed: int):
    """Fit and score the linear probe on (cached) features; returns (result, table title)."""
    from clipkit.eval.linear_probe import run_probe

    cache = _feature_cache(linear)
    try:
        result = run_guarded(
            run_probe,
            loaded,
            *sets,
            device=dev,
            batch_size=loader.batch_size,
            workers=loader.workers,
            cache_dir=cache,
            shots=linear.shots,
            seeds=linear.seeds,
            seed=seed,
            val_fraction=linear.val_fraction,
            max_bad_fraction=loader.max_bad_fraction,
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
