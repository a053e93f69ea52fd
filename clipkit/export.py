"""Export a clipkit checkpoint to an open_clip `local-dir:` folder:

    DIR/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    DIR/open_clip_model.safetensors  the weights (open_clip_pytorch_model.bin without safetensors)

so that `open_clip.create_model_and_transforms('local-dir:DIR')` rebuilds the same model with
the same preprocessing. Separate-encoder models only (CLIP, FLIP, A-CLIP online or EMA image
tower); MS-CLIP shares one Transformer between modalities, which open_clip has no class for.
The folder is written under a temporary name and renamed into place when complete, with a
`.clipkit-output` marker: only such a folder is ever replaced (`--overwrite`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clipkit import checkpoint as ckpt
from clipkit.config import ConfigError
from clipkit.fileio import follow_umask, guard_output_dir, output_dir
from clipkit.methods.restore import WEIGHTS, LoadedMethod, load_method
from clipkit.models import factory

CONFIG_NAME = "open_clip_config.json"
KIND = "export"  # the marker clipkit leaves in the folders it exports


def _state_dict(loaded: LoadedMethod) -> dict[str, torch.Tensor]:
    """The open_clip state dict to export: online weights, or with the EMA image tower (and with
    `ema-both` the EMA text tower)."""
    if loaded.weights == "online":
        return dict(loaded.checkpoint.state["model"])
    loaded.model()  # refuses a checkpoint that keeps no EMA weights
    return loaded.method.ema_model_state_dict(loaded.weights)


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> str:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, folder / "open_clip_pytorch_model.bin")
        return "open_clip_pytorch_model.bin"
    save_file(tensors, str(folder / "open_clip_model.safetensors"))
    follow_umask(folder / "open_clip_model.safetensors")  # safetensors writes 0600
    return "open_clip_model.safetensors"


def open_clip_config(arch: dict) -> dict[str, Any]:
    """The `open_clip_config.json` body (ConfigError for a model open_clip has no class for)."""
    return factory.export_config(arch)


def export_open_clip(
    checkpoint: str | Path, out: str | Path, weights: str = "online", overwrite: bool = False
) -> dict[str, Any]:
    """Write the open_clip folder for `checkpoint`; returns a summary (paths, sha256, sizes).

    `out` may not be, contain or lie inside the checkpoint's run; an existing `out` is replaced
    (with `overwrite`) only when it is an earlier export (see clipkit.fileio)."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
    out = guard_output_dir(
        out, KIND, inputs=ckpt.input_paths(checkpoint), overwrite=overwrite, command="export"
    )
    loaded = load_method(checkpoint, weights, map_location="cpu")
    try:  # before writing anything: unexportable families and poolings fail here
        config = open_clip_config(loaded.config.model.arch)
    except ConfigError as e:
        raise ConfigError(f"{loaded.path}: {e}") from None
    tensors = _state_dict(loaded)
    with output_dir(out, KIND) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        weights_file = _write_weights(tmp, tensors)
    return {
        "out": str(out),
        "weights_file": str(out / weights_file),
        "config": str(out / CONFIG_NAME),
        "weights": weights,
        "checkpoint": str(loaded.path),
        "checkpoint_sha256": loaded.sha256,
        "num_tensors": len(tensors),
        "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')",
    }
