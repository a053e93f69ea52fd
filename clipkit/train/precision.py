"""Mixed precision for training: which autocast a run uses, and the optimizer step under fp16's
loss scaling.

fp16 has a narrow exponent range: small gradients underflow to zero. `torch.amp.GradScaler`
multiplies the loss by a scale (2^16 at first) before backward, divides the gradients by it
before the optimizer sees them, and skips the update when a gradient came out inf/nan, halving
the scale; after 2000 clean steps it doubles it. fp32 and bf16 (float32's exponent range) run
with the scaler disabled, which turns every call on it into a no-op.

A skipped step still counts as a step (the trainer advances step, samples seen and the lr
schedule, and calls `method.after_step`, so EMA teachers move on), as open_clip and torch's AMP
recipe do: the scale finds its level within a few steps at the start of a run (the `test` CLIP
at batch 8 skips its first step at 2^16), and counting keeps step numbers and samples exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision with `auto` decided: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast context of a resolved precision (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def scaled_step(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    grad_clip: float | None,
) -> bool:
    """Unscale the gradients, clip their norm to `grad_clip`, step and clear them. True if the
    scaler skipped the update for an inf/nan gradient (fp16 only; it then halved the scale).
    With the scaler disabled this is exactly clip, `optimizer.step()`, `zero_grad`."""
    scaler.unscale_(optimizer)  # before clipping, so --grad-clip bounds the true gradient
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    if not scaler.is_enabled():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)  # leaves the weights and moments alone on inf/nan gradients
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scaler.get_scale() < scale  # update() lowers the scale only after a skip


def scaler_record(scaler: torch.amp.GradScaler, skipped_steps: int) -> dict:
    """fp16: the loss scale and the steps skipped so far, for metrics and the run summary;
    nothing for fp32/bf16 (their records stay as they were)."""
    if not scaler.is_enabled():
        return {}
    return {"loss_scale": scaler.get_scale(), "scaler_skipped_steps": skipped_steps}
