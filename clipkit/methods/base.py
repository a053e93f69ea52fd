"""The Method interface: what the generic trainer knows about a training method.

A method owns the model being trained plus whatever else it needs (an EMA teacher, projection
heads, loss weights). It is an `nn.Module`, so DDP wraps it whole and its extra state rides in
`state_dict()`. `forward(batch)` is the training step; it has no side effects: the EMA update
happens in `after_step`, after the optimizer step (as in dinov2 / BYOL).

The step is split in two so that a large batch can be trained in micro-batches exactly (gradient
caching, Gao et al. 2021, arXiv 2101.06983; `clipkit.train.accumulate`): `embed(batch)` is
everything that touches parameters, `loss_from_embeddings(emb)` the loss over embeddings only.
`forward(batch)` is the one composed with the other.

Two choices every method shares live here, not in each method (`set_objectives`): the contrastive
loss (`clip`: InfoNCE; `siglip`: the pairwise sigmoid loss of Zhai et al. 2023, arXiv 2303.15343,
with the model's learnable logit bias), and distillation from a frozen teacher (its image / text
features join `embed`'s output without a graph, and `objective` adds the KL of its similarity
distributions, clipkit.losses.distill_loss).
"""

from __future__ import annotations

import torch
from torch import nn

from clipkit.config import ConfigError
from clipkit.data.preprocess import Preprocess
from clipkit.data.views import ViewSpec
from clipkit.losses import clip_loss, distill_loss, siglip_loss
from clipkit.method_config import CONTRASTIVE_LOSSES

Embeddings = dict[str, torch.Tensor]  # `embed`'s output: per-sample (batch on dim 0) and 0-dim
LossParts = tuple[torch.Tensor, dict[str, torch.Tensor]]  # the loss, its parts for the log


def scale_parts(emb: Embeddings) -> dict[str, torch.Tensor]:
    """The logged logit scale (exp'd), and the logit bias where the model has one."""
    parts = {"logit_scale": emb["logit_scale"].detach()}
    if "logit_bias" in emb:
        parts["logit_bias"] = emb["logit_bias"].detach()
    return parts


class Method(nn.Module):
    """Base class. Subclasses set `name`, build their modules and implement `forward`.

    Capabilities, declared here so callers read them instead of probing for attributes; a
    subclass overrides the class value, or sets it per instance when its settings decide:
    - `has_ema`: keeps EMA weights, so `eval_model("ema")` works (and export can use them).
    - `has_unused_parameters`: some trainable parameter gets no gradient on some steps, so DDP
      must look for unused parameters (slower; off unless a method needs it).
    - `has_token_masks`: chooses which image tokens the online views keep (teacher attention
      or random blocks), so `clipkit inspect masks` can draw the choice (the A-CLIP family).
    - `views`: the image views each sample is turned into (a `ViewSpec`); `multi_view`: the
      class's views are several online views (the A-CLIP family), not one `image`.

    `settings_class`: the dataclass of the method's own settings (fields made with
    `clipkit.method_config.setting`, an optional `check()` raising ConfigError), or None. The run
    config holds an instance (`cfg.method.settings`); `clipkit pretrain` makes a flag per field.
    """

    name: str = "base"
    settings_class: type | None = None
    has_ema: bool = False
    has_unused_parameters: bool = False
    has_token_masks: bool = False
    multi_view: bool = False  # its batches hold several views (`views`), not one `image`

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_kind = "clip"
        # A frozen `clipkit.methods.teacher.Teacher`, or None. A plain attribute, not a module:
        # its weights are not the method's state (checkpoints record its path and sha256).
        self.teacher = None
        self.distill_weight = 0.0
        self.student_preprocess: Preprocess | None = None

    def set_objectives(
        self,
        loss: str = "clip",
        teacher=None,
        distill_weight: float = 1.0,
        preprocess: Preprocess | None = None,
    ) -> None:
        """The contrastive loss, and an optional teacher to distil from (with the student's
        preprocessing, which the teacher's inputs are adapted from)."""
        self.check_objectives(loss, distilled=teacher is not None)
        self.loss_kind, self.teacher, self.distill_weight = loss, teacher, distill_weight
        self.student_preprocess = preprocess

    def model_scales(self) -> Embeddings:
        """The model's exp'd `logit_scale`, and its `logit_bias` where it has one (SigLIP), as
        `embed` outputs (0-dim: accumulation gives their gradient once)."""
        scales = {"logit_scale": self.model.logit_scale.exp()}
        bias = getattr(self.model, "logit_bias", None)  # open_clip sets it to None when unused
        if bias is not None:
            scales["logit_bias"] = bias
        return scales

    @classmethod
    def check_objectives(cls, loss: str, distilled: bool) -> None:
        """ConfigError for a loss / distillation this method cannot train with (checked before
        the run writes anything, from the class alone)."""
        if loss not in CONTRASTIVE_LOSSES:
            raise ConfigError(f"unknown --loss '{loss}' (known: {', '.join(CONTRASTIVE_LOSSES)})")
        if distilled and cls.multi_view:
            raise ConfigError(
                f"--distill-from: method '{cls.name}' trains on several image views; "
                "distillation works with single-view methods (clip, flip, MS-CLIP's clip)"
            )

    @property
    def contrastive_name(self) -> str:
        """The logged name of the contrastive term: `clip_loss` or `siglip_loss`."""
        return f"{self.loss_kind}_loss"

    def contrastive(
        self, image_features: torch.Tensor, text_features: torch.Tensor, emb: Embeddings
    ) -> torch.Tensor:
        """The chosen contrastive loss of normalised features, with the model's scale (and
        bias, for SigLIP) from `emb`."""
        if self.loss_kind == "siglip":
            if "logit_bias" not in emb:
                raise ConfigError("--loss siglip needs a model with a logit bias")
            return siglip_loss(image_features, text_features, emb["logit_scale"], emb["logit_bias"])
        return clip_loss(image_features, text_features, emb["logit_scale"])

    @property
    def views(self) -> ViewSpec:
        return ViewSpec()

    def forward(
        self, batch: dict, embed_only: bool = False, with_teacher: bool = True
    ) -> LossParts | Embeddings:
        """One training step's loss and its named parts (detached scalars) for logging.

        With `embed_only`, `embed(batch)` alone: DDP hooks `forward`, so the gradient-cached
        step reaches `embed` through this flag (a keyword, not a mode attribute, so no state can
        be left switched on). A subclass may override `forward` instead of implementing the
        split; it then trains with `--accum-mode independent` only (see `splits_loss`).
        `with_teacher=False` skips the teacher (exact accumulation's pass 2 needs no targets:
        the teacher runs once per micro-batch, in pass 1)."""
        emb = self.embed(batch)
        if self.teacher is not None and with_teacher:
            student = self.student_preprocess
            emb.update(self.teacher.embed(batch["image"], batch["text"], student))
        return emb if embed_only else self.objective(emb)

    def objective(self, emb: Embeddings) -> LossParts:
        """The training loss: the method's own (`loss_from_embeddings`), plus the distillation
        term when a teacher is set. What both accumulation modes back-propagate."""
        loss, parts = self.loss_from_embeddings(emb)
        if self.teacher is not None:
            distill = distill_loss(
                emb["image_features"],
                emb["text_features"],
                emb["logit_scale"],
                emb["teacher_image"],
                emb["teacher_text"],
                emb["teacher_scale"],
            )
            loss = loss + self.distill_weight * distill
            parts = {**parts, "distill_loss": distill.detach()}
        return loss, {**parts, "loss": loss.detach()}

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

    def ema_model_state_dict(self, which: str = "ema") -> dict[str, torch.Tensor]:
        """The model's state dict with the EMA weights `which` names in place (export); only where
        `has_ema`."""
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
