"""Losses. Each returns a scalar tensor; callers log the named parts.

- `clip_loss`: symmetric InfoNCE (Radford et al. 2021, arXiv 2103.00020) over the global batch in
  its local-loss form: each rank scores its own B samples against all gathered features, so the
  logits are B x (world*B), not (world*B)^2, and gradients reach every rank through the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.distributed import all_gather_with_grad, current


def clip_loss(
    image_features: torch.Tensor,  # (B, D), L2-normalised
    text_features: torch.Tensor,  # (B, D), L2-normalised
    logit_scale: torch.Tensor,  # scalar, already exp()'d
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over this rank's B samples."""
    rank = current().rank
    all_image = all_gather_with_grad(image_features)  # (world*B, D)
    all_text = all_gather_with_grad(text_features)
    logits_per_image = logit_scale * image_features @ all_text.T  # (B, world*B)
    logits_per_text = logit_scale * text_features @ all_image.T
    batch = image_features.shape[0]
    labels = torch.arange(batch, device=image_features.device) + rank * batch
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def nt_xent(
    z1: torch.Tensor,  # (B, E) first view's SSL embeddings
    z2: torch.Tensor,  # (B, E) second view's, same samples in the same order
    temperature: float,
    gather: bool = True,
) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709) in SLIP's local-loss form.

    Each query of either view is scored against both views of the whole (gathered) batch, so it
    chooses among 2*world*B - 1 candidates: its other view is the positive, its own row is
    excluded. Inputs are L2-normalised here. A-CLIP (arXiv 2212.08653, Sec. 3.3) contrasts the two
    masked online views with it; the released code compared view 1 with itself (see aclip.md).
    """
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    all_z1 = all_gather_with_grad(z1) if gather else z1  # (world*B, E)
    all_z2 = all_gather_with_grad(z2) if gather else z2
    batch = z1.shape[0]
    offset = current().rank * batch if gather else 0
    labels = torch.arange(batch, device=z1.device) + offset
    self_mask = F.one_hot(labels, all_z1.shape[0]).bool()  # (B, world*B): a query's own row
    losses = []
    for q, k_pos, k_same in ((z1, all_z2, all_z1), (z2, all_z1, all_z2)):
        cross = q @ k_pos.T / temperature  # (B, world*B): positives on `labels`
        same = (q @ k_same.T / temperature).masked_fill(self_mask, float("-inf"))
        losses.append(F.cross_entropy(torch.cat([cross, same], dim=1), labels))
    return (losses[0] + losses[1]) / 2


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, arXiv 2006.07733): mean of 2 - 2 cos(p, z).

    `p` (N, E) are online predictions; `z` (N, E) targets, which the caller detaches (stop-grad).
    """
    return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()
