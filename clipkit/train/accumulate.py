"""Gradient accumulation: one optimizer step over K micro-batches per rank, in two modes.

- `independent`: each micro-batch is its own contrastive problem; `loss / K` is back-propagated
  per micro-batch (clipkit's step before exact accumulation). K micro-batches of B contrast
  B x world samples each. Cost: one forward and backward per micro-batch.
- `exact` (gradient caching, Gao et al. 2021, arXiv 2101.06983): the gradient of the loss over
  the whole K x B x world batch, every sample contrasted with every other, while holding one
  micro-batch's activations. Pass 1 embeds every micro-batch without a graph; the loss is
  computed once over all embeddings (gathered across ranks as the losses do) and its gradient
  with respect to them is kept; pass 2 re-embeds each micro-batch with a graph, replaying its
  randomness, and back-propagates the kept gradient (`sum(emb * grad)`). Cost: one extra forward
  per micro-batch, about 4/3 of `independent`'s compute, plus the embeddings of the full batch.

What exact accumulation fixes, beyond the gradient:
- Randomness (FLIP's and A-CLIP's token draws, dropout): each micro-batch's torch generator state
  (CPU, and CUDA on a GPU) is recorded before its pass-1 embed and restored before its pass-2
  embed. After pass 2 the generators are put back where pass 1 left them, so the next step draws
  the numbers a run without replay would draw (the stream advances by one embed per micro-batch,
  as in `independent`), and a checkpoint saves that state, which keeps resume exact.
- Buffers a train-mode forward changes (BatchNorm running statistics): pass 1 runs on a snapshot
  that is restored afterwards, so each micro-batch updates them once, in pass 2.
- BatchNorm normalises over one micro-batch in both passes (as DDP keeps statistics per rank):
  a method with BatchNorm computes the loss of the full batch over per-micro-batch-normalised
  embeddings, not over one batch of K x B.
- 0-dim outputs (the exp'd logit scale): every micro-batch emits the same value (the parameters
  do not change within a step); the loss uses the first, and its whole gradient goes back
  through the last micro-batch's pass 2, so the parameter receives it once.
- Precision: the loss over the kept embeddings runs in fp32 without autocast (it is small);
  pass 2's backward is the only one that reaches parameters, so a loss scale (fp16) belongs
  there, and `MicroSteps.backward` is what the trainer scales.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from clipkit.config import ConfigError
from clipkit.methods.base import Embeddings, Method
from clipkit.train.rng import rng_state, set_rng_state


@dataclass
class MicroSteps:
    """What an accumulation step needs from the trainer."""

    engine: nn.Module  # the method, DDP-wrapped when distributed: both passes run through it
    method: Method  # the bare method (its buffers, `objective`)
    count: int  # K, micro-batches per optimizer step
    fetch: Callable[[int], dict]  # micro-batch index -> its batch, on the device
    sync: Callable[[bool], AbstractContextManager]  # around a forward: all-reduce if True
    autocast: Callable[[], AbstractContextManager]
    backward: Callable[[torch.Tensor], None]  # the trainer's backward (loss scaling lives there)
    device: torch.device


def check_accum_mode(method_class: type[Method], accum_steps: int, accum_mode: str) -> None:
    """ConfigError when exact accumulation is asked of a method without the embed / loss split
    (one that overrides `forward` alone); checked before the run writes anything."""
    if accum_steps > 1 and accum_mode == "exact" and not method_class.splits_loss():
        raise ConfigError(
            f"method '{method_class.name}' does not split `embed` / `loss_from_embeddings`, "
            "which --accum-mode exact needs; pass --accum-mode independent"
        )


def independent_step(steps: MicroSteps) -> dict[str, torch.Tensor]:
    """Each micro-batch's own loss, back-propagated with weight 1/K; the parts averaged."""
    parts_sum: dict[str, torch.Tensor] = {}
    for micro in range(steps.count):
        batch = steps.fetch(micro)
        with steps.sync(micro == steps.count - 1), steps.autocast():
            loss, parts = steps.engine(batch)
        steps.backward(loss / steps.count)
        for k, v in {**parts, "loss": loss.detach()}.items():  # the loss returned is the truth
            parts_sum[k] = parts_sum.get(k, 0.0) + v.float() / steps.count
    return parts_sum


def exact_step(steps: MicroSteps) -> dict[str, torch.Tensor]:
    """The full batch's gradient in two passes (module docstring); the loss parts of the one
    loss evaluation."""
    batches, rng_states, embeddings = _embed_without_graph(steps)
    after_pass_1 = rng_state(steps.device)
    leaves = _joined_leaves(embeddings)
    loss, parts = steps.method.objective(leaves)  # the method's loss (+ distillation)
    wanted = {k: v for k, v in leaves.items() if v.requires_grad}
    grads = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
    cached = {k: g for k, g in zip(wanted, grads, strict=True) if g is not None}
    for micro, batch in enumerate(batches):
        last = micro == steps.count - 1
        set_rng_state(rng_states[micro], steps.device)
        with steps.sync(last), steps.autocast():
            emb = steps.engine(batch, embed_only=True, with_teacher=False)
        steps.backward(_surrogate(emb, cached, _rows(embeddings, micro), last))
    set_rng_state(after_pass_1, steps.device)
    return {**{k: v.float() for k, v in parts.items()}, "loss": loss.detach().float()}


def _embed_without_graph(steps: MicroSteps) -> tuple[list[dict], list[dict], list[Embeddings]]:
    """Pass 1: every micro-batch fetched and embedded without a graph, each after recording the
    generators' state; the method's buffers as they were before."""
    batches, rng_states, embeddings = [], [], []
    buffers = {name: b.detach().clone() for name, b in steps.method.named_buffers()}
    with torch.no_grad():
        for micro in range(steps.count):
            batches.append(steps.fetch(micro))
            rng_states.append(rng_state(steps.device))
            with steps.sync(False), steps.autocast():
                emb = steps.engine(batches[-1], embed_only=True)
            embeddings.append({k: v.detach() for k, v in emb.items()})
        for name, b in steps.method.named_buffers():
            b.copy_(buffers[name])
    return batches, rng_states, embeddings


def _joined_leaves(embeddings: list[Embeddings]) -> Embeddings:
    """The micro-batches' embeddings as fp32 leaves: per-sample ones concatenated on dim 0, 0-dim
    ones the first micro-batch's (all equal). Every floating one gets `requires_grad` (pass 1 has
    no graph to tell a teacher's output apart; pass 2 does, in `_surrogate`)."""
    leaves = {}
    for key, first in embeddings[0].items():
        joined = first if first.ndim == 0 else torch.cat([emb[key] for emb in embeddings])
        if joined.is_floating_point():
            joined = joined.float().requires_grad_()
        leaves[key] = joined
    return leaves


def _rows(embeddings: list[Embeddings], micro: int) -> dict[str, slice]:
    """Each per-sample key's rows of micro-batch `micro` in the joined tensors."""
    rows = {}
    for key, value in embeddings[micro].items():
        if value.ndim:
            start = sum(emb[key].shape[0] for emb in embeddings[:micro])
            rows[key] = slice(start, start + value.shape[0])
    return rows


def _surrogate(
    emb: Embeddings, cached: dict[str, torch.Tensor], rows: dict[str, slice], last: bool
) -> torch.Tensor:
    """sum(emb * d loss / d emb) over the keys with a graph: its gradient with respect to the
    parameters is this micro-batch's share of the full-batch gradient. 0-dim keys count in the
    last micro-batch only."""
    terms = []
    for key, value in emb.items():
        if key not in cached or not value.requires_grad or (value.ndim == 0 and not last):
            continue
        grad = cached[key][rows[key]] if value.ndim else cached[key]
        terms.append((value.float() * grad).sum())
    if not terms:  # nothing of this micro-batch reaches the loss (not with the built-in methods)
        return next(iter(emb.values())).new_zeros((), requires_grad=True)
    return torch.stack(terms).sum()
