"""Losses. Each returns a scalar tensor; callers log the named parts.

- `clip_loss`: symmetric InfoNCE (Radford et al. 2021, arXiv 2103.00020) over the global batch in
  its local-loss form: each rank scores its own B samples against all gathered features, so the
  logits are B x (world*B), not (world*B)^2, and gradients reach every rank through the gather.
- `siglip_loss`: the pairwise sigmoid loss (Zhai et al. 2023, arXiv 2303.15343); across ranks the
  text features travel around the ring of ranks instead of being gathered (B x B logits a block).
- `distill_loss`: a frozen teacher's similarity distributions as soft targets for the student's,
  over the global batch in the same local-loss form as `clip_loss`.

Under several ranks every rank must hold the same number of samples (as the gathers need).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipkit.distributed import all_gather_with_grad, current

# SigLIP's initialisation (arXiv 2303.15343, Sec. 3): the temperature parameter t' = log 10, so the
# scale t = exp(t') = 10, and the bias b = -10, which starts every pair near "not a match" so the
# B^2 - B negatives do not swamp the loss at the first steps. Values for the model's
# `logit_scale` (log space, exp()'d before the loss) and `logit_bias` (used as is).
SIGLIP_INIT = {"logit_scale": math.log(10.0), "logit_bias": -10.0}


def clip_loss(
    image_features: torch.Tensor,  # (B, D), L2-normalised
    text_features: torch.Tensor,  # (B, D), L2-normalised
    logit_scale: torch.Tensor,  # scalar, already exp()'d
    gather: bool = True,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over this rank's B samples;
    `gather=False`: against this rank's batch alone, as one process would (validation)."""
    rank = current().rank if gather else 0
    logits_per_image, logits_per_text = _rows_against_global_batch(
        image_features, text_features, logit_scale, gather
    )
    batch = image_features.shape[0]
    labels = torch.arange(batch, device=image_features.device) + rank * batch
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def _rows_against_global_batch(
    image_features: torch.Tensor,  # (B, D)
    text_features: torch.Tensor,  # (B, D)
    logit_scale: torch.Tensor,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's image->text and text->image logits, each (B, world*B), against the gathered
    batch; the gathered samples of rank r sit at columns r*B .. (r+1)*B - 1 (`gather=False`:
    (B, B), this rank's batch alone)."""
    all_image = all_gather_with_grad(image_features) if gather else image_features  # (world*B, D)
    all_text = all_gather_with_grad(text_features) if gather else text_features
    return logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T


def nt_xent(
    z1: torch.Tensor,  # (B, E) first view's SSL embeddings
    z2: torch.Tensor,  # (B, E) second view's, same samples in the same order
    temperature: float,
    gather: bool = True,
) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709) in SLIP's local-loss form.

    Each query of either view is scored against both views of the whole (gathered) batch, so it
    chooses among 2*world*B - 1 candidates: its other view is the positive, its own row is
    excluded. Inputs are L2-normalised here. A-CLIP (arXiv 2212.08653, Sec. 3.3) contrasts the two
    masked online views with it; the released code compared view 1 with itself (see aclip.md).
    """
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    all_z1 = all_gather_with_grad(z1) if gather else z1  # (world*B, E)
    all_z2 = all_gather_with_grad(z2) if gather else z2
    batch = z1.shape[0]
    offset = current().rank * batch if gather else 0
    labels = torch.arange(batch, device=z1.device) + offset
    self_mask = F.one_hot(labels, all_z1.shape[0]).bool()  # (B, world*B): a query's own row
    losses = []
    for q, k_pos, k_same in ((z1, all_z2, all_z1), (z2, all_z1, all_z2)):
        cross = q @ k_pos.T / temperature  # (B, world*B): positives on `labels`
        same = (q @ k_same.T / temperature).masked_fill(self_mask, float("-inf"))
        losses.append(F.cross_entropy(torch.cat([cross, same], dim=1), labels))
    return (losses[0] + losses[1]) / 2


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, arXiv 2006.07733): mean of 2 - 2 cos(p, z).

    `p` (N, E) are online predictions; `z` (N, E) targets, which the caller detaches (stop-grad).
    """
    return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()


def siglip_loss(
    image_features: torch.Tensor,  # (B, D), L2-normalised
    text_features: torch.Tensor,  # (B, D), L2-normalised
    logit_scale: torch.Tensor,  # scalar t, already exp()'d
    logit_bias: torch.Tensor,  # scalar b, learnable
    bidirectional: bool = True,
    gather: bool = True,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, arXiv 2303.15343, Sec. 3, Algorithm 1).

    Every image-text pair is its own binary problem: with logits z_ij = t <x_i, y_j> + b and
    labels s_ij = +1 for a matched pair (i == j), -1 otherwise,

        L = -(1 / B) * sum_i sum_j log sigmoid(s_ij * z_ij),

    summed over this rank's B images against every text of the global batch and divided by the
    local B, as open_clip's `SigLipLoss` does; the mean of this value over ranks is the loss of
    one process over the concatenated batch. Nothing is normalised across the batch, so no
    gather is needed: as in the paper's chunked implementation (Sec. 3.3), each rank scores its
    images against its own texts, then passes text blocks to its ring neighbours and scores the
    block it receives (all negatives), world - 1 times. `bidirectional` sends blocks both ways
    at once, so the ring is covered in about world / 2 exchanges. A rank only ever holds B x B
    blocks of logits and one or two text blocks in flight, never the gathered batch's features;
    gradients go back to the rank a block came from through the opposite exchanges.
    `gather=False`: this rank's batch alone, as one process would (validation).
    """
    loss = _sigmoid_pair_loss(image_features, text_features, logit_scale, logit_bias, True)
    world = current().world_size
    if world == 1 or not gather:
        return loss
    for other_texts in _text_blocks_of_other_ranks(text_features, world, bidirectional):
        loss = loss + _sigmoid_pair_loss(
            image_features, other_texts, logit_scale, logit_bias, False
        )
    return loss


def _sigmoid_pair_loss(
    image_features: torch.Tensor,  # (B, D)
    text_features: torch.Tensor,  # (B, D)
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    diagonal_matches: bool,  # False: a block of another rank's texts, all negatives
) -> torch.Tensor:
    """-sum log sigmoid(s_ij z_ij) over one B x B block, divided by this rank's B."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    signs = -torch.ones_like(logits)
    if diagonal_matches:
        signs = signs + 2 * torch.eye(*logits.shape, device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


def _text_blocks_of_other_ranks(
    text_features: torch.Tensor, world: int, bidirectional: bool
) -> Iterator[torch.Tensor]:
    """Yield the text features of every other rank once, in ring order, with autograd.

    One way, a block moves one rank to the right per exchange (world - 1 exchanges). Both ways,
    after k exchanges a rank holds the blocks of ranks r - k and r + k; when world - 1 is odd
    the one rank left (r + world / 2) arrives by a last one-way exchange.
    """
    if not bidirectional:
        block = text_features
        for _ in range(world - 1):
            (block,) = _RingExchange.apply((1,), block)
            yield block
        return
    from_left = from_right = text_features
    pairs, odd = divmod(world - 1, 2)
    for _ in range(pairs):
        from_left, from_right = _RingExchange.apply((1, -1), from_left, from_right)
        yield from_left
        yield from_right
    if odd:
        (block,) = _RingExchange.apply((1,), from_left)
        yield block


def _ring_send_receive(offsets: tuple[int, ...], tensors: tuple[torch.Tensor, ...]):
    """Send tensors[i] to rank + offsets[i] and receive its like from rank - offsets[i]."""
    rank, world = dist.get_rank(), dist.get_world_size()
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for tag, (offset, tensor, buffer) in enumerate(zip(offsets, tensors, received, strict=True)):
        # the tag keeps the two directions apart should both neighbours be one rank (gloo)
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), (rank + offset) % world, tag=tag))
        ops.append(dist.P2POp(dist.irecv, buffer, (rank - offset) % world, tag=tag))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return tuple(received)


class _RingExchange(torch.autograd.Function):
    """Point-to-point shift around the ring of ranks; the gradient of a received block goes
    back to the rank it came from by the opposite shift."""

    @staticmethod
    def forward(ctx, offsets: tuple[int, ...], *tensors: torch.Tensor):
        ctx.offsets = offsets
        return _ring_send_receive(offsets, tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        back = tuple(-offset for offset in ctx.offsets)
        return (None, *_ring_send_receive(back, grads))


def distill_loss(
    student_image: torch.Tensor,  # (B, D), L2-normalised
    student_text: torch.Tensor,  # (B, D), L2-normalised
    student_scale: torch.Tensor,  # scalar, already exp()'d
    teacher_image: torch.Tensor,  # (B, D'), L2-normalised; D' may differ from D
    teacher_text: torch.Tensor,  # (B, D')
    teacher_scale: torch.Tensor,  # scalar, already exp()'d
) -> torch.Tensor:
    """Distillation of a CLIP teacher's similarity distributions (open_clip's `DistillClipLoss`).

    Knowledge distillation with soft targets (Hinton et al. 2015, arXiv 1503.02531, Sec. 2)
    applied to the image-text affinities, as TinyCLIP's affinity mimicking (arXiv 2309.12314)
    and MobileCLIP (arXiv 2311.17049) do: for each of this rank's images i, the teacher's
    softmax over the global batch of texts p_i = softmax(t_T * x^T_i . Y^T) is the target of the
    student's q_i = softmax(t_S * x^S_i . Y^S), and likewise for texts against images:

        L = (1/2) [ mean_i H(p_i^{I->T}, q_i^{I->T}) + mean_i H(p_i^{T->I}, q_i^{T->I}) ],

    with H(p, q) = -sum_j p_j log q_j. H(p, q) = KL(p || q) + H(p), and the teacher's entropy
    H(p) does not depend on the student, so the gradients are those of the KL; the value is the
    cross-entropy, as open_clip reports it. Rows are this rank's B samples, columns the gathered
    world*B (the local-loss form of `clip_loss`), so the mean over ranks is the loss of one
    process over the concatenated batch. The teacher's features are detached: a fixed target.
    """
    student_i2t, student_t2i = _rows_against_global_batch(
        student_image, student_text, student_scale
    )
    with torch.no_grad():
        teacher_i2t, teacher_t2i = _rows_against_global_batch(
            teacher_image.detach(), teacher_text.detach(), teacher_scale.detach()
        )
    return (
        _soft_cross_entropy(student_i2t, teacher_i2t)
        + _soft_cross_entropy(student_t2i, teacher_t2i)
    ) / 2


def _soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j softmax(teacher)_j * log_softmax(student)_j."""
    return F.cross_entropy(student_logits, teacher_logits.softmax(dim=-1))
