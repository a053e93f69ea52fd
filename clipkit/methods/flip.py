"""FLIP (Li et al. 2023, arXiv 2212.00794, Sec. 3): CLIP on images with a random `mask_ratio`
share of their patch tokens removed: cheaper steps, the baseline A-CLIP is measured against
(clipkit.methods.aclip). At evaluation the model sees every token (the plain open_clip forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.config import MethodConfig
from clipkit.methods import register
from clipkit.methods.aclip import vit_tower
from clipkit.methods.aclip_settings import FLIPSettings
from clipkit.methods.base import Embeddings
from clipkit.methods.clip import CLIPMethod
from clipkit.models.vit import forward_kept, patch_grid


class FLIPMethod(CLIPMethod):
    """CLIP's loss (`--loss` clip or siglip) over the features of the kept tokens."""

    name = "flip"
    settings_class = FLIPSettings

    def __init__(self, settings: FLIPSettings, model: nn.Module):
        super().__init__(model)
        vit_tower(model)
        self.mask_ratio = settings.mask_ratio

    def embed(self, batch: dict) -> Embeddings:
        """`image_features` of the kept tokens and `text_features` (B, E), the logit scale."""
        images = batch["image"]  # (B, 3, H, W)
        rows, cols = patch_grid(self.model.visual, images)
        n_patches = rows * cols
        n_keep = n_patches - int(n_patches * self.mask_ratio)
        keep_idx = None
        if n_keep < n_patches:
            noise = torch.rand(images.shape[0], n_patches, device=images.device)
            keep_idx = noise.topk(n_keep, dim=1).indices  # (B, K) a uniform random subset
        image_features = F.normalize(forward_kept(self.model.visual, images, keep_idx), dim=-1)
        text_features = self.model.encode_text(batch["text"], normalize=True)
        return dict(
            image_features=image_features, text_features=text_features, **self.model_scales()
        )


@register("flip", FLIPMethod)
def _build_flip(cfg: MethodConfig, model) -> FLIPMethod:
    return FLIPMethod(cfg.settings, model)
