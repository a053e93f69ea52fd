"""Evaluation commands (zero-shot, retrieve, probe, export)."""

from __future__ import annotations

import click

from clipkit.cli.main import fail

_PENDING = "not yet available in this version (evaluation lands with issue #3)"


@click.command(name="zero-shot", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def zero_shot(args):
    """Zero-shot classification."""
    fail(f"zero-shot: {_PENDING}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def retrieve(args):
    """FAISS retrieval."""
    fail(f"retrieve: {_PENDING}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def probe(args):
    """Linear probe."""
    fail(f"probe: {_PENDING}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def export(args):
    """Export to open_clip."""
    fail(f"export: {_PENDING}")
