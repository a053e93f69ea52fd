"""The Method interface: what the generic trainer knows about a training method.

A method owns the model being trained plus whatever else it needs (an EMA teacher, projection
heads, loss weights). It is an `nn.Module`, so DDP wraps it whole and its extra state rides in
`state_dict()`. `forward(batch)` is the training step; it has no side effects: the EMA update
happens in `after_step`, after the optimizer step (as in dinov2 / BYOL).

The step is split in two so that a large batch can be trained in micro-batches exactly (gradient
caching, Gao et al. 2021, arXiv 2101.06983; `clipkit.train.accumulate`): `embed(batch)` is
everything that touches parameters, `loss_from_embeddings(emb)` the loss over embeddings only.
`forward(batch)` is the one composed with the other.
"""

from __future__ import annotations

import torch
from torch import nn

from clipkit.data.views import ViewSpec

Embeddings = dict[str, torch.Tensor]  # `embed`'s output: per-sample (batch on dim 0) and 0-dim
LossParts = tuple[torch.Tensor, dict[str, torch.Tensor]]  # the loss, its parts for the log


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
    """

    name: str = "base"
    has_ema: bool = False
    has_unused_parameters: bool = False
    has_token_masks: bool = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def views(self) -> ViewSpec:
        return ViewSpec()

    def forward(self, batch: dict, embed_only: bool = False) -> LossParts | Embeddings:
        """One training step's loss and its named parts (detached scalars) for logging.

        With `embed_only`, `embed(batch)` alone: DDP hooks `forward`, so the gradient-cached
        step reaches `embed` through this flag (a keyword, not a mode attribute, so no state can
        be left switched on). A subclass may override `forward` instead of implementing the
        split; it then trains with `--accum-mode independent` only (see `splits_loss`)."""
        emb = self.embed(batch)
        return emb if embed_only else self.loss_from_embeddings(emb)

    def embed(self, batch: dict) -> Embeddings:
        """Everything of the step that touches parameters: per-sample tensors (batch on dim 0)
        and 0-dim model outputs (the exp'd logit scale). Tensors that need no gradient (a frozen
        teacher's targets) may be among them. Randomness is drawn from the torch generators, so
        replaying their state replays the draws."""
        raise NotImplementedError(f"method '{self.name}' does not split embed / loss")

    def loss_from_embeddings(self, emb: Embeddings) -> LossParts:
        """The loss and its logged parts from `embed`'s output alone (no parameter is used;
        buffers may be read), gathered across ranks as the losses do. `emb` may hold several
        micro-batches concatenated on dim 0 (one value of each 0-dim entry)."""
        raise NotImplementedError(f"method '{self.name}' does not split embed / loss")

    @classmethod
    def splits_loss(cls) -> bool:
        """Whether the class implements the embed / loss split through `Method.forward` (what
        exact accumulation needs); a method that overrides `forward` alone does not."""
        return (
            cls.forward is Method.forward
            and cls.embed is not Method.embed
            and cls.loss_from_embeddings is not Method.loss_from_embeddings
        )

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
