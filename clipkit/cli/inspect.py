"""`clipkit inspect ...`: pictures of what a trained model does.

`masks`: for an A-CLIP-family checkpoint (arXiv 2212.08653 Sec. 3.2), the teacher view with its
[CLS]-attention map and each online view with the removed 2x2-patch blocks greyed out.
"""

from __future__ import annotations

import click

from clipkit.cli.main import run_guarded


@click.group(context_settings={"max_content_width": 100})
def inspect():
    """Pictures of what a model does (A-CLIP token masks)."""


@inspect.command(context_settings={"max_content_width": 100})
@click.option(
    "--checkpoint",
    "checkpoint_path",
    required=True,
    help="A-CLIP / A-CLIP-eff / AttMask-high checkpoint file, or a run directory (its latest.pt).",
)
@click.option(
    "--data",
    required=True,
    help="Shards to draw samples from (a directory of *.tar, a brace pattern, or '::'-joined).",
)
@click.option("--out", required=True, help="PNG file to write (written atomically).")
@click.option(
    "--n", default=4, type=click.IntRange(min=1), show_default=True, help="Samples (rows) to draw."
)
@click.option(
    "--weights",
    type=click.Choice(["online", "ema"]),
    default="ema",
    show_default=True,
    help="Which image tower scores the patches: the EMA teacher (what training used) or the "
    "online encoder.",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the view crops and colour draws."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def masks(checkpoint_path, data, out, n, weights, seed, device):
    """Draw teacher attention and the kept blocks of each view for a few samples.

    \b
    Example:
      clipkit inspect masks --checkpoint runs/aclip --data demo_data/eval --out masks.png
    """
    import torch

    from clipkit.eval.loading import pick_device
    from clipkit.methods.aclip_viz import inspect_masks

    dev = run_guarded(pick_device, device)
    with torch.no_grad():
        path = run_guarded(inspect_masks, checkpoint_path, data, out, n, weights, seed, dev)
    click.echo(f"masks: {path}")
