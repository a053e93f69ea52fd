"""Build models from a name: a clipkit preset, an open_clip model name, an open_clip-style JSON
file, or `local-dir:DIR` (an open_clip export). The resolved architecture is stored in the run
config and in every checkpoint, so a checkpoint rebuilds its model with no other input.

Families: `open_clip` (separate encoders, built with open_clip's own classes so weights export
back to open_clip) and `msclip` (clipkit.models.msclip). The family is declared by the preset or
the JSON (`"family": "msclip"`), never guessed from the name.
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from clipkit.config import ConfigError, ModelConfig
from clipkit.data.preprocess import Preprocess
from clipkit.models.arch_config import arch_from_json, read_json, validate_arch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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


# clipkit's own open_clip-family presets: CPU-sized ones for tests, the demo and benchmarks.
PRESETS: dict[str, dict] = {
    "test": _tiny(image=32, patch=8, width=32, layers=2, context=16, embed=32),
    # The reference architecture (image 32, patch 4, width 128, 4+4 layers, ctx 32).
    "tiny": _tiny(image=32, patch=4, width=128, layers=4, context=32, embed=128),
    "tiny-64": _tiny(image=64, patch=8, width=128, layers=4, context=32, embed=128),
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


def _timm_presets() -> dict[str, dict]:
    from clipkit.models.timm_presets import TIMM_PRESETS

    return TIMM_PRESETS


def _msclip_presets() -> dict[str, dict]:
    import importlib.util

    if importlib.util.find_spec("clipkit.models.msclip") is None:
        return {}
    from clipkit.models import msclip

    return {name: cfg.to_dict() for name, cfg in msclip.PRESETS.items()}


def list_models() -> dict[str, list[str]]:
    """Known names by source: clipkit presets (open_clip and MS-CLIP families) and open_clip's."""
    import open_clip

    return {
        "clipkit": sorted(PRESETS),
        "timm towers": sorted(_timm_presets()),
        "msclip": sorted(_msclip_presets()),
        "open_clip": open_clip.list_models(),
    }


def resolve_arch(cfg: ModelConfig) -> dict:
    """The full architecture for `cfg.name` with image-size / context-length overrides applied."""
    name = cfg.name
    msclip = _msclip_presets()
    timm = _timm_presets()
    if name in PRESETS or name in timm:
        arch = {
            "family": "open_clip",
            "model_cfg": copy.deepcopy(PRESETS.get(name) or timm[name]),
            "preprocess_cfg": {},
        }
    elif name in msclip:
        arch = {"family": "msclip", "config": msclip[name]}
    elif name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :])
        cfg_file = folder / "open_clip_config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{name}: no open_clip_config.json in {folder}")
        arch = arch_from_json(read_json(cfg_file), name)
    elif name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model config file not found: {path}")
        arch = arch_from_json(read_json(path), name)
    else:
        import open_clip

        oc = open_clip.get_model_config(name.replace("/", "-"))
        if oc is None:
            known = ", ".join(sorted(PRESETS) + sorted(msclip))
            raise ConfigError(
                f"unknown model '{name}'. clipkit presets: {known}; open_clip names: see "
                "`clipkit models`; or pass a JSON config file"
            )
        arch = {"family": "open_clip", "model_cfg": copy.deepcopy(oc), "preprocess_cfg": {}}
    _apply_overrides(arch, cfg)
    validate_arch(arch, f"model {name}")
    if cfg.image_pool != "cls":  # part of the architecture: pooling may carry weights
        arch["image_pool"] = cfg.image_pool
    if cfg.text_tower:
        from clipkit.models.towers import apply_text_tower

        apply_text_tower(arch, cfg.text_tower)
    return arch


def _apply_overrides(arch: dict, cfg: ModelConfig) -> None:
    """--image-size / --context-length (validated with the rest by `validate_arch`)."""
    if arch["family"] == "msclip":
        vision = text = arch["config"]
    else:
        vision, text = arch["model_cfg"]["vision_cfg"], arch["model_cfg"]["text_cfg"]
    if cfg.image_size is not None:
        vision["image_size"] = cfg.image_size
    if cfg.context_length is not None:
        text["context_length"] = cfg.context_length


def build_from_arch(arch: dict) -> nn.Module:
    """Instantiate a model (random weights) from a resolved architecture dict."""
    return _apply_pool(_build_checked(arch), arch)


def _build_checked(arch: dict) -> nn.Module:
    """`_build_family`, with what the model classes raise on a config they cannot build (an
    unknown key, a size they reject, no memory for it) as one ConfigError line."""
    try:
        return _build_family(arch)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError, MemoryError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"the model config cannot be built ({type(e).__name__}: {text[:200]})"
        ) from None


def _apply_pool(model: nn.Module, arch: dict) -> nn.Module:
    if arch.get("image_pool", "cls") != "cls":
        from clipkit.models.pooling import apply_image_pool

        apply_image_pool(model, arch["image_pool"])
    return model


def _build_family(arch: dict) -> nn.Module:
    if "timm_model_name" in arch.get("model_cfg", {}).get("vision_cfg", {}):
        # clipkit's tiny timm variants are registered names: needed in every process
        from clipkit.models.timm_presets import register_timm_models

        register_timm_models()
    if arch["family"] == "msclip":
        from clipkit.models.msclip import MSCLIP, MSCLIPConfig

        return MSCLIP(MSCLIPConfig.from_dict(arch["config"]))
    from open_clip.model import CLIP, CustomTextCLIP

    model_cfg = copy.deepcopy(arch["model_cfg"])
    custom = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg["text_cfg"]
    if "hf_model_name" in model_cfg["text_cfg"]:
        model_cfg["text_cfg"]["hf_model_pretrained"] = False
    if "timm_model_name" in model_cfg["vision_cfg"]:
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    cls = CustomTextCLIP if custom else CLIP
    return cls(**model_cfg, output_dict=True)


def build(cfg: ModelConfig) -> nn.Module:
    """Build the model for a run; fills `cfg.arch` so it is saved with the run."""
    arch = cfg.arch or resolve_arch(cfg)
    cfg.arch = arch
    model = _build_checked(arch)  # pooling is added after the weights: they never hold it
    pretrained = cfg.pretrained
    if pretrained is None and cfg.name.startswith("local-dir:"):
        pretrained = _local_dir_weights(Path(cfg.name[len("local-dir:") :]))
    if pretrained:
        load_pretrained(model, pretrained)
    if cfg.text_tower and not pretrained:
        from clipkit.models.towers import load_text_tower_weights

        load_text_tower_weights(model, cfg.text_tower)
    _apply_pool(model, arch)
    if cfg.lock_image or cfg.lock_text:
        from clipkit.models.towers import lock_towers

        lock_towers(model, cfg)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _local_dir_weights(folder: Path) -> str | None:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.pth"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load local open_clip weights (a state_dict file, .pt/.bin/.safetensors) into `model`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pretrained weights file not found: {p}")
    if hasattr(model, "load_weights_file"):  # families with their own layouts (MS-CLIP)
        model.load_weights_file(str(p))
        return
    check_weights_file(p)
    from open_clip.factory import load_checkpoint

    try:
        load_checkpoint(model, str(p), strict=True, weights_only=True)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"weights in {p} do not fit this model: {first}") from None


def check_weights_file(p: Path) -> None:
    """Refuse, in one line, a weights file open_clip's loader would fail on with a traceback (a
    pickle with code in it, with torch's advice to turn the safe load off; a text file; a
    truncated file). Cheap: safetensors read only their header, zip archives are memory-mapped."""
    from clipkit.checkpoint import CheckpointError, read_torch_file

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


def image_size(arch: dict) -> int:
    if arch["family"] == "msclip":
        return int(arch["config"]["image_size"])
    size = arch["model_cfg"]["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def context_length(arch: dict) -> int:
    if arch["family"] == "msclip":
        return int(arch["config"]["context_length"])
    return int(arch["model_cfg"]["text_cfg"].get("context_length", 77))


def preprocess_cfg(arch: dict) -> dict:
    """open_clip's PreprocessCfg fields for this model (size, mean, std, interpolation...)."""
    pp = {
        "size": image_size(arch),
        "mean": OPENAI_MEAN,
        "std": OPENAI_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    if arch["family"] == "msclip":  # the official evaluation normalises with ImageNet stats
        pp["mean"] = tuple(arch["config"].get("image_mean", OPENAI_MEAN))
        pp["std"] = tuple(arch["config"].get("image_std", OPENAI_STD))
    pp.update(arch.get("preprocess_cfg", {}) or {})
    pp["size"] = image_size(arch)
    return pp


def preprocess(arch: dict) -> Preprocess:
    """What the data layer needs to feed this model: image preprocessing and tokenizer settings."""
    pp = preprocess_cfg(arch)
    text_cfg = arch.get("model_cfg", {}).get("text_cfg", {})
    return Preprocess(
        image_size=pp["size"],
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        interpolation=pp.get("interpolation"),
        resize_mode=pp.get("resize_mode"),
        context_length=context_length(arch),
        hf_tokenizer_name=text_cfg.get("hf_tokenizer_name"),
    )


def describe(cfg: ModelConfig) -> str:
    """Architecture summary with parameter counts per top-level module, without real weights."""
    arch = resolve_arch(cfg)
    with torch.device("meta"):
        model = build_from_arch(arch)
    lines = [f"model: {cfg.name}  (family: {arch['family']})"]
    total = 0
    for child_name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        total += n
        lines.append(f"  {child_name:<24} {n:>14,d} params  ({type(child).__name__})")
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        lines.append(f"  {'(top-level params)':<24} {own:>14,d} params")
    total = sum(p.numel() for p in model.parameters())
    if hasattr(model, "shared_parameters"):
        shared = sum(p.numel() for p in model.shared_parameters())
        lines.append(f"  {'(shared by both towers)':<24} {shared:>14,d} params, counted once")
    lines.append(f"  {'total':<24} {total:>14,d} params")
    lines.append(f"  image size {image_size(arch)}, context length {context_length(arch)}")
    body = arch.get("model_cfg") or arch.get("config")
    lines.append("  config: " + json.dumps(body, sort_keys=True))
    return "\n".join(lines)
