"""A loss computed per rank over gathered features against the same loss in one process over the
whole batch: the shared assertions of the distributed loss tests."""

import torch


def assert_ranks_equal_whole(per_rank, whole, whole_grads, world: int, rows: int, tol: dict):
    """`per_rank`: each rank's (loss, grads) with grads = (image, text, *scalars). The mean of the
    ranks' losses is the whole batch's; a rank's feature gradients are world x the whole-batch
    ones on its rows (every rank's loss reaches them through the gather); the scalars' gradients
    average (as DDP averages them) to the whole batch's."""
    torch.testing.assert_close(torch.stack([loss for loss, _ in per_rank]).mean(), whole, **tol)
    for rank, (_, grads) in enumerate(per_rank):
        mine = slice(rank * rows, (rank + 1) * rows)
        for got, want in zip(grads[:2], whole_grads[:2], strict=True):
            torch.testing.assert_close(got, world * want[mine], **tol)
    for i, want in enumerate(whole_grads[2:], start=2):
        torch.testing.assert_close(torch.stack([g[i] for _, g in per_rank]).mean(), want, **tol)
