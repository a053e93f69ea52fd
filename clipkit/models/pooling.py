"""Image token pooling for ViT image towers (`--image-pool`): how the patch tokens after the last
block become one image vector before the projection.

- `cls`: the [CLS] token (CLIP, arXiv 2103.00020; ViT, arXiv 2010.11929). The tower's default.
- `avg`: mean of the patch tokens (open_clip's `pool_type='avg'`; the same numbers).
- `max`: per-channel max over patch tokens.
- `gem`: generalized mean (GeM; Radenovic et al., arXiv 1711.02512, Sec. 3.1) with one learnable
  exponent p (init 3): p=1 is the mean, p -> inf the max.
- `ggem`: Group Generalized Mean (GGeM; Ko et al., arXiv 2212.04114, Sec. 3): the channels split
  into groups, by default one per attention head, each group with its own learnable p.
- `attn`: attention-based pooling as in PatchConvNet (Touvron et al., arXiv 2112.13692, Sec. 3.2):
  a learned query attends over the patch tokens through one attention block (attention + MLP, both
  residual, pre-norm), without PatchConvNet's layer scale.

GeM and GGeM need non-negative inputs and ViT activations are signed: as the GGeM paper (and GeM's
reference code) does, every activation is clamped from below at `eps` (1e-6) before x^p, so
non-positive values count as (almost) zero. The exponent is clamped at 1 so the result stays
between the mean and the max of the clamped values.

Pooling reads the patch tokens after `ln_post` (open_clip's order for `pool_type='avg'`), so `avg`
exports to open_clip as `pool_type='avg'`; the other poolings have no open_clip equivalent.
The pool module lives at `visual.image_pool`, so its weights are in the model's state_dict.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from clipkit.config import ConfigError

GEM_EPS = 1e-6


class AvgPool(nn.Module):
    """(B, N, D) patch tokens -> (B, D) mean."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)


class MaxPool(nn.Module):
    """(B, N, D) patch tokens -> (B, D) per-channel max."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.amax(dim=1)


def generalized_mean(tokens: torch.Tensor, p: torch.Tensor, eps: float = GEM_EPS) -> torch.Tensor:
    """(B, N, D) tokens, exponent p (scalar or (D,)) -> (B, D): (mean_n clamp(x, eps)^p)^(1/p).

    Computed as m * (mean (x/m)^p)^(1/p) with m the per-channel max: the same value for any m > 0,
    but x^p cannot overflow for large p (and the gradient through m is zero, so m is detached).
    """
    dtype = torch.promote_types(tokens.dtype, torch.float32)  # x^p in bf16/fp16 is too coarse
    x = tokens.to(dtype).clamp(min=eps)  # signed ViT activations: non-positive -> eps (GGeM)
    p = p.to(dtype).clamp(min=1.0)
    m = x.amax(dim=1, keepdim=True).detach()  # (B, 1, D)
    pooled = (x / m).pow(p).mean(dim=1).pow(1.0 / p) * m[:, 0]  # (B, D)
    return pooled.to(tokens.dtype)


class GeMPool(nn.Module):
    """Generalized mean over patch tokens with one learnable exponent p (GeM)."""

    def __init__(self, p: float = 3.0, eps: float = GEM_EPS):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return generalized_mean(tokens, self.p, self.eps)


class GGeMPool(nn.Module):
    """Group GeM: `groups` contiguous channel groups of width D/groups, each with its own p."""

    def __init__(self, width: int, groups: int, p: float = 3.0, eps: float = GEM_EPS):
        super().__init__()
        if groups < 1 or width % groups:
            raise ConfigError(f"ggem pooling: width {width} does not split into {groups} groups")
        self.p = nn.Parameter(torch.full((groups,), float(p)))
        self.group_width = width // groups
        self.eps = eps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.p.repeat_interleave(self.group_width)  # (D,): channel c uses p[c // group_width]
        return generalized_mean(tokens, p, self.eps)


class AttentionPool(nn.Module):
    """PatchConvNet's learned aggregation: one query token, attention over [query, patches]
    (query row only), then an MLP on the query; both residual with pre-norm."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.query = nn.Parameter(torch.empty(1, 1, width))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query.to(tokens.dtype).expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        u = self.norm1(torch.cat([q, tokens], dim=1))  # (B, 1 + N, D)
        q = q + self.attn(u[:, :1], u, u, need_weights=False)[0]
        q = q + self.mlp(self.norm2(q))
        return q[:, 0]  # (B, D)


@dataclass(frozen=True)
class Pooling:
    """A registered pooling: `build(width, heads)` makes the module (None: the [CLS] token)."""

    build: Callable[[int, int], nn.Module] | None
    summary: str


POOLINGS: dict[str, Pooling] = {
    "cls": Pooling(None, "the [CLS] token (CLIP, arXiv 2103.00020)"),
    "avg": Pooling(lambda w, h: AvgPool(), "mean of patch tokens"),
    "max": Pooling(lambda w, h: MaxPool(), "per-channel max of patch tokens"),
    "gem": Pooling(lambda w, h: GeMPool(), "generalized mean, learnable p (arXiv 1711.02512)"),
    "ggem": Pooling(
        lambda w, h: GGeMPool(w, groups=h), "group GeM, one p per head (arXiv 2212.04114)"
    ),
    "attn": Pooling(
        lambda w, h: AttentionPool(w, h), "learned-query attention (PatchConvNet, 2112.13692)"
    ),
}

# open_clip VisionTransformer `pool_type` with the same numbers (for export); others have none.
OPEN_CLIP_POOL_TYPES = {"cls": "tok", "avg": "avg"}


def list_poolings() -> list[str]:
    return sorted(POOLINGS)


def get_pooling(name: str) -> Pooling:
    if name not in POOLINGS:
        raise ConfigError(f"unknown image pooling '{name}' (known: {', '.join(list_poolings())})")
    return POOLINGS[name]


def build_pool(name: str, width: int, heads: int) -> nn.Module | None:
    """The pool module for `name` on a tower of `width` channels and `heads` attention heads."""
    build = get_pooling(name).build
    return None if build is None else build(width, heads)


def open_clip_pool_type(name: str) -> str:
    """open_clip's `vision_cfg['pool_type']` for an export; ConfigError when open_clip has none."""
    get_pooling(name)
    if name not in OPEN_CLIP_POOL_TYPES:
        raise ConfigError(
            f"image pooling '{name}' has no open_clip equivalent, so this model cannot be exported "
            f"to open_clip (exportable: {', '.join(sorted(OPEN_CLIP_POOL_TYPES))}); evaluate it "
            "with clipkit's own commands"
        )
    return OPEN_CLIP_POOL_TYPES[name]


def _pool_patch_tokens(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces `VisionTransformer._pool` on one instance: (B, 1 + N, D) -> pooled (B, D) and the
    patch tokens, in open_clip's `ln_post` order for its own `avg` pooling."""
    if visual.final_ln_after_pool:
        return visual.ln_post(visual.image_pool(x[:, 1:])), x[:, 1:]
    x = visual.ln_post(x)
    return visual.image_pool(x[:, 1:]), x[:, 1:]


def _open_clip_heads(visual: nn.Module) -> int:
    return visual.transformer.resblocks[0].attn.num_heads


def pool_open_clip_vit(visual: nn.Module, name: str) -> None:
    """Give an open_clip `VisionTransformer` the pooling `name` in place: the module goes to
    `visual.image_pool` and this instance's `_pool` (which `forward`, `forward_intermediates` and
    clipkit's `forward_kept` all call) is replaced by a bound method, so the class and every
    other state_dict key stay open_clip's. Any other tower: ConfigError."""
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(
            f"image pooling '{name}' needs a ViT image tower (open_clip VisionTransformer or "
            f"MS-CLIP); this model's image tower is {type(visual).__name__}; use --image-pool cls"
        )
    if visual.attn_pool is not None:
        raise ConfigError(
            f"image pooling '{name}' cannot replace this tower's open_clip attentional pooler; "
            "use --image-pool cls"
        )
    width = visual.ln_post.normalized_shape[0]
    visual.image_pool = build_pool(name, width, _open_clip_heads(visual))
    visual._pool = types.MethodType(_pool_patch_tokens, visual)
