"""Load the model an evaluation runs on: a clipkit checkpoint (rebuilt from the config inside it,
with its own preprocessing), or an open_clip model (`NAME` + local weights, or `local-dir:DIR`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipkit import checkpoint as ckpt
from clipkit.config import ConfigError, ModelConfig
from clipkit.data.augment import run_augment
from clipkit.data.tokenize import build_tokenizer
from clipkit.data.transforms import eval_transform
from clipkit.devices import pick_device  # noqa: F401  (the CLI's evaluation commands import it here)
from clipkit.methods.restore import WEIGHTS, load_method
from clipkit.models import factory
from clipkit.models.family import local_dir_name, parse_model_name

log = logging.getLogger(__name__)
RANDOM_WEIGHTS_SEED = 0


@dataclass
class LoadedModel:
    """A model ready for `encode_image` / `encode_text`, with what describes it in results."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    arch: dict
    name: str  # results' "model": the architecture name
    pretrained: str  # results' "pretrained": checkpoint path or weights file
    sha256: str | None  # of the checkpoint / weights file (None for random weights)
    weights: str = "online"
    method: str | None = None
    augment: str | None = None  # the training views' augmentation (clipkit.data.augment)
    source: dict[str, Any] = field(default_factory=dict)  # how to load it again (index dirs)

    @property
    def family(self) -> str:
        return self.arch["family"]


def _from_checkpoint(path: str, weights: str) -> LoadedModel:
    loaded = load_method(path, weights)
    arch = loaded.config.model.arch
    return LoadedModel(
        model=loaded.model(),
        preprocess=eval_transform(factory.preprocess(arch)),
        tokenizer=build_tokenizer(factory.preprocess(arch)),
        arch=arch,
        name=loaded.config.model.name,
        pretrained=str(loaded.path),
        sha256=loaded.sha256,
        weights=weights,
        method=loaded.config.method.name,
        augment=run_augment(loaded.config.data, loaded.method.views).describe(),
        source={"checkpoint": str(loaded.path.resolve()), "weights": weights},
    )


def _from_open_clip(name: str, pretrained: str | None) -> LoadedModel:
    cfg = ModelConfig(name=name, pretrained=pretrained)
    weights_file = pretrained if pretrained is not None else factory.default_weights(name)
    # Random weights come from a fixed seed, so that a random baseline (and a test that builds
    # one) gives the same numbers whatever ran before it in the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = factory.build(cfg)
    if weights_file is None:
        log.warning(
            "model %s has random weights (seed %d; no --pretrained file given)",
            name,
            RANDOM_WEIGHTS_SEED,
        )
    folder = parse_model_name(name).folder
    if folder is not None:  # results and index dirs name the folder absolutely
        name = local_dir_name(folder.resolve())
    return LoadedModel(
        model=model,
        preprocess=eval_transform(factory.preprocess(cfg.arch)),
        tokenizer=build_tokenizer(factory.preprocess(cfg.arch)),
        arch=cfg.arch,
        name=name,
        pretrained=str(weights_file) if weights_file else "",
        sha256=ckpt.sha256(weights_file) if weights_file else None,
        source={
            "model": name,
            "pretrained": str(Path(pretrained).resolve()) if pretrained else None,
        },
    )


def model_inputs(source: dict[str, Any]) -> list[Path]:
    """The files and folders a model is read from (`LoadedModel.source`, or the --checkpoint /
    --model / --pretrained flags as a dict): what an output must not overwrite."""
    paths: list[Path] = []
    if source.get("checkpoint"):
        paths += ckpt.input_paths(source["checkpoint"])
    folder = parse_model_name(source.get("model") or "").folder
    if folder is not None:
        paths.append(folder)
        if folder.is_dir():
            paths += [p for p in folder.iterdir() if p.is_file()]
    if source.get("pretrained"):
        paths.append(Path(source["pretrained"]))
    return paths


def load_model(
    checkpoint: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    weights: str = "online",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Exactly one of `checkpoint` (file or run dir) or `model` (name / `local-dir:DIR`)."""
    if (checkpoint is None) == (model is None):
        raise ConfigError("give either --checkpoint RUN_OR_FILE or --model NAME (not both)")
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
    if checkpoint is not None:
        if pretrained:
            raise ConfigError("--pretrained goes with --model, not --checkpoint")
        loaded = _from_checkpoint(checkpoint, weights)
    else:
        if weights != "online":
            raise ConfigError("--weights ema needs a clipkit --checkpoint that holds EMA weights")
        loaded = _from_open_clip(model, pretrained)
    loaded.model = loaded.model.to(device).eval()
    return loaded


def load_from_source(source: dict, device: str | torch.device = "cpu") -> LoadedModel:
    """Reload the model recorded in `LoadedModel.source` (e.g. by an index directory)."""
    if source.get("checkpoint"):
        return load_model(
            checkpoint=source["checkpoint"], weights=source.get("weights", "online"), device=device
        )
    return load_model(model=source["model"], pretrained=source.get("pretrained"), device=device)
