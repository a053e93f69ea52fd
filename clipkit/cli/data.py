"""`clipkit data ...`: the built-in demo dataset."""

from __future__ import annotations

import click

from clipkit.cli.main import run_guarded


@click.group()
def data():
    """Datasets: write the built-in demo data."""


@data.command()
@click.option("--out", required=True, type=str, help="Folder to write (train/, eval/, zeroshot/).")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--train-samples", default=5000, show_default=True, help="Training pairs.")
@click.option(
    "--eval-samples",
    default=500,
    show_default=True,
    help="Held-out pairs (attribute combinations never seen in training).",
)
@click.option(
    "--probe-train-samples",
    default=1000,
    show_default=True,
    help="Labelled training images of the zero-shot/probe sets.",
)
@click.option("--image-size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
def demo(out, seed, train_samples, eval_samples, probe_train_samples, image_size, shard_size):
    """Write synthetic captioned scenes (shapes, colours, counts, positions, backgrounds) as
    WebDataset shards, a held-out eval split, and CLIP_benchmark-style classification sets."""
    from clipkit.data.demo import write_demo

    summary = run_guarded(
        write_demo,
        out,
        seed=seed,
        train_samples=train_samples,
        eval_samples=eval_samples,
        probe_train_samples=probe_train_samples,
        image_size=image_size,
        shard_size=shard_size,
    )
    click.echo(f"demo data written to {out}")
    for key, value in summary.items():
        if isinstance(value, (int, str)):
            click.echo(f"  {key}: {value}")
