"""CLIP (Radford et al. 2021, arXiv 2103.00020): two encoders, symmetric InfoNCE over the global
batch. Also the model family-agnostic step MS-CLIP trains with (it offers the same interface)."""

from __future__ import annotations

import torch

from clipkit.config import MethodConfig
from clipkit.methods import register
from clipkit.methods.base import Embeddings, LossParts, Method, scale_parts


class CLIPMethod(Method):
    name = "clip"

    def embed(self, batch: dict) -> Embeddings:
        """The model's outputs: L2-normalised `image_features`, `text_features` (B, D) and the
        exp'd `logit_scale`. MS-CLIP's BatchNorm (its parallel branch) normalises over the batch
        given here: per micro-batch under accumulation, as DDP keeps it per rank."""
        out = self.model(batch["image"], batch["text"])
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def loss_from_embeddings(self, emb: Embeddings) -> LossParts:
        loss = self.contrastive(emb["image_features"], emb["text_features"], emb)
        return loss, {self.contrastive_name: loss.detach(), **scale_parts(emb)}


@register("clip", CLIPMethod)
def _build(cfg: MethodConfig, model) -> CLIPMethod:
    return CLIPMethod(model)
