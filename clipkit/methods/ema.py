"""EMA teacher helpers (BYOL, arXiv 2006.07733 Sec. 3.1; A-CLIP, arXiv 2212.08653 Sec. 3.3).

The teacher is a frozen deep copy of a student module; after each optimizer step its parameters
move towards the student's, `t <- m t + (1 - m) s`, with the momentum `m` following a cosine
schedule from `base` to `end` over the run (A-CLIP: 0.996 -> 1, per step, no warmup).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def ema_momentum(step: int, total_steps: int, base: float, end: float) -> float:
    """Cosine schedule: `base` at step 0, `end` at `total_steps` (and after), monotone between."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - base) * (1 + math.cos(math.pi * progress)) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with `requires_grad=False` everywhere: the teacher never receives gradients."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: every teacher parameter becomes `m * teacher + (1 - m) * student`.

    Parameters only; buffers (e.g. BatchNorm running statistics) stay the teacher's own, as in
    A-CLIP. The two modules must have the same parameter names (a `frozen_copy`).
    """
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student have different parameters; build it with frozen_copy")
    for name, t in t_params.items():
        # lerp: t + (1 - m) * (s - t) == m * t + (1 - m) * s
        t.lerp_(s_params[name].detach().to(t.dtype), 1.0 - momentum)
