"""Settings of FLIP and the A-CLIP family (aclip, aclip-eff, attmask-high), torch-free so the CLI
builds their flags and help without importing torch. The methods live in methods/aclip.py."""

from __future__ import annotations

from dataclasses import dataclass

from clipkit.config import ConfigError
from clipkit.method_config import setting


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class FLIPSettings:
    mask_ratio: float = setting(0.5, "share of patch tokens removed (0.5).")

    def check(self) -> None:
        _check(0 <= self.mask_ratio < 1, "--mask-ratio must be within [0, 1)")


@dataclass
class ACLIPSettings:
    keep_ratio: float = setting(0.5, "share of 2x2 patch blocks kept (0.5).")
    num_views: int = setting(2, "online views per sample (1 or 2).")
    # The CLIP weight is split over the views (0.5 each for two).
    clip_weight: float = setting(1.0, "total CLIP-loss weight over views.")
    simclr_weight: float = setting(1.0, "SimCLR loss weight (0 = off).")
    byol_weight: float = setting(2.0, "BYOL loss weight (0 = off).")
    simclr_temperature: float = setting(0.1, "SimCLR softmax temperature.", cli=False)
    # A cosine schedule from ema_momentum to ema_momentum_end over the run.
    ema_momentum: float = setting(0.996, "start of the EMA momentum schedule.")
    ema_momentum_end: float = setting(1.0, "end of the EMA momentum schedule.", cli=False)
    attentive: bool = setting(
        True,
        "choose blocks by teacher attention (default) or at random (ablation).",
        flag="--attentive/--random-blocks",
    )
    # The official code also keeps an EMA of the text transformer and projection, used only by its
    # evaluation (eval_zeroshot.py pairs both EMA towers): `--weights ema-both` needs it.
    ema_text: bool = setting(
        False,
        "also keep an EMA of the text tower (as the official code does), for --weights ema-both.",
        flag="--ema-text/--no-ema-text",
    )
    # The paper's SimCLR/BYOL head widths.
    ssl_hidden_dim: int = setting(4096, "hidden width of the SimCLR/BYOL heads (4096).")
    ssl_embed_dim: int = setting(256, "output width of the SSL heads (256).")

    def check(self) -> None:
        _check(0 < self.keep_ratio <= 1, "--keep-ratio must be within (0, 1]")
        _check(self.num_views in (1, 2), "--num-views must be 1 or 2")
        _check(self.ssl_hidden_dim >= 1 and self.ssl_embed_dim >= 1, "SSL head sizes must be >= 1")
        _check(
            0 <= self.ema_momentum <= self.ema_momentum_end <= 1,
            "EMA momentum: 0 <= start <= end <= 1",
        )
