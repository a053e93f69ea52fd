"""`clipkit models [NAME]`: list known model names, or describe one without real weights."""

from __future__ import annotations

import click

from clipkit.cli.main import run_guarded


@click.command()
@click.argument("name", required=False)
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="Override the image size (ViTs: a multiple of the patch size).",
)
@click.option(
    "--context-length",
    type=click.IntRange(min=1),
    default=None,
    help="Override the context length.",
)
def models(name, image_size, context_length):
    """List model presets and open_clip names; with NAME, print its architecture and parameter
    counts (built on the meta device: no memory for weights)."""
    from clipkit.config import ModelConfig
    from clipkit.models import factory

    if name is None:
        for source, names in factory.list_models().items():
            click.echo(f"{source} ({len(names)}):")
            click.echo("  " + ", ".join(names))
        return
    cfg = ModelConfig(name=name, image_size=image_size, context_length=context_length)
    click.echo(run_guarded(factory.describe, cfg))
