"""The comparison's two model JSONs (CLIP and MS-CLIP of one width, depth, embedding and patch
grid) and their parameter counts."""

from __future__ import annotations

import json
from pathlib import Path


def write_models(setup, folder: Path) -> dict[str, Path]:
    """open_clip-style JSON for CLIP and MS-CLIP of the same width, depth, embedding and grid."""
    folder.mkdir(parents=True, exist_ok=True)
    s = setup
    clip = {
        "embed_dim": s.width,
        "vision_cfg": {
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "width": s.width,
            "layers": s.layers,
            "head_width": s.width // s.heads,
        },
        "text_cfg": {
            "context_length": s.context,
            "vocab_size": 49408,
            "width": s.width,
            "heads": s.heads,
            "layers": s.layers,
        },
    }
    # Strides whose product is the patch size; one lateral fusion per stage over the depth.
    strides = [2] * (s.patch_size.bit_length() - 1) + [1] * (6 - s.patch_size.bit_length())
    slots = sorted(min(s.layers - 1, 1 + i * (s.layers - 1) // 5) for i in range(5))
    msclip = {
        "family": "msclip",
        "config": {
            "embed_dim": s.width,
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "width": s.width,
            "layers": s.layers,
            "heads": s.heads,
            "context_length": s.context,
            "stem_strides": strides,
            "branch_strides": strides,
            "lateral_slots": slots,
        },
    }
    paths = {"clip": folder / "clip.json", "msclip": folder / "msclip.json"}
    paths["clip"].write_text(json.dumps(clip, indent=1))
    paths["msclip"].write_text(json.dumps(msclip, indent=1))
    return paths


def parameter_count(model_json: Path) -> int:
    import torch

    from clipkit.config import ModelConfig
    from clipkit.models import factory

    cfg = ModelConfig(name=str(model_json))
    cfg.arch = factory.resolve_arch(cfg)
    with torch.device("meta"):
        model = factory.build(cfg)
    return sum(p.numel() for p in model.parameters())
