"""Picture of A-CLIP's token choice (arXiv 2212.08653, Fig. 1/3 style): per sample, the teacher
view with its [CLS]-attention heat map and the online views' boxes, then every online view with
the removed patches greyed out."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from clipkit.data.views import IMAGENET_MEAN, IMAGENET_STD

VIEW_COLOURS = ("tab:orange", "tab:cyan", "tab:green", "tab:pink")


def _to_rgb(image: torch.Tensor, mean, std) -> torch.Tensor:
    """(3, H, W) normalised -> (H, W, 3) in [0, 1]."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def _kept_pixels(keep_idx: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]):
    """(K,) kept patch indices -> (H, W) bool map of the kept pixels."""
    mask = torch.zeros(grid[0] * grid[1])
    mask[keep_idx.cpu()] = 1.0
    mask = mask.view(1, 1, *grid)
    return F.interpolate(mask, size=size, mode="nearest")[0, 0].bool()


def _draw_teacher(ax, rgb, attention, boxes) -> None:
    ax.imshow(rgb.numpy())
    height, width = rgb.shape[:2]
    if attention is not None:
        heat = attention.float().cpu()
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, extent=(0, width, height, 0))
    for v, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        colour = VIEW_COLOURS[v % len(VIEW_COLOURS)]
        ax.add_patch(
            Rectangle(
                (x0 * width, y0 * height),
                (x1 - x0) * width,
                (y1 - y0) * height,
                fill=False,
                edgecolor=colour,
                linewidth=2,
            )
        )
    ax.set_title("teacher + attention", fontsize=8)


@torch.no_grad()
def render_masks(
    method,
    batch: dict,
    out_png: str | Path,
    n: int = 4,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Path:
    """Draw the first `n` samples of an A-CLIP batch (`views`, `teacher_image`, `boxes`) and save a
    PNG. `method` is an `ACLIPMethod` (anything with `select_tokens` and `grid`); `mean`/`std`
    undo the views' normalisation."""
    selection = method.select_tokens(batch)
    views = batch["views"]  # (V, B, 3, S, S)
    num_views, batch_size = views.shape[:2]
    rows = min(n, batch_size)
    fig = Figure(figsize=(2.2 * (num_views + 1), 2.2 * rows))
    axes = fig.subplots(rows, num_views + 1, squeeze=False)
    for i in range(rows):
        attention = selection["attention"]
        _draw_teacher(
            axes[i, 0],
            _to_rgb(batch["teacher_image"][i], mean, std),
            None if attention is None else attention[i],
            batch["boxes"][i],
        )
        for v in range(num_views):
            rgb = _to_rgb(views[v, i], mean, std)
            kept = _kept_pixels(selection["keep_idx"][v, i], method.grid, rgb.shape[:2])
            grey = rgb.mean(dim=-1, keepdim=True).expand_as(rgb) * 0.3 + 0.5  # faded grey
            shown = torch.where(kept[..., None], rgb, grey)
            ax = axes[i, v + 1]
            ax.imshow(shown.numpy())
            for side in ax.spines.values():
                side.set_edgecolor(VIEW_COLOURS[v % len(VIEW_COLOURS)])
                side.set_linewidth(3)
            share = kept.float().mean().item()
            ax.set_title(f"view {v + 1}: {share:.0%} kept", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
