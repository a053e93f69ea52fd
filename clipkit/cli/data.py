"""`clipkit data ...`: the built-in demo dataset."""

from __future__ import annotations

import click

from clipkit.cli.main import fail, run_guarded, stack_options
from clipkit.cli.options import option_rows


@click.group()
def data():
    """Datasets: write the built-in demo data; check shards before training."""


def _demo_options(fn):
    out = click.option(
        "--out",
        required=True,
        type=str,
        help="Folder to write (train/, eval/, zeroshot/): new, empty, or an earlier demo output "
        "(replaced); any other folder is refused, so a user's own shards are never deleted.",
    )
    rows = [
        ("--seed", 0, click.IntRange(min=0), "Same seed, same bytes."),
        ("--train-samples", 5000, None, "Training pairs."),
        (
            "--eval-samples",
            500,
            None,
            "Held-out pairs (attribute combinations never seen in training).",
        ),
        (
            "--probe-train-samples",
            1000,
            None,
            "Labelled training images of the zero-shot/probe sets.",
        ),
        ("--image-size", 64, None, "Image side in pixels."),
        ("--shard-size", 1000, None, "Samples per shard."),
    ]
    return stack_options(fn, [out, *option_rows(rows)])


@data.command()
@_demo_options
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


def _check_options(fn):
    rows = [
        ("--image-key", "jpg;jpeg;png;webp", None, "Image member extensions, ';'-separated."),
        ("--text-key", "txt", None, "Caption member extension."),
        (
            "--max-pixels",
            89_478_485,
            click.IntRange(min=1),
            "Images with more pixels count as bad (decompression-bomb guard).",
        ),
    ]
    flags = [
        click.option(
            "--no-sizes", is_flag=True, help="Do not write sizes.json next to the shards."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]
    return stack_options(fn, [click.argument("shards"), *option_rows(rows), *flags])


@data.command()
@_check_options
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
