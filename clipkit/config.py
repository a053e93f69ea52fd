"""Typed configuration of a training run: defaults <- YAML file <- CLI flags, validated up front,
saved as RUN_DIR/config.yaml and inside every checkpoint (no `getattr(cfg, 'X', default)`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from clipkit.config_types import ConfigError, converted, field_types
from clipkit.fileio import atomic_write_bytes
from clipkit.method_config import MethodConfig


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
    # The online views' augmentation (clipkit.data.augment): clip | slip | aclip | none; null =
    # the method's own paper pipeline. `photometric` / `crop_scale` override its parts.
    augment: str | None = None
    photometric: bool | None = None
    crop_scale: list[float] | None = None  # [LO, HI] of the crop's share of the image area


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
    # a learnable logit bias (SigLIP) and the logit scale's start; None: the model's own
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    arch: dict = field(default_factory=dict)  # resolved architecture; filled in by models.build


@dataclass
class OptimConfig:
    lr: float = 5e-4
    warmup: int = 100  # steps of linear warmup
    warmup_epochs: float | None = None  # warmup in epochs of the data instead (sets `warmup`)
    warmup_start_lr: float = 0.0  # the lr warmup starts from
    final_lr: float = 0.0  # the lr cosine decays to
    weight_decay: float = 0.2
    wd_rule: str = "clipkit"  # which parameters decay: clipkit | aclip (clipkit.train.optim)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = 1.0  # max global grad norm; None disables
    schedule: str = "cosine"  # cosine | constant
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    accum_mode: str = "exact"  # exact | independent: see clipkit.train.accumulate
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
    report_to: str = "tensorboard"  # comma list of REPORT_TARGETS, or "none"
    wandb_project: str = "clipkit"  # W&B project of --report-to wandb


@dataclass
class EvalConfig:
    """Evaluation while the run trains (clipkit.train.evaluation). YAML `eval:` may also be a
    bare list of specs."""

    specs: list[str] = field(default_factory=list)  # e.g. zero-shot:wds:DIR (clipkit.eval.specs)
    every: int | None = None  # steps between evaluations; the last step is always evaluated
    val_data: str | None = None  # held-out shards: their contrastive loss is logged as val/loss
    keep_best: str | None = None  # METRIC[:min|:max]: keep checkpoints/best.pt at its best
    batch_size: int = 64  # images per batch of the evaluations (val/loss: the training batch)
    workers: int = 2  # DataLoader workers of the evaluations


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return {section: section_dict(self, section) for section in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """A saved config (config.yaml, a checkpoint's): settings of other methods, which old
        configs hold, are dropped."""
        cfg = cls()
        merge(cfg, d, saved=True)
        return cfg


SECTIONS = tuple(f.name for f in fields(Config))  # in declaration order, for stable messages


def section_dict(cfg: Config, section: str) -> dict:
    """One section as a flat mapping (the method section: common fields + the method's own)."""
    if section == "method":
        return cfg.method.to_dict()
    return dataclasses.asdict(getattr(cfg, section))


def merge(
    cfg: Config, updates: dict[str, Any], source: str | None = None, saved: bool = False
) -> Config:
    """Apply nested `{section: {key: value}}` updates, each converted to its field's type;
    unknown keys and values that do not convert are user errors. `source` (e.g. "config file
    run.yaml", or FLAGS_SOURCE) is named in the error. A method setting that does not apply to
    the chosen method is refused by `validate`, or dropped from a `saved` config."""
    origin = f" (in {source})" if source else ""
    for section, values in updates.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section '{section}'{origin} (known: {sorted(SECTIONS)})"
            )
        if values is None:
            continue
        if section == "eval" and isinstance(values, list):  # `eval:` as a bare list of specs
            values = {"specs": values}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}'{origin} must be a mapping")
        if section == "method":
            cfg.method.update(values, source, saved)
            continue
        target = getattr(cfg, section)
        known = {f.name for f in fields(target)}
        for key, value in values.items():
            key = str(key).replace("-", "_")
            if key not in known:
                raise ConfigError(
                    f"unknown option '{section}.{key}'{origin} (known: {sorted(known)})"
                )
            setattr(target, key, _coerced(section, key, value, origin))
    return cfg


def _coerced(section: str, key: str, value: Any, origin: str = "") -> Any:
    hint = field_types(field_types(Config)[section])[key]
    return converted(f"{section}.{key}", value, hint, origin)


def coerce_types(cfg: Config) -> Config:
    """Convert every field in place (for configs built directly, not through `merge`)."""
    cfg.method.coerce()
    for section in SECTIONS:
        if section == "method":
            continue
        target = getattr(cfg, section)
        for f in fields(target):
            setattr(target, f.name, _coerced(section, f.name, getattr(target, f.name)))
    return cfg


def _non_finite(cfg: Config) -> list[str]:
    """`section.key = value` for every inf / nan number (a float field or not)."""
    bad = []
    for section in SECTIONS:
        for key, value in section_dict(cfg, section).items():
            if isinstance(value, float) and not math.isfinite(value):
                bad.append(f"{section}.{key} = {value}")
    return bad


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
    data = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
    atomic_write_bytes(Path(path), data)  # a crash never leaves a half-written config.yaml


REPORT_TARGETS = ("tensorboard", "wandb")


def report_targets(report_to: str) -> tuple[str, ...]:
    """The reports a `--report-to` value names ("tensorboard,wandb"; "none": none)."""
    names = tuple(n.strip() for n in report_to.split(",") if n.strip())
    if names == ("none",):
        return ()
    if not names:
        raise ConfigError("--report-to is empty: give tensorboard, wandb, both, or none")
    unknown = [n for n in names if n not in REPORT_TARGETS]
    if unknown:
        raise ConfigError(
            f"--report-to: unknown report {unknown[0]!r} (known: {', '.join(REPORT_TARGETS)}, "
            "or none alone)"
        )
    return names


def _check_reports(r: RunConfig) -> None:
    """Known report names; W&B's package present when asked for (found, not imported: slow)."""
    targets = report_targets(r.report_to)
    if "wandb" in targets:
        _check(
            importlib.util.find_spec("wandb") is not None,
            "--report-to wandb needs the wandb package: pip install wandb",
        )
        _check(bool(r.wandb_project.strip()), "--wandb-project must not be empty")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> Config:
    """Catch every option mistake before any work starts."""
    coerce_types(cfg)
    bad = _non_finite(cfg)
    _check(not bad, f"{', '.join(bad)}: numbers must be finite (not inf or nan)")
    d, r, o = cfg.data, cfg.run, cfg.optim
    _check(bool(d.data), "no training data: pass --data DIR_OR_PATTERN")
    _check(bool(r.out), "no run directory: pass --out RUN_DIR")
    _check(d.batch_size >= 1, "--batch-size must be >= 1")
    _check(d.workers >= 0, "--workers must be >= 0")
    _check(d.shuffle_buffer >= 0, "shuffle buffer must be >= 0")
    _check(0 <= d.max_bad_fraction <= 1, "--max-bad-fraction must be within [0, 1]")
    _check(d.stall_timeout > 0, "--stall-timeout must be > 0")
    _check(d.max_pixels > 0, "--max-pixels must be > 0")
    check_augment(d.augment, d.crop_scale)
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
    _check(r.threads is None or r.threads >= 1, "--threads must be >= 1")
    _check_reports(r)
    mc = cfg.model
    _check(mc.image_size is None or mc.image_size >= 1, "--image-size must be >= 1")
    _check(mc.context_length is None or mc.context_length >= 1, "--context-length must be >= 1")
    _check(
        mc.lock_image_unlocked_layers >= 0 and mc.lock_text_unlocked_layers >= 0,
        "--lock-image-unlocked-layers / --lock-text-unlocked-layers must be >= 0",
    )
    _check(r.precision in ("auto", "fp32", "bf16", "fp16"), "--precision: auto|fp32|bf16|fp16")
    _check(
        r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"),
        "--device must be auto, cpu, cuda or cuda:N",
    )
    _check(o.lr > 0, "--lr must be > 0")
    _check(o.warmup >= 0, "--warmup must be >= 0")
    _check(o.warmup_epochs is None or o.warmup_epochs >= 0, "--warmup-epochs must be >= 0")
    _check(0 <= o.warmup_start_lr <= o.lr, "--warmup-start-lr must be within [0, --lr]")
    _check(0 <= o.final_lr <= o.lr, "--final-lr must be within [0, --lr]")
    _check(o.wd_rule in WD_RULES, f"--wd-rule must be one of {', '.join(WD_RULES)}")
    _check(o.weight_decay >= 0, "--weight-decay must be >= 0")
    _check(o.schedule in ("cosine", "constant"), "--schedule must be cosine or constant")
    _check(o.accum_steps >= 1, "--accum-steps must be >= 1")
    _check(o.accum_mode in ("exact", "independent"), "--accum-mode must be exact or independent")
    _check(o.grad_clip is None or o.grad_clip > 0, "--grad-clip must be > 0")
    _check(o.shared_lr is None or o.shared_lr > 0, "--shared-lr must be > 0")
    _check(
        o.shared_weight_decay is None or o.shared_weight_decay >= 0,
        "--shared-weight-decay must be >= 0",
    )
    _check_eval(cfg.eval)
    cfg.method.check()  # the method's own settings: those given apply, and its range checks
    return cfg


WD_RULES = ("clipkit", "aclip")  # clipkit.train.optim.decays
AUGMENT_NAMES = ("clip", "slip", "aclip", "none")  # clipkit.data.augment.PIPELINES builds them


def check_augment(name: str | None, crop_scale: list[float] | None) -> None:
    """ConfigError for an unknown pipeline name or a crop scale that is not 0 < LO <= HI <= 1."""
    _check(
        name is None or name in AUGMENT_NAMES,
        f"--augment must be one of {', '.join(AUGMENT_NAMES)} (got {name!r})",
    )
    if crop_scale is None:
        return
    _check(
        len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1,
        f"--crop-scale must be LO,HI with 0 < LO <= HI <= 1 (got {crop_scale})",
    )
    _check(name != "none", "--crop-scale does not apply to --augment none (a centre crop)")


def _check_eval(e: EvalConfig) -> None:
    """The eval section's own ranges; what the specs and --keep-best name is checked against the
    evaluations themselves (`clipkit.train.evaluation.check_eval_config`, a layer above)."""
    _check(e.every is None or e.every >= 1, "--eval-every must be >= 1")
    _check(e.batch_size >= 1, "--eval-batch-size must be >= 1")
    _check(e.workers >= 0, "--eval-workers must be >= 0")
    _check(all(s.strip() for s in e.specs), "--eval: a spec is empty")
    _check(e.keep_best is None or bool(e.keep_best.strip()), "--keep-best: name a metric")
    _check(e.val_data is None or bool(e.val_data.strip()), "--val-data: name the held-out shards")
