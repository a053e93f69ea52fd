"""MS-CLIP: one Transformer shared by image and text (You et al., ECCV 2022, arXiv 2207.12661).

Built from the implementation spec `methods/msclip.md` (taken from the official code at commit
e25daf3); section numbers below are the spec's.

* §1 Sharing. Slots `shared_from..layers-1` share `attn.in_proj_*`, `attn.out_proj` and the whole
  `mlp` between modalities: the text block holds the *same* module objects as the visual block of
  the same slot (index to index), so every shared tensor appears once in `parameters()`. All
  LayerNorms stay per modality (`share_layernorm=True` also ties `ln_1`/`ln_2`: the ablation).
  Text keeps its causal mask in every block; vision has none. The text tower is as wide as ViT-B.
* §2 Early specialisation. Vision slot 0 is a residual conv stem that also replaces the patch
  embedding (so the visual tower has `layers - 1` blocks); text slot 0 is a text-only block.
* §3 Efficient parallel branch. A 5-stage CNN on the raw image; before each visual slot in
  `lateral_slots` the next stage runs and a lateral adapter *replaces* the tokens with
  `LN(BN(DW3x3(patches)) + PW(BN(DWk(branch))))` and the CLS token with `LN(2 * CLS)` (§3.4; no
  identity term). Stem, branch and adapters live in `clipkit.models.msclip_layers`.
* §1.5 / §7.10 LayerNorm eps 1e-12 computed in fp32; QuickGELU; initialisation as the official
  `_init_weights` nesting: Linear/Conv trunc_normal(0.02), `in_proj_weight` xavier_uniform,
  `token_embedding` N(0, 1), text positional embedding and projection trunc_normal(0.02), visual
  CLS / positional embedding / proj `width**-0.5 * randn`, norms 1/0.

Inferred or generalised here (not in the official code):
* `logit_scale` starts at log(1/0.07) like open_clip (the official code starts at 1.0, §6.1;
  set `init_logit_scale=1.0` to match it). The clamp belongs to the caller, as in open_clip.
* Stem and branch strides and the lateral kernels are config values, not fixed for 224 px: the
  lateral kernel of stage k is `patch_size / (cumulative branch stride up to k)`, which gives the
  released [16, 8, 4, 2, 1] (B/32) and [8, 4, 2, 1, 1] (B/16). Several fusions may precede the
  same slot (`lateral_slots` non-decreasing) so tiny models with few layers keep all 5 stages.
* Text shorter than `context_length` uses the first positions (the official model needs 77).
* Shared-parameter LR/WD (§6.1, `CUSTOM.LR_SHARE` / `WD_SHARE`: B/32 1e-4 / 0.2, B/16 1.6e-3 /
  0.2, per GPU, scaled by world size like `TRAIN.LR` 1e-4 / `WD` 0.05) are presumably an optimizer
  group of the shared parameters: `MSCLIP.shared_parameters()` gives them to clipkit's optimizer.
  Weight decay follows clipkit's rule (none on biases, LN/BN, embeddings, logit_scale); the
  official builder is not released (its no-decay names: positional_embedding, token_embedding,
  logit_scale, + bn/bias/ln by WITHOUT_WD_LIST).
* The `-branch` presets (parallel branch without early specialisation) are the spec's §4.3 recipe.
  Official weight files load through `MSCLIP.load_weights_file` (clipkit.models.msclip_official).
* Gradient checkpointing covers transformer blocks only, never BatchNorm (re-running BN in
  training mode would update its running statistics twice).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipkit.config import ConfigError
from clipkit.models import msclip_official
from clipkit.models.msclip_layers import (
    ConvStem,
    LateralAdapter,
    LayerNorm,
    QuickGELU,
    branch_stages,
    channels,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official eval normalisation (§6.1), not CLIP's
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MSCLIPConfig:
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32  # total stride from pixels to the token grid
    width: int = 768  # both modalities (text is widened to the ViT width, §1.3)
    layers: int = 12  # slots; with early specialisation slot 0 is the stem / a text-only block
    heads: int = 12
    mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    share_layernorm: bool = False  # ablation: also tie ln_1 / ln_2 of shared slots
    early_specialization: bool = True  # vision conv stem in slot 0, text block 0 private
    parallel_branch: bool = True  # parallel CNN + lateral adapters (vision only)
    shared_from: int = 1  # first shared slot (official N_LAYERS=1; -1 there means 0 here)
    stem_strides: tuple[int, ...] = (2, 2, 2, 2, 2)  # first conv + 4 residual blocks
    branch_strides: tuple[int, ...] = (2, 2, 2, 2, 2)  # 5 branch stages
    lateral_slots: tuple[int, ...] = (2, 4, 6, 8, 10)  # visual slot each stage fuses before
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # a learnable bias on the logits (SigLIP) when set
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML/JSON give lists; keep the config hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"msclip config: {msg}")

        check(self.width % self.heads == 0, f"width {self.width} not divisible by heads")
        check(self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size")
        check(0 <= self.shared_from <= self.layers, "shared_from must be in [0, layers]")
        check(
            not self.early_specialization or self.shared_from >= 1,
            "early_specialization makes slot 0 modality-specific: use shared_from >= 1",
        )
        if self.early_specialization or self.parallel_branch:
            check(self.width % 32 == 0, "the conv stem/branch need width divisible by 32")
        if self.early_specialization:
            check(
                len(self.stem_strides) == 5 and math.prod(self.stem_strides) == self.patch_size,
                f"stem_strides {self.stem_strides}: 5 strides whose product is patch_size",
            )
        if self.parallel_branch:
            first = 1 if self.early_specialization else 0
            slots = self.lateral_slots
            check(
                len(self.branch_strides) == 5 and math.prod(self.branch_strides) == self.patch_size,
                f"branch_strides {self.branch_strides}: 5 strides whose product is patch_size",
            )
            check(
                len(slots) == 5
                and list(slots) == sorted(slots)
                and first <= slots[0]
                and slots[-1] < self.layers,
                f"lateral_slots {slots}: 5 non-decreasing visual slots in [{first}, layers)",
            )

    def to_dict(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict) -> MSCLIPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"msclip config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


_B32 = MSCLIPConfig()
_TINY_SIZES = dict(embed_dim=64, image_size=32, patch_size=8, width=64, layers=4, heads=4)
_TINY = MSCLIPConfig(  # CPU tests and the demo: 4 slots of width 64 on 32 px images
    **_TINY_SIZES,
    context_length=16,
    stem_strides=(2, 2, 2, 1, 1),
    branch_strides=(2, 2, 2, 1, 1),
    lateral_slots=(1, 1, 2, 2, 3),
)
# the paper's ablation ladder (§4.3): fully shared -> + modality LN -> + early spec. -> MS-CLIP-S
_NOTHING_SPECIFIC = dict(early_specialization=False, parallel_branch=False, shared_from=0)
_VARIANTS = {
    "shared": dict(share_layernorm=True, **_NOTHING_SPECIFIC),
    "ln": _NOTHING_SPECIFIC,
    "early": dict(parallel_branch=False),
    "branch": dict(early_specialization=False, shared_from=0),  # parallel branch only
}
PRESETS: dict[str, MSCLIPConfig] = {
    "msclip-b32": _B32,
    "msclip-b16": dataclasses.replace(
        _B32, patch_size=16, stem_strides=(2, 2, 2, 2, 1), branch_strides=(2, 2, 2, 2, 1)
    ),
    **{f"msclip-b32-{k}": dataclasses.replace(_B32, **kw) for k, kw in _VARIANTS.items()},
    "msclip-tiny": _TINY,  # CPU tests and the demo
    **{f"msclip-tiny-{k}": dataclasses.replace(_TINY, **kw) for k, kw in _VARIANTS.items()},
}


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, computed by SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, N, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-LN block; `attn`, `mlp` (and LNs) may be objects another modality's block holds too."""

    def __init__(self, attn: Attention, mlp: nn.Sequential, ln_1: LayerNorm, ln_2: LayerNorm):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2 = attn, ln_1, mlp, ln_2

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


def _new_block(cfg: MSCLIPConfig) -> Block:
    hidden = int(cfg.width * cfg.mlp_ratio)
    mlp = nn.Sequential(
        OrderedDict(
            c_fc=nn.Linear(cfg.width, hidden), gelu=QuickGELU(), c_proj=nn.Linear(hidden, cfg.width)
        )
    )
    return Block(Attention(cfg.width, cfg.heads), mlp, LayerNorm(cfg.width), LayerNorm(cfg.width))


class MSCLIPVisual(nn.Module):
    """The image path: stem or patch embedding, CLS + positions, blocks with lateral fusions."""

    def __init__(self, cfg: MSCLIPConfig):
        super().__init__()
        W, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.image_size = (cfg.image_size, cfg.image_size)
        self.output_dim = cfg.embed_dim
        self.image_mean, self.image_std = cfg.image_mean, cfg.image_std
        self.first_slot = 1 if cfg.early_specialization else 0
        if cfg.early_specialization:
            self.stem = ConvStem(W, cfg.stem_strides)
        else:
            self.conv1 = nn.Conv2d(3, W, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(W))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, W))
        self.ln_pre = LayerNorm(W)
        self.blocks = nn.ModuleList(_new_block(cfg) for _ in range(self.first_slot, cfg.layers))
        self.lateral_slots = cfg.lateral_slots if cfg.parallel_branch else ()
        if cfg.parallel_branch:
            self.branch = branch_stages(W, cfg.branch_strides)
            strides = list(math.prod(cfg.branch_strides[: k + 1]) for k in range(5))
            self.adapters = nn.ModuleList(
                LateralAdapter(c, W, cfg.patch_size // s)
                for c, s in zip(channels(W), strides, strict=True)
            )
        self.ln_post = LayerNorm(W)
        self.proj = nn.Parameter(torch.empty(W, cfg.embed_dim))
        self.heads = cfg.heads
        self.image_pool: nn.Module | None = None  # patch-token pooling; None: [CLS] (pooling.py)
        self.grad_checkpointing = False

    def forward_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + h*w, width) tokens after the last block."""
        feat = self.stem(image) if self.first_slot else self.conv1(image)  # (B, W, h, w)
        B, W, h, w = feat.shape
        if h * w + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"image {tuple(image.shape[-2:])} gives a {h}x{w} grid; "
                f"this model expects {self.image_size}"
            )
        cls = self.class_embedding.to(feat.dtype).expand(B, 1, W)
        x = torch.cat([cls, feat.flatten(2).transpose(1, 2)], dim=1) + self.positional_embedding
        x = self.ln_pre(x)  # (B, N, W)
        branch, k = image, 0  # the branch starts from the raw image, not the stem (§3.2)
        for slot, blk in enumerate(self.blocks, start=self.first_slot):
            while k < len(self.lateral_slots) and self.lateral_slots[k] == slot:
                branch = self.branch[k](branch)
                x = self.adapters[k](branch, x, (h, w))
                k += 1
            x = _run_block(blk, x, False, self.grad_checkpointing)
        return x

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(image)  # (B, 1 + N, width)
        if self.image_pool is None:
            return self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim)
        return self.image_pool(self.ln_post(x[:, 1:])) @ self.proj


def _run_block(blk: Block, x: torch.Tensor, causal: bool, ckpt: bool) -> torch.Tensor:
    if ckpt and torch.is_grad_enabled():
        return checkpoint(blk, x, causal, use_reentrant=False)
    return blk(x, causal)


class MSCLIP(nn.Module):
    """MS-CLIP with open_clip.CLIP's interface (encode_image / encode_text / dict forward)."""

    def __init__(self, cfg: MSCLIPConfig):
        super().__init__()
        self.config = cfg
        self.context_length, self.vocab_size = cfg.context_length, cfg.vocab_size
        self.visual = MSCLIPVisual(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.text_blocks = nn.ModuleList(self._text_block(cfg, s) for s in range(cfg.layers))
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.logit_bias = None if cfg.init_logit_bias is None else nn.Parameter(torch.empty(()))
        self.grad_checkpointing = False
        self.init_weights()

    def _text_block(self, cfg: MSCLIPConfig, slot: int) -> Block:
        if slot < cfg.shared_from:
            return _new_block(cfg)
        v = self.visual.blocks[slot - self.visual.first_slot]  # index-to-index pairing (§1.1)
        if cfg.share_layernorm:
            return Block(v.attn, v.mlp, v.ln_1, v.ln_2)
        return Block(v.attn, v.mlp, LayerNorm(cfg.width), LayerNorm(cfg.width))

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (§7.10); shared modules are visited once."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Attention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        nn.init.trunc_normal_(self.text_projection, std=0.02)
        scale = self.config.width**-0.5
        for p in (self.visual.class_embedding, self.visual.positional_embedding, self.visual.proj):
            nn.init.normal_(p, std=scale)
        self.logit_scale.fill_(self.config.init_logit_scale)
        if self.logit_bias is not None:
            self.logit_bias.fill_(self.config.init_logit_bias)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The tensors both towers use, each once (clipkit's optimizer gives them their own
        lr / weight decay: `--shared-lr`, `--shared-weight-decay`)."""
        text_ids = {id(p) for p in self.text_blocks.parameters()}
        return [p for p in self.visual.parameters() if id(p) in text_ids]

    def load_weights_file(self, path: str):
        """Load a clipkit or official MS-CLIP weights file (layout detected by its keys); both
        stored copies of a shared tensor must be equal. Raises ConfigError on any mismatch."""
        return msclip_official.load_weights_file(self, path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = self.visual.grad_checkpointing = enable

    def forward_text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, width) after the last (causal) block."""
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        for blk in self.text_blocks:
            x = _run_block(blk, x, True, self.grad_checkpointing)
        return x

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.forward_text_tokens(text)
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # EOT: highest id
        features = self.ln_final(x) @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict:
        out = {
            "image_features": self.encode_image(image, True) if image is not None else None,
            "text_features": self.encode_text(text, True) if text is not None else None,
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:  # as open_clip's CLIP returns it
            out["logit_bias"] = self.logit_bias
        return out


def shared_parameter_names(model: MSCLIP) -> list[str]:
    """Names (as `named_parameters()` gives them: under `visual.`) of tensors both towers use."""
    text_ids = {id(p) for p in model.text_blocks.parameters()}
    return [n for n, p in model.visual.named_parameters(prefix="visual") if id(p) in text_ids]
