"""Distillation of a teacher's image-text similarity distributions: a naive reference, open_clip's
`DistillClipLoss` distillation term, and the global batch over 2 gloo ranks."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss
from rank_checks import assert_ranks_equal_whole

from clipkit.losses import distill_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _pairs(batch: int, student_dim: int, teacher_dim: int, seed: int):
    """Student and teacher features (L2-normalised) of the same batch; widths may differ."""
    g = torch.Generator().manual_seed(seed)

    def unit(dim):
        return F.normalize(torch.randn(batch, dim, generator=g), dim=-1)

    return unit(student_dim), unit(student_dim), unit(teacher_dim), unit(teacher_dim)


def _naive_distill(s_img, s_txt, s_scale, t_img, t_txt, t_scale):
    """Row by row: -sum_j softmax(teacher)_j log softmax(student)_j, mean over rows and over the
    image->text and text->image directions, with explicit exp/log."""

    def direction(s_rows, s_cols, t_rows, t_cols):
        total = 0.0
        for i in range(s_rows.shape[0]):
            s_logits = [s_scale * float(s_rows[i] @ s_cols[j]) for j in range(s_cols.shape[0])]
            t_logits = [t_scale * float(t_rows[i] @ t_cols[j]) for j in range(t_cols.shape[0])]
            s_log_norm = math.log(sum(math.exp(z) for z in s_logits))
            t_norm = sum(math.exp(z) for z in t_logits)
            total -= sum(
                math.exp(tz) / t_norm * (sz - s_log_norm)
                for sz, tz in zip(s_logits, t_logits, strict=True)
            )
        return total / s_rows.shape[0]

    return (direction(s_img, s_txt, t_img, t_txt) + direction(s_txt, s_img, t_txt, t_img)) / 2


CASES = [(6, 16, 16, 10.0, 20.0), (9, 8, 24, 14.3, 100.0), (4, 32, 12, 1.0, 5.0)]


@pytest.mark.parametrize("batch,s_dim,t_dim,s_scale,t_scale", CASES)
def test_distill_equals_naive_reference(batch, s_dim, t_dim, s_scale, t_scale):
    s_img, s_txt, t_img, t_txt = _pairs(batch, s_dim, t_dim, seed=batch)
    ours = distill_loss(s_img, s_txt, torch.tensor(s_scale), t_img, t_txt, torch.tensor(t_scale))
    ref = _naive_distill(
        s_img.double(), s_txt.double(), s_scale, t_img.double(), t_txt.double(), t_scale
    )
    assert ours.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("batch,s_dim,t_dim,s_scale,t_scale", CASES)
def test_distill_equals_open_clip_distill_term(batch, s_dim, t_dim, s_scale, t_scale):
    s_img, s_txt, t_img, t_txt = _pairs(batch, s_dim, t_dim, seed=batch)
    ours = distill_loss(s_img, s_txt, torch.tensor(s_scale), t_img, t_txt, torch.tensor(t_scale))
    _, ref = DistillClipLoss()(
        s_img, s_txt, torch.tensor(s_scale), t_img, t_txt, torch.tensor(t_scale)
    )
    torch.testing.assert_close(ours, ref, **TOL)


def test_distill_is_the_teachers_entropy_when_student_is_teacher():
    """H(p, p) = H(p): the KL part is zero, the floor the student can reach."""
    _, _, t_img, t_txt = _pairs(7, 4, 16, seed=0)
    scale = torch.tensor(12.0)
    loss = distill_loss(t_img, t_txt, scale, t_img, t_txt, scale)
    probs = (scale * t_img @ t_txt.T).softmax(dim=-1), (scale * t_txt @ t_img.T).softmax(dim=-1)
    entropy = sum(-(p * p.log()).sum(dim=-1).mean() for p in probs) / 2
    torch.testing.assert_close(loss, entropy, **TOL)


def test_distill_trains_the_student_only():
    s_img, s_txt, t_img, t_txt = (x.requires_grad_(True) for x in _pairs(5, 8, 12, seed=3))
    s_scale = torch.tensor(10.0, requires_grad=True)
    t_scale = torch.tensor(30.0, requires_grad=True)
    distill_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (s_img, s_txt, s_scale))
    assert all(x.grad is None for x in (t_img, t_txt, t_scale))


# ---- 2 gloo ranks: the global batch (features gathered), each rank holding B of 2B ----

WORLD, PER_RANK, S_DIM, T_DIM, S_SCALE, T_SCALE = 2, 5, 16, 24, 12.0, 40.0


def _student_loss_and_grads(loss_fn, s_img, s_txt, t_img, t_txt):
    """Loss and its gradients w.r.t. the student's (image, text, log-space scale) leaves."""
    leaves = [
        s_img.clone().requires_grad_(True),
        s_txt.clone().requires_grad_(True),
        torch.tensor(math.log(S_SCALE), requires_grad=True),
    ]
    loss = loss_fn(leaves[0], leaves[1], leaves[2].exp(), t_img, t_txt, torch.tensor(T_SCALE))
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def _open_clip_distill_term(*args, rank, world):
    loss = DistillClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    return loss(*args)[1]


def _rank_worker(rank, world, init_file, out_dir):
    import functools

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    features = _pairs(PER_RANK * world, S_DIM, T_DIM, seed=11)
    mine = [x[rank * PER_RANK : (rank + 1) * PER_RANK] for x in features]
    reference = functools.partial(_open_clip_distill_term, rank=rank, world=world)
    results = {
        "ours": _student_loss_and_grads(distill_loss, *mine),
        "open_clip": _student_loss_and_grads(reference, *mine),
    }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill-ranks")
    mp.spawn(_rank_worker, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_distill_on_each_rank_equals_open_clip_local_loss(ranks):
    for rank, results in enumerate(ranks):
        ours, our_grads = results["ours"]
        ref, ref_grads = results["open_clip"]
        torch.testing.assert_close(ours, ref, **TOL, msg=f"rank {rank}")
        for got, want in zip(our_grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, **TOL, msg=f"rank {rank}")


def test_distill_over_ranks_is_one_process_over_the_whole_batch(ranks):
    """Mean of the ranks' losses = one process's over the 2B samples; a rank's feature gradients
    are world x the whole-batch ones (every rank's loss reaches them through the gather)."""
    whole, whole_grads = _student_loss_and_grads(
        distill_loss, *_pairs(PER_RANK * WORLD, S_DIM, T_DIM, seed=11)
    )
    per_rank = [results["ours"] for results in ranks]
    assert_ranks_equal_whole(per_rank, whole, whole_grads, WORLD, PER_RANK, TOL)
