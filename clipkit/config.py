"""Typed configuration of a training run: defaults <- YAML file <- CLI flags, validated up front,
saved as RUN_DIR/config.yaml and inside every checkpoint (no `getattr(cfg, 'X', default)`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the CLI prints it on one line and exits 2."""


@dataclass
class DataConfig:
    data: str = ""  # a directory of *.tar, a brace pattern, or sources joined by '::'
    batch_size: int = 64  # per rank
    workers: int = 2
    train_num_samples: int | None = None  # samples per epoch; else sizes.json next to the shards
    resampled: bool = False  # sample shards with replacement
    shuffle_buffer: int = 1000
    image_key: str = "jpg;jpeg;png;webp"
    text_key: str = "txt"
    max_bad_fraction: float = 0.01  # stop when more than this share of samples is unusable
    max_pixels: int = 89_478_485  # larger images are skipped (decompression-bomb guard)
    stall_timeout: float = 600.0  # seconds without a batch before the run stops (workers >= 1)


@dataclass
class ModelConfig:
    name: str = "tiny"  # a clipkit preset, an open_clip model name, or a JSON config file
    pretrained: str | None = None  # local open_clip weights file
    image_size: int | None = None  # override the architecture's image size
    context_length: int | None = None  # override the text context length
    grad_checkpointing: bool = False
    image_pool: str = "cls"  # cls | avg | max | gem | ggem | attn (clipkit.models.pooling)
    text_tower: str | None = None  # hf:LOCAL_DIR: a Hugging Face text encoder
    lock_image: bool = False  # LiT: freeze the image tower...
    lock_image_unlocked_layers: int = 0  # ...except its last N blocks
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    arch: dict = field(default_factory=dict)  # resolved architecture; filled in by models.build


@dataclass
class MethodConfig:
    name: str = "clip"  # clip | flip | aclip | aclip-eff | attmask-high
    mask_ratio: float = 0.5  # FLIP: share of patch tokens removed at random
    keep_ratio: float = 0.5  # A-CLIP: share of 2x2 patch blocks kept
    num_views: int = 2  # A-CLIP: online views per sample
    clip_weight: float = 1.0  # total weight of the per-view CLIP losses (split over views)
    simclr_weight: float = 1.0
    byol_weight: float = 2.0
    simclr_temperature: float = 0.1
    ema_momentum: float = 0.996  # start of the cosine momentum schedule (ends at ema_momentum_end)
    ema_momentum_end: float = 1.0
    attentive: bool = True  # A-CLIP: select by teacher attention (False: random blocks)
    ssl_hidden_dim: int = 4096  # A-CLIP SimCLR/BYOL head widths (the paper's 4096 / 256)
    ssl_embed_dim: int = 256


@dataclass
class OptimConfig:
    lr: float = 5e-4
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = 1.0  # max global grad norm; None disables
    schedule: str = "cosine"  # cosine | constant
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    # MS-CLIP: parameters both modalities use get their own lr / weight decay (LR_SHARE, WD_SHARE
    # of the released configs); None = same as the rest.
    shared_lr: float | None = None
    shared_weight_decay: float | None = None


@dataclass
class RunConfig:
    out: str = ""
    steps: int | None = None  # optimizer steps; or derive from samples
    samples: int | None = None  # samples seen (over all ranks)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    save_every: int = 1000  # steps between checkpoints
    log_every: int = 10
    keep_last: int | None = None  # step checkpoints to keep (None: all)
    compile: bool = False
    threads: int | None = None  # torch CPU threads per process (None: cores / local ranks)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        cfg = cls()
        merge(cfg, d)
        return cfg


SECTIONS = {f.name for f in fields(Config)}


def merge(cfg: Config, updates: dict[str, Any]) -> Config:
    """Apply nested `{section: {key: value}}` updates; unknown keys are user errors."""
    for section, values in updates.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' (known: {sorted(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        target = getattr(cfg, section)
        known = {f.name for f in fields(target)}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"unknown option '{section}.{key}' (known: {sorted(known)})")
            setattr(target, key, value)
    return cfg


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (data, model, ...)")
    return data


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> Config:
    """Catch every option mistake before any work starts."""
    d, r, o, m = cfg.data, cfg.run, cfg.optim, cfg.method
    _check(bool(d.data), "no training data: pass --data DIR_OR_PATTERN")
    _check(bool(r.out), "no run directory: pass --out RUN_DIR")
    _check(d.batch_size >= 1, "--batch-size must be >= 1")
    _check(d.workers >= 0, "--workers must be >= 0")
    _check(d.shuffle_buffer >= 0, "shuffle buffer must be >= 0")
    _check(0 <= d.max_bad_fraction <= 1, "--max-bad-fraction must be within [0, 1]")
    _check(d.stall_timeout > 0, "--stall-timeout must be > 0")
    _check(d.max_pixels > 0, "--max-pixels must be > 0")
    _check(
        d.train_num_samples is None or d.train_num_samples > 0, "--train-num-samples must be > 0"
    )
    _check(
        (r.steps is None) != (r.samples is None),
        "give exactly one of --steps or --samples",
    )
    _check(r.steps is None or r.steps >= 1, "--steps must be >= 1")
    _check(r.samples is None or r.samples >= 1, "--samples must be >= 1")
    _check(r.save_every >= 1, "--save-every must be >= 1")
    _check(r.log_every >= 1, "--log-every must be >= 1")
    _check(r.keep_last is None or r.keep_last >= 1, "--keep-last must be >= 1")
    _check(r.precision in ("auto", "fp32", "bf16", "fp16"), "--precision: auto|fp32|bf16|fp16")
    _check(
        r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"),
        "--device must be auto, cpu, cuda or cuda:N",
    )
    _check(o.lr > 0, "--lr must be > 0")
    _check(o.warmup >= 0, "--warmup must be >= 0")
    _check(o.weight_decay >= 0, "--weight-decay must be >= 0")
    _check(o.schedule in ("cosine", "constant"), "--schedule must be cosine or constant")
    _check(o.accum_steps >= 1, "--accum-steps must be >= 1")
    _check(o.grad_clip is None or o.grad_clip > 0, "--grad-clip must be > 0")
    _check(0 <= m.mask_ratio < 1, "--mask-ratio must be within [0, 1)")
    _check(0 < m.keep_ratio <= 1, "--keep-ratio must be within (0, 1]")
    _check(m.num_views in (1, 2), "--num-views must be 1 or 2")
    _check(m.ssl_hidden_dim >= 1 and m.ssl_embed_dim >= 1, "SSL head sizes must be >= 1")
    _check(o.shared_lr is None or o.shared_lr > 0, "--shared-lr must be > 0")
    _check(
        o.shared_weight_decay is None or o.shared_weight_decay >= 0,
        "--shared-weight-decay must be >= 0",
    )
    _check(0 <= m.ema_momentum <= m.ema_momentum_end <= 1, "EMA momentum: 0 <= start <= end <= 1")
    return cfg
