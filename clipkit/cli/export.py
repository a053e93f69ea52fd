"""`clipkit export`: a checkpoint becomes an open_clip local-dir folder."""

from __future__ import annotations

import json

import click

from clipkit.cli.main import run_guarded


@click.command()
@click.option("--checkpoint", "-c", required=True, help="clipkit checkpoint file or run dir.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write.")
@click.option(
    "--weights",
    type=click.Choice(["online", "ema", "ema-both"]),
    default="online",
    show_default=True,
    help="online: the trained weights; ema: A-CLIP's EMA image tower with the online text tower; "
    "ema-both: the EMA image and text towers (the official A-CLIP evaluation's pairing; the run "
    "must be trained with --ema-text).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --out folder that is an earlier export (no other folder is ever "
    "replaced).",
)
def export(checkpoint, out, weights, overwrite):
    """Export a checkpoint to an open_clip local-dir folder.

    \b
    The folder loads with:
      open_clip.create_model_and_transforms('local-dir:DIR')
    and with clipkit: --model local-dir:DIR.
    """
    from clipkit.export import export_open_clip

    summary = run_guarded(export_open_clip, checkpoint, out, weights=weights, overwrite=overwrite)
    click.echo(json.dumps(summary, indent=2))
