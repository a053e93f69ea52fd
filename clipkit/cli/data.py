"""`clipkit data ...`: the built-in demo dataset."""

from __future__ import annotations

import click

from clipkit.cli.main import fail, run_guarded


@click.group()
def data():
    """Datasets: write the built-in demo data; check shards before training."""


@data.command()
@click.option(
    "--out",
    required=True,
    type=str,
    help="Folder to write (train/, eval/, zeroshot/): new, empty, or an earlier demo output "
    "(replaced); any other folder is refused, so a user's own shards are never deleted.",
)
@click.option(
    "--seed",
    default=0,
    type=click.IntRange(min=0),
    show_default=True,
    help="Same seed, same bytes.",
)
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


@data.command()
@click.argument("shards")
@click.option(
    "--image-key",
    default="jpg;jpeg;png;webp",
    show_default=True,
    help="Image member extensions, ';'-separated.",
)
@click.option("--text-key", default="txt", show_default=True, help="Caption member extension.")
@click.option(
    "--max-pixels",
    default=89_478_485,
    type=click.IntRange(min=1),
    show_default=True,
    help="Images with more pixels count as bad (decompression-bomb guard).",
)
@click.option("--no-sizes", is_flag=True, help="Do not write sizes.json next to the shards.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(shards, image_key, text_key, max_pixels, no_sizes, as_json):
    """Read every shard of SHARDS (a directory, brace pattern or '::'-joined list): count samples
    and bad samples by reason, summarise image sizes and caption lengths, and write sizes.json
    (samples per shard, what `clipkit pretrain` reads for the epoch length)."""
    import json

    from clipkit.data.check import check_shards, format_report
    from clipkit.data.sources import expand_sources

    urls = run_guarded(expand_sources, shards)
    report = check_shards(urls, image_key, text_key, max_pixels, write_sizes=not no_sizes)
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report))
    if report["samples"] == 0:
        fail(f"no usable samples in {len(urls)} shard(s) (see the report above)")
