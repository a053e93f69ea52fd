"""Architecture dicts from JSON model configs, and the checks every resolved architecture
passes before a model is built: sizes that torch would only reject deep inside a layer, and
shapes open_clip would only trip over later."""

from __future__ import annotations

import json
import math
from pathlib import Path

from clipkit.config import ConfigError
from clipkit.models.family import family_of, get_family


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


def check_sizes(cfg, source: str, where: str = "") -> None:
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
        check_sizes(value, source, name)


def validate_arch(arch: dict, source: str) -> None:
    """Refuse a resolved architecture (overrides applied) that cannot make a sound model: sizes
    first (the family's own checks would divide by them), then what its family refuses."""
    family = family_of(arch)
    check_sizes(family.config(arch), source)
    family.validate(arch, source)


def arch_from_json(data: dict, source: str) -> dict:
    """The architecture dict (family plus its config) a JSON model config describes."""
    return get_family(data.get("family", "open_clip")).from_json(data, source)
