"""Evaluation views of A-CLIP's EMA weights: open_clip's interface over the EMA image tower and
the online text tower (`--weights ema`), or over both EMA towers (`--weights ema-both`, the
official pairing), sharing every other part with the online model rather than copying it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class EMAImageCLIP(nn.Module):
    """open_clip.CLIP's `encode_image` / `encode_text` / `forward` over an EMA image tower and an
    online model's text tower (shared, not copied)."""

    def __init__(self, model: nn.Module, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.online = model
        self.output_dict = model.output_dict

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.online.logit_scale

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.online.encode_text(text, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        scale = self.logit_scale.exp()
        if self.output_dict:
            return {
                "image_features": image_features,
                "text_features": text_features,
                "logit_scale": scale,
            }
        return image_features, text_features, scale


class TextTower(nn.Module):
    """The text parts the official A-CLIP EMA's, under open_clip.CLIP's own names."""

    def __init__(self, transformer: nn.Module, text_projection: nn.Parameter):
        super().__init__()
        self.transformer = transformer
        self.text_projection = text_projection


def text_tower(model: nn.Module) -> TextTower:
    """The model's own text transformer and projection (shared, not copied)."""
    return TextTower(model.transformer, model.text_projection)


def with_parts(model: nn.Module, **parts: nn.Module | nn.Parameter) -> nn.Module:
    """A shallow copy of `model` with some submodules / parameters replaced: the copy runs the
    model's own `encode_image` / `encode_text` / `forward` over them, and shares everything else."""
    view = copy.copy(model)
    view._modules, view._parameters = dict(model._modules), dict(model._parameters)
    view._buffers = dict(model._buffers)
    for name, part in parts.items():
        setattr(view, name, part)
    return view
