"""A-CLIP (Yang et al., ICCV 2023, arXiv 2212.08653) and the baselines it is measured against.

- `aclip`: an EMA copy of the image tower scores patches by its [CLS] attention on a wide teacher
  view (Sec. 3.2); the score is resampled onto each online view through its crop box, averaged
  over 2x2-patch blocks, and the online tower sees [CLS] + the top blocks only. Losses (Sec. 3.3):
  CLIP per masked view, SimCLR between the two masked views, BYOL from each view to the EMA
  projection of the teacher view; EMA momentum on a cosine schedule. The intended behaviour of
  /work/shared/methods/aclip.md is implemented, not the released bugs (SimCLR compared view 1 with
  itself; the teacher crop could miss parts of the views).
- `aclip-eff` (Sec. 4.2): the teacher sees a half-resolution view (its position table resampled).
- `attmask-high` (Table 2b): keep the least attended blocks instead (AttMask-style masking).
FLIP, their random-removal baseline, is clipkit.methods.flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.config import ConfigError, MethodConfig
from clipkit.data.views import ViewSpec
from clipkit.losses import byol_loss, nt_xent
from clipkit.methods import register
from clipkit.methods.aclip_settings import ACLIPSettings
from clipkit.methods.base import Embeddings, LossParts, Method, scale_parts
from clipkit.methods.ema import ema_momentum, ema_update, frozen_copy
from clipkit.methods.ema_eval import EMAImageCLIP, text_tower, with_parts
from clipkit.models.vit import cls_attention, forward_kept, patch_grid, require_vit

BLOCK = 2  # A-CLIP keeps 2x2-patch blocks (one score per 32x32 px at patch 16)


def map_scores_to_views(
    scores: torch.Tensor,  # (B, r_t, c_t) teacher patch scores
    boxes: torch.Tensor,  # (B, V, 4) each view's (x0, y0, x1, y1) in teacher-normalised coords
    grid: tuple[int, int],  # the online views' patch grid (rows, cols)
) -> torch.Tensor:
    """(B, V, rows, cols): the teacher map sampled at the centre of every online patch.

    Inside the teacher crop the map is bilinear with edge replication, outside it is 0, which is
    what the released code's upsample -> zero-padded crop -> resize computes (spec Sec. 1.2).
    (`roi_align` would instead replicate the edge half a cell past the crop, hence grid_sample.)
    """
    batch, views = boxes.shape[:2]
    rows, cols = grid
    dev = scores.device
    u = (torch.arange(cols, device=dev, dtype=torch.float32) + 0.5) / cols  # (cols,) view coords
    v = (torch.arange(rows, device=dev, dtype=torch.float32) + 0.5) / rows
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # (B, V) each
    xs = (x0[..., None] + u * (x1 - x0)[..., None])[:, :, None, :].expand(-1, -1, rows, -1)
    ys = (y0[..., None] + v * (y1 - y0)[..., None])[:, :, :, None].expand(-1, -1, -1, cols)
    points = torch.stack([xs, ys], dim=-1).reshape(batch, views * rows, cols, 2)  # in [0, 1]
    sampled = F.grid_sample(
        scores[:, None].float(),
        2 * points - 1,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )  # (B, 1, V*rows, cols)
    inside = ((points >= 0) & (points <= 1)).all(dim=-1)  # (B, V*rows, cols)
    return (sampled[:, 0] * inside).view(batch, views, rows, cols)


def block_scores(patch_scores: torch.Tensor) -> torch.Tensor:
    """(M, rows, cols) -> (M, ceil(rows/2), ceil(cols/2)) block means; on an odd grid the last
    block row/column averages the patches it has (bilinear 2x downsampling = 2x2 mean when even)."""
    return F.avg_pool2d(patch_scores[:, None], BLOCK, ceil_mode=True)[:, 0]


def kept_block_count(num_blocks: int, keep_ratio: float) -> int:
    """The released rule: `int(n * ratio) + 1` blocks (25 of 49 at 0.5), at most all of them."""
    return min(num_blocks, int(num_blocks * keep_ratio) + 1)


def keep_blocks(
    blocks: torch.Tensor, grid: tuple[int, int], keep_ratio: float, highest: bool = True
) -> torch.Tensor:
    """(M, br, bc) block scores -> (M, K) sorted row-major patch indices of the kept blocks.

    Blocks are ranked by score (ties: lower block index first) and the best are kept, the
    least-scored ones when `highest` is False. Every sample keeps the same K tokens:
    K = round(rows*cols * kept_blocks / blocks), i.e. 4 per kept block on even grids; on odd grids
    the last kept block may be cut (its patches then go in row-major order).
    """
    rows, cols = grid
    num, block_rows, block_cols = blocks.shape
    n_blocks = block_rows * block_cols
    n_keep = round(rows * cols * kept_block_count(n_blocks, keep_ratio) / n_blocks)
    dev = blocks.device
    order = blocks.reshape(num, n_blocks).argsort(dim=1, descending=highest, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_blocks, device=dev).expand(num, -1))  # (M, n_blocks)
    r, c = torch.arange(rows, device=dev), torch.arange(cols, device=dev)
    patch_block = ((r // BLOCK)[:, None] * block_cols + (c // BLOCK)[None, :]).flatten()  # (N,)
    within = ((r % BLOCK)[:, None] * BLOCK + (c % BLOCK)[None, :]).flatten()  # (N,)
    key = rank[:, patch_block] * BLOCK * BLOCK + within  # (M, N): unique, grouped by block rank
    return key.argsort(dim=1)[:, :n_keep].sort(dim=1).values


def _sample_major(x: torch.Tensor, num_views: int) -> torch.Tensor:
    """(V*B, E) view-major -> (B, V, E), so micro-batches concatenate on dim 0 (`.transpose(0,
    1).contiguous()` turns it back into the exact layout the losses are computed on)."""
    return x.view(num_views, -1, x.shape[-1]).transpose(0, 1)


def vit_tower(model: nn.Module):
    """The model's open_clip ViT image tower; any other tower is a user error (exit 2)."""
    try:
        return require_vit(model.visual)
    except TypeError as e:
        raise ConfigError(f"{e} (token-removal methods need a ViT image tower)") from None


def _mlp(dims: list[int], bias: bool) -> nn.Sequential:
    """Linear(+BN+ReLU) layers, the last one plain (SLIP/BYOL heads)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ACLIPMethod(Method):
    """A-CLIP and its ablations. The model must have an open_clip `VisionTransformer` as `.visual`.

    Args:
        settings: keep_ratio, num_views, loss weights, SimCLR temperature, EMA schedule,
            attentive, SSL head sizes (spec: 4096 and 256, fixed in the paper).
        model: an open_clip CLIP-like model (`visual`, `encode_text`, `logit_scale`).
        teacher_resolution: teacher view side / online view side (0.5 for A-CLIP-eff).
        keep_highest: keep the most attended blocks (False: the least, `attmask-high`).
        freeze_patch_embed: keep the patch embedding at its initial value (MoCo v3 trick, spec
            Sec. 6); the teacher copy follows it through the EMA, so it stays identical.
    """

    name = "aclip"
    settings_class = ACLIPSettings
    has_ema = True  # per instance: only when a teacher is kept (attentive choice or BYOL)
    has_token_masks = True
    multi_view = True

    def __init__(
        self,
        settings: ACLIPSettings,
        model: nn.Module,
        *,
        teacher_resolution: float = 1.0,
        keep_highest: bool = True,
        freeze_patch_embed: bool = True,
    ):
        super().__init__(model)
        visual = vit_tower(model)
        cfg = self.settings = settings
        ssl_hidden_dim, ssl_embed_dim = cfg.ssl_hidden_dim, cfg.ssl_embed_dim
        if cfg.num_views == 1 and cfg.simclr_weight > 0:
            raise ConfigError("SimCLR needs two views: pass --simclr-weight 0 with --num-views 1")
        if max(cfg.clip_weight, cfg.simclr_weight, cfg.byol_weight) <= 0:
            raise ConfigError("A-CLIP needs at least one loss weight > 0")
        self.keep_highest = keep_highest
        # With no CLIP loss the text tower, logit scale and image projection get no gradient; DDP
        # must then be told to look for unused parameters (the trainer reads this flag).
        self.has_unused_parameters = cfg.clip_weight <= 0
        self.grid = tuple(visual.grid_size)
        self.teacher_size = round(visual.image_size[0] * teacher_resolution)
        if self.teacher_size % visual.patch_size[0]:
            raise ConfigError(
                f"teacher view {self.teacher_size}px is not a whole number of "
                f"{visual.patch_size[0]}px patches; pick an image size that halves cleanly"
            )
        if freeze_patch_embed:
            visual.conv1.requires_grad_(False)
        width = visual.ln_post.normalized_shape[0]  # the pooled token's size (head input)
        self.simclr_head = None
        if cfg.simclr_weight > 0:
            self.simclr_head = _mlp([width, ssl_hidden_dim, ssl_hidden_dim, ssl_embed_dim], True)
        self.byol_projector = self.byol_predictor = self.teacher_projector = None
        if cfg.byol_weight > 0:
            self.byol_projector = _mlp([width, ssl_hidden_dim, ssl_embed_dim], bias=False)
            self.byol_predictor = _mlp([ssl_embed_dim, ssl_hidden_dim, ssl_embed_dim], bias=False)
            self.teacher_projector = frozen_copy(self.byol_projector)
        needs_teacher = cfg.attentive or cfg.byol_weight > 0
        self.teacher_visual = frozen_copy(visual) if needs_teacher else None
        self.has_ema = needs_teacher
        self.teacher_text = self._text_ema(model) if needs_teacher and cfg.ema_text else None
        # Kept in state_dict so a resumed run knows where the schedule stood.
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_momentum_now", torch.tensor(float(cfg.ema_momentum)))

    @staticmethod
    def _text_ema(model: nn.Module) -> nn.Module:
        """A frozen copy of what the official code EMA's on the text side: the transformer and
        the text projection (token / positional embeddings and `ln_final` stay shared)."""
        if not isinstance(getattr(model, "text_projection", None), nn.Parameter):
            raise ConfigError("--ema-text needs open_clip's built-in text tower (not --text-tower)")
        return frozen_copy(text_tower(model))

    @property
    def views(self) -> ViewSpec:
        return ViewSpec(
            online_views=self.settings.num_views, teacher_size=self.teacher_size, augment="aclip"
        )

    @torch.no_grad()
    def select_tokens(self, batch: dict) -> dict[str, torch.Tensor | None]:
        """The teacher pass and token choice: `keep_idx` (V, B, K) patch indices per view, and
        `attention` (B, r_t, c_t), `view_scores` (V, B, rows, cols), `teacher_pooled` (B, width)
        where computed (None otherwise)."""
        views = batch["views"]  # (V, B, 3, S, S)
        num_views, batch_size = views.shape[:2]
        out: dict[str, torch.Tensor | None] = dict(attention=None, view_scores=None)
        out["teacher_pooled"] = None
        teacher_image = batch["teacher_image"]
        if self.settings.attentive:
            scores, out["teacher_pooled"] = cls_attention(
                self.teacher_visual, teacher_image, return_pooled=True
            )
            attention = scores.view(batch_size, *patch_grid(self.teacher_visual, teacher_image))
            view_scores = map_scores_to_views(attention, batch["boxes"], self.grid)  # (B,V,r,c)
            out["attention"], out["view_scores"] = attention, view_scores.transpose(0, 1)
            blocks = block_scores(out["view_scores"].flatten(0, 1))  # (V*B, br, bc)
        else:
            if self.byol_projector is not None:
                _, out["teacher_pooled"] = forward_kept(
                    self.teacher_visual, teacher_image, None, return_pooled=True
                )
            shape = (num_views * batch_size, -(-self.grid[0] // BLOCK), -(-self.grid[1] // BLOCK))
            blocks = torch.rand(shape, device=views.device)  # random blocks (Table 2a)
        keep = keep_blocks(blocks, self.grid, self.settings.keep_ratio, self.keep_highest)
        out["keep_idx"] = keep.view(num_views, batch_size, -1)
        return out

    def embed(self, batch: dict) -> Embeddings:
        """Token choice, online towers, heads: (B, V, E) `image_features`, `simclr`,
        `byol_prediction`, (B, E) `text_features`, `byol_target` (the EMA teacher's, no grad),
        `logit_scale`. The heads' BatchNorm sees both views of this batch: one micro-batch
        under accumulation, as DDP keeps it per rank."""
        cfg = self.settings
        views = batch["views"]  # (V, B, 3, S, S)
        num_views = views.shape[0]
        if num_views != cfg.num_views:
            raise ValueError(f"batch has {num_views} views, method expects {cfg.num_views}")
        selection = self.select_tokens(batch)
        keep_idx = selection["keep_idx"].flatten(0, 1)  # (V*B, K), view-major like the images
        features, pooled = forward_kept(
            self.model.visual, views.flatten(0, 1), keep_idx, return_pooled=True
        )  # (V*B, E), (V*B, width)
        emb: dict[str, torch.Tensor] = {}
        if cfg.clip_weight > 0:
            emb["image_features"] = _sample_major(F.normalize(features, dim=-1), num_views)
            emb["text_features"] = self.model.encode_text(batch["text"], normalize=True)  # once
            emb.update(self.model_scales())
        if self.simclr_head is not None:
            emb["simclr"] = _sample_major(self.simclr_head(pooled), num_views)  # BN: both views
        if self.byol_projector is not None:
            with torch.no_grad():
                emb["byol_target"] = self.teacher_projector(selection["teacher_pooled"])
            prediction = self.byol_predictor(self.byol_projector(pooled))  # (V*B, E_ssl)
            emb["byol_prediction"] = _sample_major(prediction, num_views)
        return emb

    def loss_from_embeddings(self, emb: Embeddings) -> LossParts:
        """CLIP per view, SimCLR between views over all of `emb` (gathered); BYOL's mean."""
        cfg, num_views = self.settings, self.settings.num_views
        loss = next(v for v in emb.values() if v.ndim).new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        if cfg.clip_weight > 0:
            image_features = emb["image_features"].transpose(0, 1).contiguous()  # (V, B, E)
            text_features, name = emb["text_features"], self.contrastive_name
            parts = [
                self.contrastive(image_features[v], text_features, emb) for v in range(num_views)
            ]
            loss = loss + cfg.clip_weight * torch.stack(parts).mean()  # 0.5 each for 2 views
            metrics.update({f"{name}_view{v}": p.detach() for v, p in enumerate(parts)})
            metrics[name] = torch.stack(parts).mean().detach()
            metrics.update(scale_parts(emb))
        if "simclr" in emb:
            z = emb["simclr"].transpose(0, 1).contiguous()
            simclr = nt_xent(z[0], z[1], cfg.simclr_temperature)
            loss = loss + cfg.simclr_weight * simclr
            metrics["simclr_loss"] = simclr.detach()
        if "byol_prediction" in emb:
            prediction = emb["byol_prediction"].transpose(0, 1).flatten(0, 1)  # (V*B, E_ssl)
            byol = byol_loss(prediction, emb["byol_target"].repeat(num_views, 1))
            loss = loss + cfg.byol_weight * byol
            metrics["byol_loss"] = byol.detach()
        metrics["loss"] = loss.detach()
        metrics["ema_momentum"] = self.ema_momentum_now.detach().clone()
        return loss, metrics

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update after optimizer step `step` (1-based count of steps done): momentum
        m(step), the value the released code uses before the next forward (spec Sec. 4)."""
        if self.teacher_visual is None:
            return
        m = ema_momentum(
            step, total_steps, self.settings.ema_momentum, self.settings.ema_momentum_end
        )
        ema_update(self.teacher_visual, self.model.visual, m)
        if self.teacher_text is not None:
            ema_update(self.teacher_text, text_tower(self.model), m)
        if self.teacher_projector is not None:
            ema_update(self.teacher_projector, self.byol_projector, m)
        self.ema_step.fill_(step)
        self.ema_momentum_now.fill_(m)

    def eval_model(self, which: str = "online") -> nn.Module:
        """'online': the trained model. 'ema': open_clip's interface with the EMA image tower and
        the online text tower. 'ema-both': the EMA image and text towers (the official
        eval_zeroshot.py pairing; needs a run trained with `--ema-text`), with the online
        embeddings, `ln_final` and logit scale, which the official code does not EMA either."""
        if which == "online":
            return self.model
        if which == "ema" and self.teacher_visual is not None:
            return EMAImageCLIP(self.model, self.teacher_visual)
        if which == "ema-both" and self.teacher_text is not None:
            return with_parts(self.model, visual=self.teacher_visual, **_text_parts(self))
        if which == "ema-both" and self.teacher_visual is not None:
            raise ConfigError(
                "--weights ema-both needs an EMA text tower: this run was trained without "
                "--ema-text (use --weights ema: the EMA image tower with the online text tower)"
            )
        raise ValueError(f"method '{self.name}' has no '{which}' weights; use 'online' or 'ema'")

    def ema_model_state_dict(self, which: str = "ema") -> dict[str, torch.Tensor]:
        """The online model's state dict with the EMA image tower in `visual.*` (for export), and
        with `ema-both` the EMA text transformer and projection too."""
        state = dict(self.model.state_dict())
        state.update({f"visual.{k}": v for k, v in self.teacher_visual.state_dict().items()})
        if which == "ema-both":
            self.eval_model(which)  # refuses a run without an EMA text tower
            state.update(self.teacher_text.state_dict())
        return state


def _text_parts(method: ACLIPMethod) -> dict[str, nn.Module | nn.Parameter]:
    return {
        "transformer": method.teacher_text.transformer,
        "text_projection": method.teacher_text.text_projection,
    }


def _named(method: Method, name: str) -> Method:
    method.name = name
    return method


@register("aclip", ACLIPMethod)
def _build_aclip(cfg: MethodConfig, model) -> ACLIPMethod:
    return ACLIPMethod(cfg.settings, model)


@register("aclip-eff", ACLIPMethod)
def _build_aclip_eff(cfg: MethodConfig, model) -> ACLIPMethod:
    return _named(ACLIPMethod(cfg.settings, model, teacher_resolution=0.5), "aclip-eff")


@register("attmask-high", ACLIPMethod)
def _build_attmask_high(cfg: MethodConfig, model) -> ACLIPMethod:
    return _named(ACLIPMethod(cfg.settings, model, keep_highest=False), "attmask-high")
