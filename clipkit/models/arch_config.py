"""Architecture dicts from JSON model configs, and the checks every resolved architecture
passes before a model is built: sizes that torch would only reject deep inside a layer, and
shapes open_clip would only trip over later."""

from __future__ import annotations

import json
import math
from pathlib import Path

from clipkit.config import ConfigError


def read_json(path: Path) -> dict:
    """A model config file's JSON object; anything else is a one-line ConfigError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model config {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config {path} must hold a JSON object, not {type(data).__name__}")
    return data


# Keys of model configs (open_clip's vision/text cfg, MS-CLIP's) that are sizes or counts:
# positive integers, or lists of them (per-stage layers, strides, image height and width).
_SIZE_KEYS = frozenset(
    {
        "embed_dim",
        "image_size",
        "patch_size",
        "width",
        "layers",
        "heads",
        "head_width",
        "context_length",
        "vocab_size",
        "stem_strides",
        "branch_strides",
    }
)
_POSITIVE_FLOAT_KEYS = frozenset({"mlp_ratio"})


def _positive_ints(value) -> bool:
    values = value if isinstance(value, (list, tuple)) and value else [value]
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _check_sizes(cfg, source: str, where: str = "") -> None:
    """Every size in a model config, at any depth, is a positive integer (and mlp_ratio a
    positive number; None means unused): zero or negative sizes fail deep inside torch."""
    if not isinstance(cfg, dict):
        return
    for key, value in cfg.items():
        name = f"{where}.{key}" if where else key
        if value is not None and key in _SIZE_KEYS and not _positive_ints(value):
            raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
        if value is not None and key in _POSITIVE_FLOAT_KEYS and not _positive_number(value):
            raise ConfigError(f"{source}: {name} must be a positive number, got {value!r}")
        _check_sizes(value, source, name)


def _check_open_clip(model_cfg: dict, source: str) -> None:
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


def validate_arch(arch: dict, source: str) -> None:
    """Refuse a resolved architecture (overrides applied) that cannot make a sound model."""
    if arch["family"] == "msclip":
        from clipkit.models.msclip import MSCLIPConfig

        _check_sizes(arch["config"], source)
        MSCLIPConfig.from_dict(arch["config"])  # its own checks, now with the overrides
        return
    _check_sizes(arch["model_cfg"], source)
    _check_open_clip(arch["model_cfg"], source)


def arch_from_json(data: dict, source: str) -> dict:
    """The architecture dict (family plus its config) a JSON model config describes."""
    family = data.get("family", "open_clip")
    if family == "msclip":
        from clipkit.models.msclip import MSCLIPConfig

        body = data.get("config", data)
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: 'config' must be a JSON object")
        body = {k: v for k, v in body.items() if k != "family"}
        _check_sizes(body, source)  # before MSCLIPConfig's own checks divide by them
        return {"family": "msclip", "config": MSCLIPConfig.from_dict(body).to_dict()}
    model_cfg = data.get("model_cfg", data)
    towers = ("vision_cfg", "text_cfg")
    if not isinstance(model_cfg, dict) or not all(
        isinstance(model_cfg.get(k), dict) for k in towers
    ):
        raise ConfigError(f"{source}: an open_clip model config needs 'vision_cfg' and 'text_cfg'")
    return {
        "family": "open_clip",
        "model_cfg": model_cfg,
        "preprocess_cfg": data.get("preprocess_cfg", {}),
    }
