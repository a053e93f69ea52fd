"""Pretrained Hugging Face text towers and LiT-style tower locking.

- `--text-tower hf:DIR`: the text encoder is a transformers model saved in a local directory,
  built by open_clip's `HFTextEncoder` (CustomTextCLIP) with DIR's tokenizer; the weights in DIR are
  copied into the tower by `load_text_tower_weights` (open_clip builds it from the config only).
- `--lock-image` / `--lock-text`: LiT, "Locked-image Tuning" (Zhai et al., arXiv 2111.07991,
  Sec. 3): a tower's parameters are frozen, optionally except its last N blocks (and everything
  after them: final norm, pooling, projection). Frozen parameters have `requires_grad=False`, so
  the optimizer (clipkit.train.optim) never sees them: no update and no weight decay.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from open_clip.transformer import VisionTransformer
from torch import nn

from clipkit.config import ConfigError, ModelConfig
from clipkit.models.family import family_of

HF_PREFIX = "hf:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
# Residual blocks as timm (`blocks.3`, `stages.1.blocks.0`), transformers (`encoder.layer.3`,
# T5's `block.3`) and open_clip (`transformer.resblocks.3`) name them.
_BLOCK_NAME = re.compile(r"(^|\.)(blocks|layer|layers|block|resblocks)\.\d+$")


def text_tower_dir(spec: str) -> Path:
    """The local directory of an `hf:DIR` spec, checked to hold a transformers model."""
    if not spec.startswith(HF_PREFIX):
        raise ConfigError(f"--text-tower {spec!r}: expected hf:LOCAL_DIR")
    folder = Path(spec[len(HF_PREFIX) :]).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--text-tower {spec!r}: directory {folder} not found")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--text-tower {spec!r}: no config.json in {folder}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(f"--text-tower {spec!r}: no tokenizer files in {folder}")
    return folder.resolve()


def apply_text_tower(arch: dict, spec: str) -> None:
    """Replace the text tower of an open_clip `arch` by the HF model in `hf:DIR` (in place).

    The context length is kept (capped at the model's `max_position_embeddings`); mean pooling
    over non-pad tokens and an MLP projection, as open_clip's HF configs use.
    """
    folder = text_tower_dir(spec)
    if not family_of(arch).hf_text_tower:
        raise ConfigError(f"--text-tower needs an open_clip-family model, not {arch['family']}")
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"--text-tower {spec!r}: config.json is not readable JSON ({e})"
        ) from None
    if hf_cfg.get("pad_token_id") is None:
        raise ConfigError(f"--text-tower {spec!r}: config.json has no pad_token_id")
    old = arch["model_cfg"]["text_cfg"]
    context = int(old.get("context_length", 77))
    max_pos = hf_cfg.get("max_position_embeddings")
    if max_pos:
        context = min(context, int(max_pos))
    arch["model_cfg"]["text_cfg"] = {
        "context_length": context,
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "mlp",
    }
    arch["model_cfg"].pop("custom_text", None)


def load_text_tower_weights(model: nn.Module, spec: str) -> None:
    """Copy the pretrained transformers weights of `hf:DIR` into `model.text.transformer`.

    open_clip builds the HF tower from its config only (clipkit never lets it download), so the
    weights are loaded here, offline. A pooler head the tower does not use is ignored.
    """
    from transformers import AutoModel

    folder = text_tower_dir(spec)
    text = getattr(model, "text", None)
    target = getattr(text, "transformer", None)
    if target is None:
        raise ConfigError("--text-tower: this model has no Hugging Face text tower")
    try:
        source = AutoModel.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"--text-tower {spec!r}: weights not loadable ({first})") from None
    if getattr(source.config, "is_encoder_decoder", False):
        source = source.encoder  # open_clip keeps only the encoder of T5-like models
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    bad = [k for k in [*missing, *unexpected] if not k.startswith("pooler.")]
    if bad:
        raise ConfigError(f"--text-tower {spec!r}: weights do not fit the tower ({bad[0]})")


def lock_towers(model: nn.Module, cfg: ModelConfig) -> None:
    """Freeze the image and/or text tower as `cfg.lock_*` asks (LiT, arXiv 2111.07991)."""
    if not family_of(cfg.arch).separate_towers:
        raise ConfigError(
            "--lock-image/--lock-text: this model shares parameters between its towers "
            "(MS-CLIP), so one tower cannot be locked without the other"
        )
    if cfg.lock_image:
        lock_image_tower(model, cfg.lock_image_unlocked_layers)
    if cfg.lock_text:
        lock_text_tower(model, cfg.lock_text_unlocked_layers)


def lock_image_tower(model: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze `model.visual` except its last `unlocked_layers` blocks and what follows them."""
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        _check_count(len(visual.transformer.resblocks), unlocked_layers, "image")
        # open_clip's groups: [..., last block + ln_post, proj]; N blocks = N + 1 groups
        visual.lock(unlocked_groups=unlocked_layers + 1 if unlocked_layers else 0)
        return
    # timm towers (TimmModel: trunk + projection head): open_clip's TimmModel.lock leaves the
    # projection trainable and needs group_matcher (PiT has none), so lock by block names.
    _lock_by_blocks(visual, unlocked_layers, "image")


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze the text tower except its last `unlocked_layers` blocks and what follows them."""
    text = getattr(model, "text", None)
    if text is None:  # open_clip CLIP keeps the text tower's parts on the model itself
        _check_count(len(model.transformer.resblocks), unlocked_layers, "text")
        model.lock_text_tower(unlocked_layers=unlocked_layers + 1 if unlocked_layers else 0)
        return
    # HFTextEncoder.lock leaves its projection trainable and prints; TextTransformer has
    # `resblocks`: both are handled by the generic block locking.
    _lock_by_blocks(text, unlocked_layers, "text")


def _check_count(n_blocks: int, unlocked_layers: int, tower: str) -> None:
    if not 0 <= unlocked_layers <= n_blocks:
        raise ConfigError(
            f"--lock-{tower}-unlocked-layers {unlocked_layers}: the {tower} tower has "
            f"{n_blocks} blocks"
        )


def _lock_by_blocks(tower: nn.Module, unlocked_layers: int, name: str) -> None:
    """Freeze every parameter of `tower`, then unfreeze the last N blocks and all parameters
    registered after them (final norm, head) — registration order is forward order in timm,
    transformers and open_clip towers."""
    blocks: list[str] = []
    for module_name, module in tower.named_modules():
        inside = blocks and module_name.startswith(blocks[-1] + ".")  # sub-layers of a block
        if _BLOCK_NAME.search(module_name) and _has_params(module) and not inside:
            blocks.append(module_name)
    _check_count(len(blocks), unlocked_layers, name)
    tower.requires_grad_(False)
    if not unlocked_layers:
        return
    first = blocks[-unlocked_layers] + "."
    reached = False
    for param_name, p in tower.named_parameters():
        reached = reached or param_name.startswith(first)
        if reached:
            p.requires_grad_(True)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
