"""Build models from a name: a clipkit preset, an open_clip model name, an open_clip-style JSON
file, or `local-dir:DIR` (an open_clip export). The resolved architecture is stored in the run
config and in every checkpoint, so a checkpoint rebuilds its model with no other input.

What differs between kinds of model (open_clip's separate encoders, MS-CLIP's shared Transformer)
is asked of the arch's family (clipkit.models.family); this module only sequences the steps. The
family is declared by the preset or the JSON (`"family": "msclip"`), never guessed from the name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from clipkit.config import ConfigError, ModelConfig
from clipkit.data.preprocess import Preprocess
from clipkit.models.arch_config import arch_from_json, read_json, validate_arch
from clipkit.models.family import (
    LOCAL_DIR,
    ModelFamily,
    all_families,
    family_of,
    get_family,
    parse_model_name,
)
from clipkit.models.open_clip_family import local_dir_weights
from clipkit.models.pooling import get_pooling
from clipkit.models.towers import apply_text_tower, load_text_tower_weights, lock_towers


def list_models() -> dict[str, list[str]]:
    """Known names by listing group: clipkit's presets of every family, then the names each
    family's own library knows (open_clip's registry)."""
    groups: dict[str, list[str]] = {}
    for family in all_families():
        for group, presets in family.preset_groups().items():
            groups[group] = sorted(presets)
    for family in all_families():
        groups.update(family.external_names())
    return groups


def _preset(name: str) -> dict | None:
    for family in all_families():
        for presets in family.preset_groups().values():
            if name in presets:
                return presets[name]
    return None


def _named_arch(name: str) -> dict:
    """A preset of any family first, then the names each family's library knows."""
    arch = _preset(name)
    for family in all_families():
        arch = arch or family.lookup(name)
    if arch is None:
        known = ", ".join(n for f in all_families() for g in f.preset_groups().values() for n in g)
        raise ConfigError(
            f"unknown model '{name}'. clipkit presets: {known}; open_clip names: see "
            "`clipkit models`; or pass a JSON config file"
        )
    return arch


def _json_arch(path: Path, name: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"model config file not found: {path}")
    return arch_from_json(read_json(path), name)


def resolve_arch(cfg: ModelConfig) -> dict:
    """The full architecture for `cfg.name` with image-size / context-length overrides applied."""
    parsed = parse_model_name(cfg.name)
    if parsed.source == LOCAL_DIR:
        cfg_file = parsed.folder / "open_clip_config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{cfg.name}: no open_clip_config.json in {parsed.folder}")
        arch = _json_arch(cfg_file, cfg.name)
    elif parsed.source == "json":
        arch = _json_arch(Path(parsed.ref), cfg.name)
    else:
        arch = _named_arch(parsed.ref)
    _apply_overrides(arch, cfg)
    if cfg.init_logit_scale is not None or cfg.init_logit_bias is not None:
        family_of(arch).set_logit_init(arch, cfg.init_logit_scale, cfg.init_logit_bias)
    validate_arch(arch, f"model {cfg.name}")
    if cfg.image_pool != "cls":  # part of the architecture: pooling may carry weights
        arch["image_pool"] = cfg.image_pool
    if cfg.text_tower:
        apply_text_tower(arch, cfg.text_tower)
    return arch


def _apply_overrides(arch: dict, cfg: ModelConfig) -> None:
    """--image-size / --context-length (validated with the rest by `validate_arch`)."""
    vision, text = family_of(arch).tower_configs(arch)
    if cfg.image_size is not None:
        vision["image_size"] = cfg.image_size
    if cfg.context_length is not None:
        text["context_length"] = cfg.context_length


def build_from_arch(arch: dict) -> nn.Module:
    """Instantiate a model (random weights) from a resolved architecture dict."""
    return _apply_pool(_build_checked(arch), arch)


def _build_checked(arch: dict) -> nn.Module:
    """The family's build, with what the model classes raise on a config they cannot build (an
    unknown key, a size they reject, no memory for it) as one ConfigError line."""
    try:
        return family_of(arch).build(arch)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError, MemoryError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"the model config cannot be built ({type(e).__name__}: {text[:200]})"
        ) from None


def _apply_pool(model: nn.Module, arch: dict) -> nn.Module:
    pool = arch.get("image_pool", "cls")
    if pool != "cls":
        get_pooling(pool)  # an unknown name fails the same way for every family
        family_of(arch).apply_image_pool(model, pool)
    return model


def build(cfg: ModelConfig) -> nn.Module:
    """Build the model for a run; fills `cfg.arch` so it is saved with the run."""
    arch = cfg.arch or resolve_arch(cfg)
    cfg.arch = arch
    model = _build_checked(arch)  # pooling is added after the weights: they never hold it
    pretrained = cfg.pretrained if cfg.pretrained is not None else default_weights(cfg.name)
    if pretrained:
        load_pretrained(model, pretrained, arch)
    if cfg.text_tower and not pretrained:
        load_text_tower_weights(model, cfg.text_tower)
    _apply_pool(model, arch)
    if cfg.lock_image or cfg.lock_text:
        lock_towers(model, cfg)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def default_weights(name: str) -> str | None:
    """The weights a model name brings with it: a `local-dir:` folder's weights file."""
    folder = parse_model_name(name).folder
    if folder is None:
        return None
    found = local_dir_weights(folder)
    return str(found) if found else None


def load_pretrained(model: nn.Module, path: str, arch: dict) -> None:
    """Load local weights (a state_dict file, .pt/.bin/.safetensors, or a family's own layout
    such as official MS-CLIP weights) into `model`, built from `arch`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pretrained weights file not found: {p}")
    family_of(arch).load_weights(model, p)


def image_size(arch: dict) -> int:
    size = family_of(arch).tower_configs(arch)[0].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def context_length(arch: dict) -> int:
    return int(family_of(arch).tower_configs(arch)[1].get("context_length", 77))


def preprocess_cfg(arch: dict) -> dict:
    """open_clip's PreprocessCfg fields for this model (size, mean, std, interpolation...)."""
    pp = family_of(arch).preprocess_defaults(arch)
    pp.update(arch.get("preprocess_cfg", {}) or {})
    pp["size"] = image_size(arch)
    return pp


def preprocess(arch: dict) -> Preprocess:
    """What the data layer needs to feed this model: image preprocessing and tokenizer settings."""
    pp = preprocess_cfg(arch)
    return Preprocess(
        image_size=pp["size"],
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        interpolation=pp.get("interpolation"),
        resize_mode=pp.get("resize_mode"),
        context_length=context_length(arch),
        hf_tokenizer_name=family_of(arch).tokenizer_name(arch),
    )


def embed_dim(arch: dict) -> int:
    """The width of the model's joint embedding, read from a text forward on the meta device
    (no memory for weights, no compute)."""
    with torch.device("meta"):
        model = build_from_arch(arch)
        tokens = torch.zeros(1, context_length(arch), dtype=torch.long)
        return int(model.encode_text(tokens).shape[-1])


def export_config(arch: dict) -> dict:
    """open_clip's `open_clip_config.json` for this model (ConfigError: not exportable)."""
    return family_of(arch).export_config(arch, preprocess_cfg(arch))


def shared_parameters(model: nn.Module, arch: dict) -> list[nn.Parameter]:
    """Parameters both modalities use (MS-CLIP), each once; [] for separate encoders."""
    return family_of(arch).shared_parameters(model)


def describe(cfg: ModelConfig) -> str:
    """Architecture summary with parameter counts per top-level module, without real weights."""
    arch = resolve_arch(cfg)
    family: ModelFamily = family_of(arch)
    with torch.device("meta"):
        model = build_from_arch(arch)
    lines = [f"model: {cfg.name}  (family: {family.name})"]
    for child_name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        lines.append(f"  {child_name:<24} {n:>14,d} params  ({type(child).__name__})")
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        lines.append(f"  {'(top-level params)':<24} {own:>14,d} params")
    total = sum(p.numel() for p in model.parameters())
    if not family.separate_towers:
        shared = sum(p.numel() for p in family.shared_parameters(model))
        lines.append(f"  {'(shared by both towers)':<24} {shared:>14,d} params, counted once")
    lines.append(f"  {'total':<24} {total:>14,d} params")
    lines.append(f"  image size {image_size(arch)}, context length {context_length(arch)}")
    lines.append("  config: " + json.dumps(family.config(arch), sort_keys=True))
    return "\n".join(lines)


__all__ = ["build", "build_from_arch", "get_family", "list_models", "preprocess", "resolve_arch"]
