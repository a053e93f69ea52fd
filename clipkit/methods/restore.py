"""A checkpoint back into a working method: read the file (`clipkit.checkpoint.read`), rebuild the
model and method from the config stored inside, and load their weights and state. Every reader
goes through here: resume, evaluation, export and inspect.

It lives with the methods (not in `clipkit.checkpoint`) because it builds models and methods,
while the file format below stays importable without them; `inspect masks` (a methods module)
reads checkpoints through it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipkit import checkpoint, methods
from clipkit.checkpoint import CheckpointError, Loaded
from clipkit.config import Config, ConfigError
from clipkit.config_resume import check_resume
from clipkit.methods.base import Method
from clipkit.models import factory

# online: the trained weights; ema: A-CLIP's EMA image tower with the online text tower;
# ema-both: both EMA towers (the official A-CLIP evaluation; runs trained with --ema-text).
WEIGHTS = ("online", "ema", "ema-both")


@dataclass
class LoadedMethod:
    """A method rebuilt from a checkpoint, with the config it was built from."""

    checkpoint: Loaded  # the file read: its path, the sha256 of its bytes, its contents
    config: Config
    method: Method
    weights: str = "online"  # which weights `model()` gives: the online ones or the EMA teacher's

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def sha256(self) -> str:
        return self.checkpoint.sha256

    def model(self) -> nn.Module:
        """The model with the chosen weights; a checkpoint without EMA weights refuses 'ema'."""
        if self.weights != "online" and not self.method.has_ema:
            raise ConfigError(
                f"--weights {self.weights}: the '{self.config.method.name}' checkpoint "
                f"{self.path} keeps no EMA weights (only A-CLIP does); use --weights online"
            )
        return self.method.eval_model(self.weights)


def load_method(
    source: str | Path,
    weights: str = "online",
    map_location: str | torch.device = "cpu",
    run_config: Config | None = None,
) -> LoadedMethod:
    """Rebuild the method saved in `source` (a checkpoint file or a run directory's latest).

    Readers build the model from the architecture stored in the checkpoint (random weights,
    then the saved ones). A resumed run passes its own `run_config` instead: it is checked
    against the saved one and built as a run builds it (tower locks, gradient checkpointing),
    with the saved architecture. The torch RNG is used by the build: seed before calling."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
    loaded = checkpoint.read(source, map_location)
    saved = loaded.state["config"]
    if run_config is None:
        cfg = Config.from_dict(saved)
        if not cfg.model.arch:
            raise CheckpointError(f"{loaded.path} stores no model architecture")
        model = factory.build_from_arch(cfg.model.arch)
    else:
        cfg = run_config
        check_resume(cfg, saved)
        cfg.model.arch = saved["model"]["arch"]
        model = factory.build(cfg.model)
    method = methods.build(cfg.method, model)
    restore_state(loaded, method)
    return LoadedMethod(checkpoint=loaded, config=cfg, method=method, weights=weights)


def restore_state(loaded: Loaded, method: Method) -> None:
    """Load the saved model weights and method state (EMA teacher...) into a built method."""
    with _must_fit(loaded):
        method.model.load_state_dict(loaded.state["model"])
        method.load_extra_state(loaded.state.get("method_state", {}))


def restore_optimizer(loaded: Loaded, optimizer: torch.optim.Optimizer) -> None:
    with _must_fit(loaded):
        optimizer.load_state_dict(loaded.state["optimizer"])


def restore_grad_scaler(loaded: Loaded, scaler: torch.amp.GradScaler) -> None:
    """fp16's loss scale and growth tracker, so a resumed run scales as the uninterrupted one.
    A checkpoint without them (an fp32/bf16 run, or one from before fp16 scaling) leaves the
    scaler fresh: its scale finds its level again in a few skipped steps. A disabled scaler
    (this run is fp32/bf16) ignores a saved one."""
    saved = loaded.state.get("grad_scaler")
    if saved and scaler.is_enabled():
        with _must_fit(loaded):
            scaler.load_state_dict(saved)


@contextmanager
def _must_fit(loaded: Loaded) -> Iterator[None]:
    """A checkpoint that does not fit what was built from its config: one CheckpointError line."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{loaded.path} does not fit the model and optimizer built from its config ({first})"
        ) from None
