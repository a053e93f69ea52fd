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

import copy
import json
from pathlib import Path
from typing import Any

import torch

from clipkit import checkpoint as ckpt
from clipkit.config import ConfigError
from clipkit.fileio import follow_umask, guard_output_dir, output_dir

CONFIG_NAME = "open_clip_config.json"
KIND = "export"  # the marker clipkit leaves in the folders it exports


def _state_dict(state: dict, weights: str) -> dict[str, torch.Tensor]:
    """The open_clip state dict to export: online weights, or with the EMA image tower."""
    from clipkit import methods
    from clipkit.config import Config
    from clipkit.models import factory

    if weights == "online":
        return dict(state["model"])
    cfg = Config.from_dict(state["config"])
    model = factory.build_from_arch(cfg.model.arch)
    model.load_state_dict(state["model"])
    method = methods.build(cfg.method, model)
    method.load_extra_state(state.get("method_state", {}))
    if (
        not hasattr(method, "ema_model_state_dict")
        or getattr(method, "teacher_visual", None) is None
    ):
        raise ConfigError(
            f"--weights ema: the '{cfg.method.name}' checkpoint keeps no EMA weights (only A-CLIP "
            "does); use --weights online"
        )
    return method.ema_model_state_dict()


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
    from clipkit.models import factory

    pp = factory.preprocess_cfg(arch)
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}
    model_cfg = copy.deepcopy(arch["model_cfg"])
    pool = arch.get("image_pool", "cls")
    if pool != "cls":  # only poolings open_clip has (avg) export; the rest raise a clear error
        from clipkit.models.pooling import open_clip_pool_type

        model_cfg["vision_cfg"]["pool_type"] = open_clip_pool_type(pool)
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_open_clip(
    checkpoint: str | Path, out: str | Path, weights: str = "online", overwrite: bool = False
) -> dict[str, Any]:
    """Write the open_clip folder for `checkpoint`; returns a summary (paths, sha256, sizes).

    `out` may not be, contain or lie inside the checkpoint's run; an existing `out` is replaced
    (with `overwrite`) only when it is an earlier export (see clipkit.fileio)."""
    if weights not in ("online", "ema"):
        raise ConfigError(f"--weights must be online or ema, got '{weights}'")
    out = guard_output_dir(
        out, KIND, inputs=ckpt.input_paths(checkpoint), overwrite=overwrite, command="export"
    )
    state = ckpt.load(checkpoint, map_location="cpu")
    arch = state["config"]["model"]["arch"]
    if arch.get("family") != "open_clip":
        raise ConfigError(
            f"{state['_path']}: a '{arch.get('family')}' model cannot be exported to open_clip "
            "(MS-CLIP shares one Transformer between image and text; open_clip has no such "
            "model). Evaluate it with --checkpoint instead"
        )
    config = open_clip_config(arch)  # before writing anything: unexportable poolings fail here
    tensors = _state_dict(state, weights)
    with output_dir(out, KIND) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        weights_file = _write_weights(tmp, tensors)
    return {
        "out": str(out),
        "weights_file": str(out / weights_file),
        "config": str(out / CONFIG_NAME),
        "weights": weights,
        "checkpoint": state["_path"],
        "checkpoint_sha256": ckpt.sha256(state["_path"]),
        "num_tensors": len(tensors),
        "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')",
    }
