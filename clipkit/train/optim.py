"""Optimizer and learning-rate schedule.

AdamW with no weight decay on biases, norm weights, embeddings (token, positional, class) and the
temperature, as open_clip does. Models may declare extra groups (MS-CLIP's shared parameters take
their own lr/wd multipliers) through `param_group_overrides()`. Schedules are pure functions of
the step, so resume needs only the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipkit.config import OptimConfig

_NO_DECAY_NAMES = (
    "logit_scale",
    "logit_bias",
    "positional_embedding",
    "class_embedding",
    "token_embedding",
    "pos_embed",
    "cls_token",
)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay only on matrices of linear/conv layers, never on gains, biases or embeddings."""
    if param.ndim < 2 or name.endswith(".bias"):
        return False
    leaf = name.split(".")
    return not any(part in _NO_DECAY_NAMES for part in leaf) and "norm" not in name.lower()


def param_groups(module: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups (plus model-declared overrides)."""
    overrides = {}
    model = getattr(module, "model", module)
    if hasattr(model, "param_group_overrides"):
        overrides = model.param_group_overrides()  # {param name prefix-free id: (lr_mult, wd_mult)}
    groups: dict[tuple, dict] = {}
    seen: set[int] = set()
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        lr_mult, wd_mult = overrides.get(id(p), (1.0, 1.0))
        wd = cfg.weight_decay * wd_mult if decays(name, p) else 0.0
        key = (lr_mult, wd)
        group = groups.setdefault(key, {"params": [], "weight_decay": wd, "lr_mult": lr_mult})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(module: nn.Module, cfg: OptimConfig, device: torch.device):
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(module, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 0 (or constant)."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / decay_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
