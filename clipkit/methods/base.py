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
    """Base class. Subclasses set `name`, build their modules and implement `forward`.

    Capabilities, declared here so callers read them instead of probing for attributes; a
    subclass overrides the class value, or sets it per instance when its settings decide:
    - `has_ema`: keeps EMA weights, so `eval_model("ema")` works (and export can use them).
    - `has_unused_parameters`: some trainable parameter gets no gradient on some steps, so DDP
      must look for unused parameters (slower; off unless a method needs it).
    - `has_token_masks`: chooses which image tokens the online views keep (teacher attention
      or random blocks), so `clipkit inspect masks` can draw the choice (the A-CLIP family).
    - `views`: the image views each sample is turned into (a `ViewSpec`).

    `settings_class`: the dataclass of the method's own settings (fields made with
    `clipkit.method_config.setting`, an optional `check()` raising ConfigError), or None. The run
    config holds an instance (`cfg.method.settings`); `clipkit pretrain` makes a flag per field.
    """

    name: str = "base"
    settings_class: type | None = None
    has_ema: bool = False
    has_unused_parameters: bool = False
    has_token_masks: bool = False

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

    def ema_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the EMA weights in place (export); only where `has_ema`."""
        raise ValueError(f"method '{self.name}' keeps no EMA weights")

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
