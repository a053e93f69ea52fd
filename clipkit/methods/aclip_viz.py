"""Picture of A-CLIP's token choice (arXiv 2212.08653, Fig. 1/3 style): per sample, the teacher
view with its [CLS]-attention heat map and the online views' boxes, then every online view with
the removed patches greyed out.

`render_masks` draws a batch; `inspect_masks` is the library side of `clipkit inspect masks`:
checkpoint -> method (online or EMA scorer) -> a few shard samples through the method's views ->
PNG, written atomically.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from clipkit.config import ConfigError, DataConfig
from clipkit.data.augment import run_augment
from clipkit.data.decode import BadSample, decode_caption, decode_image, pick
from clipkit.data.pipeline import Collate, SampleTransform
from clipkit.data.preprocess import Preprocess
from clipkit.data.sources import expand_sources, local_paths, preflight
from clipkit.data.tarscan import TarStopped, shard_samples
from clipkit.data.tokenize import build_tokenizer
from clipkit.data.views import IMAGENET_MEAN, IMAGENET_STD, ViewSpec
from clipkit.fileio import guard_output_file, write_output_file
from clipkit.methods import list_methods
from clipkit.methods.restore import WEIGHTS, load_method

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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    out = Path(out_png)
    write_output_file(out, buffer.getvalue())  # never a half-written PNG
    return out


def load_aclip_method(checkpoint_path: str | Path, weights: str = "ema", device: str = "cpu"):
    """Rebuild an A-CLIP-family method (model + EMA state) from a checkpoint, in eval mode.

    `weights='online'` makes the online image tower the scorer (its weights are copied into the
    teacher slot), to compare what the trained encoder attends to with what the EMA chose.
    Raises ConfigError when the checkpoint was not trained with an A-CLIP-family method.
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHTS)}, not '{weights}'")
    loaded = load_method(checkpoint_path, weights, map_location="cpu")
    cfg, method = loaded.config, loaded.method
    if not method.has_token_masks:
        raise ConfigError(
            f"{loaded.path} was trained with method '{cfg.method.name}'; masks exist only for "
            f"{', '.join(list_methods('has_token_masks'))} checkpoints"
        )
    if weights == "online" and method.has_ema:  # a teacher to load the online tower into
        method.teacher_visual.load_state_dict(method.model.visual.state_dict())
    return method.to(device).eval(), cfg


def _raw_samples(urls: list[str]):
    """Every readable sample of the shards in order; damaged shards are skipped (as training
    skips them), so a picture is drawn from whatever is usable."""
    for url in urls:
        try:
            yield from shard_samples(url, lambda exn: True)
        except (TarStopped, OSError, ValueError):  # damaged, or cannot be opened
            continue


def read_batch(
    data: str,
    preprocess: Preprocess,
    views: ViewSpec,
    tokenizer,
    n: int,
    seed: int,
    keys: DataConfig | None = None,
) -> dict:
    """The first `n` usable samples of the shards `data` (in shard order), transformed into the
    method's views with the augmentation RNG seeded by `seed`, collated like training batches.
    `keys`: the run's data config (image/text member names, pixel guard, augmentation); default:
    defaults."""
    keys = keys or DataConfig()
    transform = SampleTransform(preprocess, views, run_augment(keys, views))
    rng = random.Random(seed)
    torch.manual_seed(seed)  # the views' crops and colour draws come from torch's global RNG
    samples: list[dict] = []
    urls = expand_sources(data)
    preflight(urls, ranks=1, workers=1, resampled=False)  # missing or non-tar shards: one line
    for raw in _raw_samples(urls):
        try:
            image = decode_image(pick(raw, keys.image_key) or b"", keys.max_pixels)
            caption = decode_caption(raw.get(keys.text_key), rng)
        except BadSample:
            continue
        samples.append({**transform(image, caption), "key": raw.get("__key__", "")})
        if len(samples) == n:
            break
    if not samples:
        raise ConfigError(f"no usable image-caption sample in {data}")
    return Collate(tokenizer)(samples)


def inspect_masks(
    checkpoint_path: str | Path,
    data: str,
    out_png: str | Path,
    n: int = 4,
    weights: str = "ema",
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Draw the token choice of an A-CLIP-family checkpoint on `n` samples of `data`."""
    from clipkit import checkpoint
    from clipkit.models import factory

    if n < 1:
        raise ConfigError("--n must be >= 1")
    inputs = checkpoint.input_paths(checkpoint_path) + local_paths(data)
    guard_output_file(out_png, inputs=inputs, flag="--out")  # before the work, not after
    method, cfg = load_aclip_method(checkpoint_path, weights, device)
    pp = factory.preprocess(cfg.model.arch)
    batch = read_batch(data, pp, method.views, build_tokenizer(pp), n, seed, cfg.data)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return render_masks(method, batch, out_png, n=n, mean=pp.mean, std=pp.std)
