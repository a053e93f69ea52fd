"""The torch device a command runs on, from `--device` (training and evaluation alike)."""

from __future__ import annotations

import torch

from clipkit.config import ConfigError
from clipkit.distributed import DistInfo


def pick_device(name: str = "auto", dist: DistInfo | None = None) -> torch.device:
    """`auto` = CUDA when present, else CPU; asking for CUDA without one is a user error. Under
    several processes (`dist` enabled) plain `cuda` means this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist is not None and dist.enabled:
        name = f"cuda:{dist.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
