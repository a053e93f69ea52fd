"""The Method interface: what the generic trainer knows about a training method.

A method owns the model being trained plus whatever else it needs (an EMA teacher, projection
heads, loss weights). It is an `nn.Module`, so DDP wraps it whole and its extra state rides in
`state_dict()`. `forward(batch)` is the training step; it has no side effects: the EMA update
happens in `after_step`, after the optimizer step (as in dinov2 / BYOL).
"""

from __future__ import annotations

import torch
from torch import nn

from clipkit.data.views import ViewSpec


class Method(nn.Module):
    """Base class. Subclasses set `name`, build their modules and implement `forward`."""

    name: str = "base"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def views(self) -> ViewSpec:
        return ViewSpec()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training step's loss and its named parts (detached scalars) for logging."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (EMA updates, schedules). Default: nothing."""

    def eval_model(self, which: str = "online") -> nn.Module:
        """The model evaluation should use: the online weights, or the EMA copy where one exists."""
        if which != "online":
            raise ValueError(f"method '{self.name}' keeps no '{which}' weights; use 'online'")
        return self.model

    def extra_state(self) -> dict:
        """Method state beyond the model's weights (EMA weights, momentum step...)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_extra_state(self, state: dict) -> None:
        missing = [k for k in self.extra_state() if k not in state]
        if missing:
            raise KeyError(f"checkpoint lacks method state: {missing[:5]}")
        self.load_state_dict(
            {**state, **{f"model.{k}": v for k, v in self.model.state_dict().items()}}
        )
