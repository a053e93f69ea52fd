"""SigLIP's sigmoid loss (arXiv 2303.15343) against open_clip's `SigLipLoss` and a naive sum, on one
process and across gloo ranks (text blocks passed around the ring, both ways and one way)."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from rank_checks import assert_ranks_equal_whole

from clipkit.losses import SIGLIP_INIT, siglip_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_NAMES = ("image", "text", "scale", "bias")


def _features(batch: int, dim: int, seed: int):
    """L2-normalised image/text features whose matched pairs are closer than the others."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    text = F.normalize(image + torch.randn(batch, dim, generator=g), dim=-1)
    return image, text


def _loss_and_grads(loss_fn, image, text, log_scale: float, bias: float):
    """Loss and gradients w.r.t. (image, text, log-space scale, bias) as fresh leaves."""
    leaves = [
        image.clone().requires_grad_(True),
        text.clone().requires_grad_(True),
        torch.tensor(log_scale, requires_grad=True),
        torch.tensor(bias, requires_grad=True),
    ]
    loss = loss_fn(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def _naive_siglip(image, text, scale, bias):
    """-1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z_ij = +1 on the diagonal, -1 elsewhere."""
    total = 0.0
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            label = 1.0 if i == j else -1.0
            logit = scale * float(image[i] @ text[j]) + bias
            total -= math.log(1.0 / (1.0 + math.exp(-label * logit)))
    return total / image.shape[0]


CASES = [  # batch, dim, log-space scale, bias
    (8, 16, SIGLIP_INIT["logit_scale"], SIGLIP_INIT["logit_bias"]),
    (5, 8, 0.3, -1.5),
    (17, 32, math.log(30.0), 2.0),
]


def test_init_constants_are_the_papers():
    assert math.exp(SIGLIP_INIT["logit_scale"]) == pytest.approx(10.0)
    assert SIGLIP_INIT["logit_bias"] == -10.0


@pytest.mark.parametrize("batch,dim,log_scale,bias", CASES)
def test_siglip_equals_naive_sum(batch, dim, log_scale, bias):
    image, text = _features(batch, dim, seed=batch)
    ours = siglip_loss(image, text, torch.tensor(math.exp(log_scale)), torch.tensor(bias))
    ref = _naive_siglip(image.double(), text.double(), math.exp(log_scale), bias)
    assert ours.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("batch,dim,log_scale,bias", CASES)
def test_siglip_loss_and_grads_equal_open_clip_one_process(batch, dim, log_scale, bias):
    image, text = _features(batch, dim, seed=batch)
    ours, our_grads = _loss_and_grads(siglip_loss, image, text, log_scale, bias)
    ref, ref_grads = _loss_and_grads(SigLipLoss(), image, text, log_scale, bias)
    torch.testing.assert_close(ours, ref, **TOL)
    for name, got, want in zip(GRAD_NAMES, our_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOL, msg=name)


# ---- several gloo ranks: each rank holds B of the world*B samples ----

PER_RANK, DIM, LOG_SCALE, BIAS = 4, 16, math.log(7.0), -3.0


def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    image, text = _features(PER_RANK * world, DIM, seed=world)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for bidirectional, impl in ((True, "bidir"), (False, "shift")):

        def ours(i, t, s, b, bidirectional=bidirectional):
            return siglip_loss(i, t, s, b, bidirectional=bidirectional)

        reference = SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
        results[impl] = {
            "ours": _loss_and_grads(ours, image[mine], text[mine], LOG_SCALE, BIAS),
            "open_clip": _loss_and_grads(reference, image[mine], text[mine], LOG_SCALE, BIAS),
        }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(
    scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)], ids=["world2", "world3"]
)
def ranks(request, tmp_path_factory):
    """Per-rank results of one spawn of `world` gloo processes: (world, [results of rank r])."""
    world = request.param
    out = tmp_path_factory.mktemp(f"siglip-world{world}")
    mp.spawn(_rank_worker, args=(world, str(out / "init"), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("impl", ["bidir", "shift"])
def test_siglip_equals_open_clip_on_each_rank(ranks, impl):
    world, results = ranks
    for rank in range(world):
        ours, our_grads = results[rank][impl]["ours"]
        ref, ref_grads = results[rank][impl]["open_clip"]
        torch.testing.assert_close(ours, ref, **TOL, msg=f"rank {rank} loss")
        for name, got, want in zip(GRAD_NAMES, our_grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, **TOL, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("impl", ["bidir", "shift"])
def test_siglip_over_ranks_is_one_process_over_the_whole_batch(ranks, impl):
    """Mean of the ranks' losses = one process's; a rank's feature gradients are world x the
    whole-batch ones (every rank's loss reaches them); DDP's mean of scale/bias gradients."""
    world, results = ranks
    image, text = _features(PER_RANK * world, DIM, seed=world)
    whole, whole_grads = _loss_and_grads(siglip_loss, image, text, LOG_SCALE, BIAS)
    per_rank = [results[r][impl]["ours"] for r in range(world)]
    assert_ranks_equal_whole(per_rank, whole, whole_grads, world, PER_RANK, TOL)
