"""Token-level functions over open_clip's `VisionTransformer`, without subclassing or patching it,
so the weights stay plain open_clip weights and export unchanged.

- `embed_patches`: patch embedding + [CLS] + positional embedding (+ `ln_pre`), for any input size
  (the position table is resampled when the grid differs, as A-CLIP-eff's half-resolution teacher
  needs; arXiv 2212.08653 Sec. 4.2).
- `forward_kept`: the encoder on [CLS] + a kept subset of patch tokens (A-CLIP Sec. 3.2, FLIP
  arXiv 2212.00794 Sec. 3). Position embeddings are added before removal, so every kept token keeps
  its own position; no mask tokens.
- `cls_attention`: the [CLS]->patch attention averaged over all layers and heads (A-CLIP Sec. 3.2),
  accumulated block by block from the [CLS] query row only, so no layer's full (T x T) map is
  ever stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer


def require_vit(visual) -> VisionTransformer:
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"token selection needs an open_clip VisionTransformer image tower, got "
            f"{type(visual).__name__}; use a ViT model"
        )
    return visual


def patch_grid(visual: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of the patch grid `visual` produces for `images` (B, 3, H, W)."""
    ph, pw = visual.patch_size
    return images.shape[-2] // ph, images.shape[-1] // pw


def positional_embedding(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """The (1 + rows*cols, D) position table for `grid`; bicubically resampled when it differs from
    the trained grid (the [CLS] entry is kept as is)."""
    pos = visual.positional_embedding  # (1 + N0, D)
    if tuple(grid) == tuple(visual.grid_size):
        return pos
    rows, cols = visual.grid_size
    table = pos[1:].reshape(1, rows, cols, -1).permute(0, 3, 1, 2)  # (1, D, rows, cols)
    # antialias: a 2x downsample (A-CLIP-eff) should average neighbours, not skip them.
    table = F.interpolate(
        table.float(), size=grid, mode="bicubic", align_corners=False, antialias=True
    )
    table = table.to(pos.dtype).flatten(2).transpose(1, 2)[0]  # (rows'*cols', D)
    return torch.cat([pos[:1], table], dim=0)


def embed_patches(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1 + N, D) tokens: [CLS] first, position embeddings added, `ln_pre`
    applied (per token, so it commutes with selecting tokens afterwards; open_clip applies its own
    patch dropout before `ln_pre`, which is the same thing)."""
    visual = require_vit(visual)
    x = visual.conv1(images)  # (B, D, rows, cols)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major patches
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + positional_embedding(visual, grid).to(x.dtype)
    return visual.ln_pre(x)


def keep_tokens(tokens: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, D) tokens, (B, K) patch indices in [0, N) -> (B, 1 + K, D): [CLS] + kept."""
    patches = tokens[:, 1:]
    index = keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])  # (B, K, D)
    return torch.cat([tokens[:, :1], torch.gather(patches, 1, index)], dim=1)


def _pool_and_project(
    visual: VisionTransformer, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # The tower's pooling: open_clip's (ln_post + [CLS] / avg / attn pool) or clipkit's
    # `--image-pool` (pooling.apply_image_pool overrides `_pool`), over the kept tokens only.
    pooled, _ = visual._pool(x)
    features = pooled @ visual.proj if visual.proj is not None else pooled
    return pooled, features


def forward_kept(
    visual: VisionTransformer,
    images: torch.Tensor,
    keep_idx: torch.Tensor | None = None,
    return_pooled: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Image embedding (B, E) (projected, not normalised) from [CLS] + the kept patch tokens.

    `keep_idx` (B, K) row-major patch indices; None keeps all of them (and then applies the tower's
    own patch dropout, so the result is exactly `visual(images)`). With `return_pooled` also
    returns the pooled token before the projection (B, width), which A-CLIP's SSL heads read.
    """
    tokens = embed_patches(visual, images)  # (B, 1 + N, D)
    tokens = visual.patch_dropout(tokens) if keep_idx is None else keep_tokens(tokens, keep_idx)
    x = visual.transformer(tokens)  # (B, 1 + K, D)
    pooled, features = _pool_and_project(visual, x)
    return (features, pooled) if return_pooled else features


def _cls_attention_row(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) block input -> (B, T): the [CLS] query's softmax row, averaged over heads."""
    attn = block.attn
    if not attn._qkv_same_embed_dim or not attn.batch_first:
        raise TypeError("cls_attention expects open_clip's packed, batch-first attention")
    dim, heads = attn.embed_dim, attn.num_heads
    head_dim = dim // heads
    h = block.ln_1(x)  # (B, T, D)
    w_q, w_k = attn.in_proj_weight[:dim], attn.in_proj_weight[dim : 2 * dim]
    b = attn.in_proj_bias
    b_q, b_k = (None, None) if b is None else (b[:dim], b[dim : 2 * dim])
    batch, length = h.shape[:2]
    q = F.linear(h[:, :1], w_q, b_q).view(batch, 1, heads, head_dim).transpose(1, 2)  # (B,H,1,d)
    k = F.linear(h, w_k, b_k).view(batch, length, heads, head_dim).transpose(1, 2)  # (B,H,T,d)
    logits = (q.float() @ k.float().transpose(-1, -2)) * head_dim**-0.5  # (B, H, 1, T)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, T)


def cls_attention(
    visual: VisionTransformer, images: torch.Tensor, return_pooled: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[CLS]->patch attention (B, N), averaged over all layers and heads; rows are the raw softmax
    rows without the [CLS]->[CLS] entry, not renormalised (as A-CLIP's released code).

    With `return_pooled` also returns the pooled pre-projection token (B, width) of the same
    forward, which the BYOL target needs, so the teacher runs once.
    """
    x = embed_patches(visual, images)  # (B, 1 + N, D)
    blocks = visual.transformer.resblocks
    total = x.new_zeros(x.shape[:2], dtype=torch.float32)  # running sum of [CLS] rows (B, 1 + N)
    for block in blocks:
        if not isinstance(block, ResidualAttentionBlock):
            raise TypeError(f"cls_attention supports open_clip's default block, not {type(block)}")
        total += _cls_attention_row(block, x)
        x = block(x)
    scores = total[:, 1:] / len(blocks)  # (B, N)
    if not return_pooled:
        return scores
    pooled, _ = _pool_and_project(visual, x)
    return scores, pooled
