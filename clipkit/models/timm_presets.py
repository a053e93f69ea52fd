"""Image towers from timm, through open_clip's `TimmModel` (`vision_cfg.timm_model_name`).

The seed architectures, each as a full-size preset (timm's own model name, 224 px) and a CPU-sized
`*-test` preset for the test suite:

- PiT, pooling-based ViT (Heo et al., arXiv 2103.16302): `pit-ti-224`, `pit-test`.
- TNT, Transformer in Transformer (Han et al., arXiv 2103.00112): `tnt-s-224`, `tnt-test`.
- ConvNeXt V2 (Woo et al., arXiv 2301.00808): `convnextv2-atto`, `convnextv2-test`.
- MViTv2, multiscale ViT (Li et al., arXiv 2112.01526): `mvitv2-tiny`, `mvitv2-test`.
- plain ViT (Dosovitskiy et al., arXiv 2010.11929) built by timm: `timm-vit-ti-16`, `timm-vit-test`.

open_clip hands timm only the model name (no image size, widths or depths), so a small instance
needs a timm model name of its own: `register_timm_models()` adds the `clipkit_*_test` entrypoints
to timm's registry (idempotent). It must run before a `clipkit_*` name is built, in every process.
"""

from __future__ import annotations

from typing import Any

TEST_IMAGE_SIZE = 32


def _clip_cfg(timm_name: str, image: int, pool: str, text: dict, embed: int) -> dict:
    return {
        "embed_dim": embed,
        "vision_cfg": {
            "image_size": image,
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            # "" keeps the network's own pooling (class token for PiT/TNT/ViT, mean for MViTv2)
            "timm_pool": pool,
            "timm_proj": "linear",
        },
        "text_cfg": dict(text),
    }


_TEST_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 2}
_B_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}

# Tiny instances: kwargs for timm's model classes, image TEST_IMAGE_SIZE px, width <= 64.
_TINY_KWARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "clipkit_pit_test": (
        "pit",
        dict(patch_size=4, stride=2, base_dims=[16, 16, 16], depth=[1, 1, 1], heads=[1, 2, 4]),
    ),
    "clipkit_tnt_test": (
        "tnt",
        dict(
            patch_size=8,
            embed_dim=32,
            inner_dim=8,
            depth=2,
            num_heads_inner=1,
            num_heads_outer=2,
        ),
    ),
    "clipkit_convnextv2_test": (
        "convnextv2",
        dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), use_grn=True, ls_init_value=None),
    ),
    "clipkit_mvitv2_test": ("mvitv2", dict(depths=(1, 1), embed_dim=16, num_heads=1)),
    "clipkit_vit_test": ("vit", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
}

TIMM_PRESETS: dict[str, dict] = {
    "pit-ti-224": _clip_cfg("pit_ti_224", 224, "", _B_TEXT, 512),
    "tnt-s-224": _clip_cfg("tnt_s_patch16_224", 224, "", _B_TEXT, 512),
    "convnextv2-atto": _clip_cfg("convnextv2_atto", 224, "avg", _B_TEXT, 512),
    "mvitv2-tiny": _clip_cfg("mvitv2_tiny", 224, "", _B_TEXT, 512),
    "timm-vit-ti-16": _clip_cfg("vit_tiny_patch16_224", 224, "", _B_TEXT, 512),
    "pit-test": _clip_cfg("clipkit_pit_test", TEST_IMAGE_SIZE, "", _TEST_TEXT, 32),
    "tnt-test": _clip_cfg("clipkit_tnt_test", TEST_IMAGE_SIZE, "", _TEST_TEXT, 32),
    "convnextv2-test": _clip_cfg("clipkit_convnextv2_test", TEST_IMAGE_SIZE, "avg", _TEST_TEXT, 32),
    "mvitv2-test": _clip_cfg("clipkit_mvitv2_test", TEST_IMAGE_SIZE, "", _TEST_TEXT, 32),
    "timm-vit-test": _clip_cfg("clipkit_vit_test", TEST_IMAGE_SIZE, "", _TEST_TEXT, 32),
}


def _model_class(timm_class: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """timm's class for `timm_class` and its constructor kwargs for a TEST_IMAGE_SIZE instance."""
    size = TEST_IMAGE_SIZE
    if timm_class == "pit":
        from timm.models.pit import PoolingVisionTransformer

        return PoolingVisionTransformer, dict(kwargs, img_size=size)
    if timm_class == "tnt":
        from timm.models.tnt import TNT

        return TNT, dict(kwargs, img_size=size)
    if timm_class == "convnextv2":
        from timm.models.convnext import ConvNeXt

        return ConvNeXt, dict(kwargs)
    if timm_class == "mvitv2":
        from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

        return MultiScaleVit, {"cfg": MultiScaleVitCfg(**kwargs), "img_size": (size, size)}
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, dict(kwargs, img_size=size)


def _entrypoint(name: str, timm_class: str, kwargs: dict[str, Any]):
    def create(pretrained: bool = False, **overrides: Any):
        from timm.models import build_model_with_cfg

        if pretrained:
            raise ValueError(f"{name} is a clipkit test model: no pretrained weights")
        overrides.pop("pretrained_cfg", None)
        overrides.pop("pretrained_cfg_overlay", None)
        cls, model_kwargs = _model_class(timm_class, kwargs)
        return build_model_with_cfg(
            cls,
            name,
            pretrained=False,
            pretrained_cfg={"input_size": (3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)},
            **dict(model_kwargs, **overrides),
        )

    create.__name__ = name
    create.__module__ = __name__
    return create


def register_timm_models() -> list[str]:
    """Add the tiny `clipkit_*_test` models to timm's registry once; returns their names."""
    from timm.models import is_model, register_model

    for name, (timm_class, kwargs) in _TINY_KWARGS.items():
        if not is_model(name):
            register_model(_entrypoint(name, timm_class, kwargs))
    return sorted(_TINY_KWARGS)
