"""CLIP (Radford et al. 2021, arXiv 2103.00020): two encoders, symmetric InfoNCE over the global
batch. Also the model family-agnostic step MS-CLIP trains with (it offers the same interface)."""

from __future__ import annotations

import torch

from clipkit.config import MethodConfig
from clipkit.losses import clip_loss
from clipkit.methods import register
from clipkit.methods.base import Method


class CLIPMethod(Method):
    name = "clip"

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(batch["image"], batch["text"])
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        return loss, {"clip_loss": loss.detach(), "logit_scale": out["logit_scale"].detach()}


@register("clip", CLIPMethod)
def _build(cfg: MethodConfig, model) -> CLIPMethod:
    return CLIPMethod(model)
