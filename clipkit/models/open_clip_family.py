"""The `open_clip` model family: separate image and text encoders built with open_clip's own
classes (`CLIP`, `CustomTextCLIP`), so weights export back to open_clip unchanged.

Names: clipkit's CPU-sized presets (below), the timm-tower presets (clipkit.models.timm_presets)
and every name in open_clip's model registry; JSON configs in open_clip's layout
(`{"model_cfg": ..., "preprocess_cfg": ...}` or the bare model config).
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import open_clip
from open_clip.factory import load_checkpoint
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

from clipkit.checkpoint import CheckpointError, read_torch_file
from clipkit.config import ConfigError
from clipkit.models.family import ModelFamily, register_family
from clipkit.models.pooling import open_clip_pool_type, pool_open_clip_vit
from clipkit.models.timm_presets import TIMM_PRESETS, register_timm_models

# the weight files of an open_clip `local-dir:` folder, in the order open_clip looks for them
LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.pth")


def _tiny(image: int, patch: int, width: int, layers: int, context: int, embed: int) -> dict:
    heads = max(1, width // 32)
    return {
        "embed_dim": embed,
        "vision_cfg": {
            "image_size": image,
            "patch_size": patch,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
        },
        "text_cfg": {
            "context_length": context,
            "vocab_size": 49408,
            "width": width,
            "heads": heads,
            "layers": layers,
        },
    }


def _tiny_resnet(image: int, width: int, text: int, embed: int) -> dict:
    """open_clip's ModifiedResNet image tower (a `layers` tuple selects it: one bottleneck block
    per stage, BatchNorm, attention pooling) beside a `_tiny` text tower of width `text`. On the
    demo data it learns more shape than the ViT `tiny-64` at a lower cost (README, 'Two commands':
    zero-shot shape 32% against 25% after the same 400 steps, at 0.57x the time per step)."""
    cfg = _tiny(image=image, patch=8, width=text, layers=4, context=32, embed=embed)
    # the last stage has width * 32 channels; its attention pool uses 64-wide heads
    cfg["vision_cfg"] = {
        "image_size": image,
        "layers": (1, 1, 1, 1),
        "width": width,
        "head_width": 64,
    }
    return cfg


# clipkit's own open_clip-family presets: CPU-sized ones for tests, the demo and benchmarks.
PRESETS: dict[str, dict] = {
    "test": _tiny(image=32, patch=8, width=32, layers=2, context=16, embed=32),
    # The reference architecture (image 32, patch 4, width 128, 4+4 layers, ctx 32).
    "tiny": _tiny(image=32, patch=4, width=128, layers=4, context=32, embed=128),
    "tiny-64": _tiny(image=64, patch=8, width=128, layers=4, context=32, embed=128),
    # The demo's model (scripts/demo.sh): a small ResNet image tower, text width 64.
    "tiny-rn-64": _tiny_resnet(image=64, width=16, text=64, embed=64),
    "small-64": _tiny(image=64, patch=8, width=256, layers=6, context=32, embed=256),
    # ViT-S/16 image tower with a 384-wide text tower: the CPU hardware-use benchmark's model.
    "vit-s-16": {
        "embed_dim": 384,
        "vision_cfg": {
            "image_size": 224,
            "patch_size": 16,
            "width": 384,
            "layers": 12,
            "head_width": 64,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 384,
            "heads": 6,
            "layers": 12,
        },
    },
}


def _arch(model_cfg: dict, preprocess_cfg: dict | None = None) -> dict:
    return {
        "family": "open_clip",
        "model_cfg": copy.deepcopy(model_cfg),
        "preprocess_cfg": dict(preprocess_cfg or {}),
    }


def local_dir_weights(folder: Path) -> Path | None:
    """The weights file of an open_clip export folder (None: the folder holds none)."""
    for name in LOCAL_DIR_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def check_weights_file(p: Path) -> None:
    """Refuse, in one line, a weights file open_clip's loader would fail on with a traceback (a
    pickle with code in it, with torch's advice to turn the safe load off; a text file; a
    truncated file). Cheap: safetensors read only their header, zip archives are memory-mapped."""
    if p.suffix in (".npz", ".npy"):  # big_vision weights: numpy refuses pickles itself
        return
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                empty = not list(f.keys())
        except Exception as e:  # safetensors raises its own types for every kind of damage
            raise CheckpointError(
                f"{p} is not a readable safetensors file ({type(e).__name__})"
            ) from None
    else:
        obj = read_torch_file(p, "cpu", what="weights file", mmap=zipfile.is_zipfile(p))
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{p} holds no state_dict (a dict of tensors)")
        empty = not obj
    if empty:
        raise CheckpointError(f"{p} holds no weights")


def _check_shapes(model_cfg: dict, source: str) -> None:
    """What open_clip would only trip over later: a ViT grid that drops border pixels, widths
    that do not split into heads (defaults as in open_clip's CLIPVisionCfg / CLIPTextCfg)."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if isinstance(vision.get("layers", 12), int) and "timm_model_name" not in vision:
        size, patch = vision.get("image_size") or 224, vision.get("patch_size") or 16
        sides = size if isinstance(size, (list, tuple)) else [size]
        if any(side % patch for side in sides):
            fit = max(patch, round(sides[0] / patch) * patch)
            raise ConfigError(
                f"{source}: image size {size} is not a multiple of the patch size {patch} "
                f"(e.g. {fit} is)"
            )
        if (vision.get("width") or 768) % (vision.get("head_width") or 64):
            raise ConfigError(f"{source}: vision width is not a multiple of head_width")
    if "hf_model_name" not in text and (text.get("width") or 512) % (text.get("heads") or 8):
        raise ConfigError(f"{source}: text width is not a multiple of heads")


class OpenClipFamily(ModelFamily):
    name = "open_clip"
    separate_towers = True
    hf_text_tower = True

    def preset_groups(self) -> dict[str, dict[str, dict]]:
        return {
            "clipkit": {n: _arch(cfg) for n, cfg in PRESETS.items()},
            "timm towers": {n: _arch(cfg) for n, cfg in TIMM_PRESETS.items()},
        }

    def lookup(self, name: str) -> dict | None:
        model_cfg = open_clip.get_model_config(name.replace("/", "-"))
        return None if model_cfg is None else _arch(model_cfg)

    def external_names(self) -> dict[str, list[str]]:
        return {"open_clip": open_clip.list_models()}

    def from_json(self, data: dict, source: str) -> dict:
        model_cfg = data.get("model_cfg", data)
        towers = ("vision_cfg", "text_cfg")
        if not isinstance(model_cfg, dict) or not all(
            isinstance(model_cfg.get(k), dict) for k in towers
        ):
            raise ConfigError(
                f"{source}: an open_clip model config needs 'vision_cfg' and 'text_cfg'"
            )
        return {
            "family": self.name,
            "model_cfg": model_cfg,
            "preprocess_cfg": data.get("preprocess_cfg", {}),
        }

    def config(self, arch: dict) -> dict:
        return arch["model_cfg"]

    def tower_configs(self, arch: dict) -> tuple[dict, dict]:
        return arch["model_cfg"]["vision_cfg"], arch["model_cfg"]["text_cfg"]

    def validate(self, arch: dict, source: str) -> None:
        _check_shapes(arch["model_cfg"], source)

    def build(self, arch: dict) -> nn.Module:
        model_cfg = copy.deepcopy(arch["model_cfg"])
        vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        if "timm_model_name" in vision:
            # clipkit's tiny timm variants are registered names: needed in every process
            register_timm_models()
            vision["timm_model_pretrained"] = False
        custom = model_cfg.pop("custom_text", False) or "hf_model_name" in text
        if "hf_model_name" in text:
            text["hf_model_pretrained"] = False
        cls = CustomTextCLIP if custom else CLIP
        return cls(**model_cfg, output_dict=True)

    def load_weights(self, model: nn.Module, path: Path) -> None:
        check_weights_file(path)
        try:
            load_checkpoint(model, str(path), strict=True, weights_only=True)
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"weights in {path} do not fit this model: {first}") from None

    def logit_init_config(self, arch: dict) -> dict:
        # open_clip's CLIP / CustomTextCLIP take both; with a bias, `forward` returns `logit_bias`
        return arch["model_cfg"]

    def apply_image_pool(self, model: nn.Module, pool: str) -> None:
        pool_open_clip_vit(getattr(model, "visual", None), pool)

    def tokenizer_name(self, arch: dict) -> str | None:
        return arch["model_cfg"]["text_cfg"].get("hf_tokenizer_name")

    def export_config(self, arch: dict, preprocess_cfg: dict) -> dict:
        preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()}
        model_cfg = copy.deepcopy(arch["model_cfg"])
        pool = arch.get("image_pool", "cls")
        if pool != "cls":  # only poolings open_clip has (avg) export; the rest raise a clear error
            model_cfg["vision_cfg"]["pool_type"] = open_clip_pool_type(pool)
        return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


FAMILY = register_family(OpenClipFamily())
__all__ = ["FAMILY", "PRESETS", "OpenClipFamily", "check_weights_file", "local_dir_weights"]
