"""A-CLIP / FLIP methods, their token selection, EMA, SSL losses and the multi-view transform."""

import copy
import os

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipkit.config import ConfigError, MethodConfig
from clipkit.data.views import MultiViewTransform, covering_box, relative_box
from clipkit.losses import byol_loss, clip_loss, nt_xent
from clipkit.methods import build, list_methods
from clipkit.methods.aclip import (
    block_scores,
    keep_blocks,
    kept_block_count,
    map_scores_to_views,
)
from clipkit.methods.aclip_settings import ACLIPSettings
from clipkit.methods.aclip_viz import render_masks
from clipkit.methods.ema import ema_momentum, ema_update, frozen_copy
from clipkit.models.vit import forward_kept

B = 4
SSL = dict(ssl_hidden_dim=32, ssl_embed_dim=16)  # small heads keep the tests fast


def tiny_clip(seed: int = 0) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=4, width=64, layers=2, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=4, layers=2),
        output_dict=True,
    )


def aclip(model=None, **cfg):
    from clipkit.methods.aclip import ACLIPMethod

    kwargs = {k: cfg.pop(k) for k in ("teacher_resolution", "keep_highest") if k in cfg}
    return ACLIPMethod(ACLIPSettings(**{**SSL, **cfg}), model or tiny_clip(), **kwargs)


def multiview_batch(teacher_size: int = 32, views: int = 2) -> dict:
    boxes = torch.tensor([[0.1, 0.0, 0.8, 0.7], [0.3, 0.25, 1.0, 1.0]])[:views]
    return dict(
        views=torch.randn(views, B, 3, 32, 32),
        teacher_image=torch.randn(B, 3, teacher_size, teacher_size),
        boxes=boxes.expand(B, -1, -1).clone(),
        text=torch.randint(0, 49408, (B, 16)),
    )


# ---------------------------------------------------------------- token selection


def test_box_mapping_identity_halves_and_outside():
    ramp = torch.arange(4.0).expand(4, 4)[None]  # (1, 4, 4): value = teacher column
    boxes = torch.tensor(
        [[[0, 0, 1, 1], [0, 0, 0.5, 1], [1, 0, 2, 1], [-0.5, 0, 0.5, 1], [0.5, 0, 1, 1]]]
    )
    out = map_scores_to_views(ramp, boxes, (4, 4))[0]  # (5, 4, 4)
    torch.testing.assert_close(out[0], ramp[0])  # identity box
    # left half: view cell centres at teacher cells -0.25, 0.25, 0.75, 1.25 (edge clamped)
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.25, 0.75, 1.25]).expand(4, 4))
    assert torch.equal(out[2], torch.zeros(4, 4))  # entirely right of the teacher crop
    torch.testing.assert_close(out[3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(4, 4))
    torch.testing.assert_close(out[4], torch.tensor([1.75, 2.25, 2.75, 3.0]).expand(4, 4))


def test_box_mapping_matches_released_upsample_crop_resize():
    from torchvision.transforms.functional import crop

    g, (te, le, he, we) = 14, (30, 40, 300, 380)  # teacher crop in original pixels
    attention = F.avg_pool2d(F.pad(torch.rand(1, 1, g, g), (1,) * 4, mode="replicate"), 3, 1)
    for to, lo, ho, wo in [(60, 80, 200, 250), (100, 40, 230, 200), (200, 300, 190, 200)]:
        full = F.interpolate(attention, (he, we), mode="bilinear")  # released models.py L448-470
        expected = F.interpolate(crop(full, to - te, lo - le, ho, wo), (g, g), mode="bilinear")
        box = torch.tensor([[relative_box((to, lo, ho, wo), (te, le, he, we))]])
        got = map_scores_to_views(attention[:, 0], box, (g, g))
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=3e-3)
        assert torch.equal(got == 0, expected == 0)  # the same cells fall outside


def naive_keep(scores, keep_ratio, highest=True):
    """Python loops: 2x2 block means (partial blocks at odd edges), sort, expand, cut to K."""
    rows, cols = len(scores), len(scores[0])
    blocks = {}
    for r in range(rows):
        for c in range(cols):
            blocks.setdefault((r // 2, c // 2), []).append((r, c))
    ids = sorted(blocks)  # row-major block index
    means = [sum(scores[r][c] for r, c in blocks[b]) / len(blocks[b]) for b in ids]
    ranked = sorted(range(len(ids)), key=lambda i: (-means[i] if highest else means[i], i))
    n_keep_blocks = min(len(ids), int(len(ids) * keep_ratio) + 1)
    n_keep = round(rows * cols * n_keep_blocks / len(ids))
    patches = [r * cols + c for i in ranked for r, c in sorted(blocks[ids[i]])]
    return sorted(patches[:n_keep])


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (7, 7), (5, 6)])
@pytest.mark.parametrize("highest", [True, False])
def test_block_topk_equals_naive_loop(grid, highest):
    scores = torch.randint(0, 5, (3, *grid)).float()  # integers: ties exercise the tie rule
    got = keep_blocks(block_scores(scores), grid, 0.5, highest)
    for i in range(3):
        assert got[i].tolist() == naive_keep(scores[i].tolist(), 0.5, highest)


def test_keep_count_rule_25_of_49_blocks():
    assert kept_block_count(49, 0.5) == 25 and kept_block_count(16, 0.5) == 9
    assert kept_block_count(49, 1.0) == 49
    keep = keep_blocks(block_scores(torch.rand(2, 14, 14)), (14, 14), 0.5)
    assert keep.shape == (2, 100)  # 25 blocks x 4 patches of 196
    for sample in keep:
        _, counts = torch.unique((sample // 14 // 2) * 7 + (sample % 14) // 2, return_counts=True)
        assert counts.numel() == 25 and (counts == 4).all()  # 25 whole 2x2 blocks


# ---------------------------------------------------------------- EMA


def test_ema_schedule_endpoints_and_formula():
    assert ema_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert ema_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert ema_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert ema_momentum(150, 100, 0.996, 1.0) == pytest.approx(1.0)
    student = torch.nn.Linear(3, 2)
    teacher = frozen_copy(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    old = teacher.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight, 0.9 * old + 0.1 * student.weight)


def test_teacher_gets_no_gradient_and_follows_after_step():
    method = aclip()
    loss, _ = method(multiview_batch())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher_visual.parameters())
    assert all(p.grad is None for p in method.teacher_projector.parameters())
    assert method.model.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert method.model.visual.conv1.weight.grad is None  # frozen patch embedding (spec Sec. 6)
    before = method.teacher_visual.proj.clone()
    with torch.no_grad():
        method.model.visual.proj.add_(1.0)
    method.after_step(10, 100)
    m = ema_momentum(10, 100, 0.996, 1.0)
    torch.testing.assert_close(
        method.teacher_visual.proj, m * before + (1 - m) * method.model.visual.proj
    )
    assert method.ema_step.item() == 10


def test_state_dict_round_trip_restores_teacher_and_step():
    a = aclip(tiny_clip(0))
    with torch.no_grad():
        for p in a.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a.after_step(7, 20)
    b = aclip(tiny_clip(1))
    b.model.load_state_dict(a.model.state_dict())
    b.load_extra_state(a.extra_state())
    for name, p in a.teacher_visual.state_dict().items():
        assert torch.equal(p, b.teacher_visual.state_dict()[name]), name
    assert b.ema_step.item() == 7 and torch.equal(b.ema_momentum_now, a.ema_momentum_now)
    assert any(k.startswith("teacher_projector.") for k in a.extra_state())


def test_eval_models():
    method = aclip()
    images, text = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    with torch.no_grad():
        method.model.visual.proj.add_(torch.randn_like(method.model.visual.proj))
    method.after_step(1, 10)
    online, ema = method.eval_model("online"), method.eval_model("ema")
    assert online is method.model
    torch.testing.assert_close(ema.encode_image(images), method.teacher_visual(images))
    torch.testing.assert_close(ema.encode_text(text), online.encode_text(text))
    out = ema(images, text)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert (out["image_features"] - online(images, text)["image_features"]).abs().max() > 1e-3
    exported = tiny_clip(3)
    exported.load_state_dict(method.ema_model_state_dict())
    torch.testing.assert_close(exported.encode_image(images), ema.encode_image(images))
    with pytest.raises(ValueError):
        method.eval_model("best")


# ---------------------------------------------------------------- losses


def naive_nt_xent(z1, z2, tau):
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2B, E)
    n, total = z1.shape[0], 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        logits = torch.stack([z[i] @ z[j] / tau for j in range(2 * n) if j != i])
        index = positive if positive < i else positive - 1
        total = total - torch.log_softmax(logits, 0)[index]
    return total / (2 * n)


def test_nt_xent_and_byol_against_hand_computations():
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(nt_xent(z1, z2, 0.1), naive_nt_xent(z1, z2, 0.1))
    assert (nt_xent(z1, z1, 0.1) - nt_xent(z1, z2, 0.1)).abs() > 0.1  # the released bug differs
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    assert byol_loss(p, z).item() == pytest.approx((2 + 0 + 4) / 3)


def test_total_loss_is_weighted_sum_of_logged_parts():
    method = aclip(clip_weight=0.6, simclr_weight=0.7, byol_weight=1.5)
    loss, m = method(multiview_batch())
    expected = 0.6 * m["clip_loss"] + 0.7 * m["simclr_loss"] + 1.5 * m["byol_loss"]
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(m["clip_loss"], (m["clip_loss_view0"] + m["clip_loss_view1"]) / 2)
    assert m["ema_momentum"].item() == pytest.approx(0.996)


def test_zero_weights_switch_losses_off():
    model = tiny_clip()
    batch = multiview_batch()
    full = aclip(copy.deepcopy(model))
    clip_only = aclip(copy.deepcopy(model), simclr_weight=0.0, byol_weight=0.0)
    assert clip_only.simclr_head is None and clip_only.byol_projector is None
    loss, m = clip_only(batch)
    assert "simclr_loss" not in m and "byol_loss" not in m
    torch.testing.assert_close(loss.detach(), m["clip_loss"])
    torch.testing.assert_close(m["clip_loss"], full(batch)[1]["clip_loss"])  # same selection


def test_simclr_compares_the_two_views():
    """With BN in eval mode the heads are per-sample, so view 2 must move the SimCLR loss; the
    released bug (view 1 against itself) would give it a zero gradient."""
    method = aclip(clip_weight=0.0, byol_weight=0.0).eval()
    batch = multiview_batch()
    batch["views"].requires_grad_(True)
    loss, _ = method(batch)
    loss.backward()
    assert batch["views"].grad[1].abs().sum() > 0 and batch["views"].grad[0].abs().sum() > 0


def test_clip_loss_per_view_matches_manual():
    method = aclip(simclr_weight=0.0, byol_weight=0.0)
    batch = multiview_batch()
    loss, m = method(batch)
    keep = method.select_tokens(batch)["keep_idx"]  # (V, B, K)
    text = method.model.encode_text(batch["text"], normalize=True)
    scale = method.model.logit_scale.exp()
    for v in range(2):
        image = F.normalize(forward_kept(method.model.visual, batch["views"][v], keep[v]), dim=-1)
        torch.testing.assert_close(m[f"clip_loss_view{v}"], clip_loss(image, text, scale).detach())


def test_selection_variants():
    batch = multiview_batch()
    sel = aclip().select_tokens(batch)
    assert sel["attention"].shape == (B, 8, 8) and sel["keep_idx"].shape == (2, B, 36)
    eff = aclip(teacher_resolution=0.5)
    assert eff.views.teacher_size == 16 and eff.views.online_views == 2
    sel_eff = eff.select_tokens(multiview_batch(teacher_size=16))
    assert sel_eff["attention"].shape == (B, 4, 4) and sel_eff["keep_idx"].shape == (2, B, 36)
    high = aclip(keep_highest=False).select_tokens(batch)["keep_idx"]
    assert not torch.equal(high, sel["keep_idx"])  # keeps the least attended instead
    scores = sel["view_scores"].flatten(2)  # (V, B, 64): same teacher, same maps
    kept, least = scores.gather(2, sel["keep_idx"]), scores.gather(2, high)
    assert (kept.mean(2) > scores.mean(2)).all() and (least.mean(2) < scores.mean(2)).all()
    rand = aclip(attentive=False).select_tokens(batch)["keep_idx"]
    assert rand.shape == (2, B, 36) and not torch.equal(rand[0, 0], rand[0, 1])
    one = aclip(num_views=1, simclr_weight=0.0)
    loss, _ = one(multiview_batch(views=1))
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="two views"):
        aclip(num_views=1)


def test_registry_and_flip():
    assert {"aclip", "aclip-eff", "attmask-high", "flip"} <= set(list_methods())
    not_vit = torch.nn.Module()
    not_vit.visual = torch.nn.Conv2d(3, 8, 3)
    for name in ("aclip", "flip"):
        with pytest.raises(ConfigError, match="ViT"):
            build(MethodConfig(name=name), not_vit)
    model = tiny_clip()
    flip = build(MethodConfig.of("flip", mask_ratio=0.75), model)
    assert flip.views.online_views == 0
    batch = dict(image=torch.randn(B, 3, 32, 32), text=torch.randint(0, 49408, (B, 16)))
    torch.manual_seed(5)
    loss, m = flip(batch)
    torch.manual_seed(5)
    keep = torch.rand(B, 64).topk(16, dim=1).indices  # 48 of 64 removed
    image = F.normalize(forward_kept(model.visual, batch["image"], keep), dim=-1)
    text = model.encode_text(batch["text"], normalize=True)
    torch.testing.assert_close(loss, clip_loss(image, text, model.logit_scale.exp()))
    no_mask = build(MethodConfig.of("flip", mask_ratio=0.0), model)
    clip = build(MethodConfig(name="clip"), model)
    torch.testing.assert_close(no_mask(batch)[0], clip(batch)[0])


# ---------------------------------------------------------------- multi-view transform


def gradient_image(width=200, height=160) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def test_views_shapes_and_boxes_match_the_crops():
    transform = MultiViewTransform(32, 2, teacher_size=24, mean=(0,) * 3, std=(1,) * 3,
                                   photometric=False)  # fmt: skip
    for _ in range(5):
        out = transform(gradient_image())
        assert out["views"].shape == (2, 3, 32, 32) and out["teacher_image"].shape == (3, 24, 24)
        boxes = out["boxes"]
        assert boxes.shape == (2, 4) and (boxes >= 0).all() and (boxes <= 1).all()  # covered
        # sample the teacher at every view pixel through the box: the R,G (= x,y) gradients agree
        pts = map_points(boxes, 32)
        teacher = out["teacher_image"][None].expand(2, -1, -1, -1)
        resampled = F.grid_sample(teacher, 2 * pts - 1, align_corners=False, padding_mode="border")
        diff = (resampled - out["views"])[:, :2, 2:-2, 2:-2].abs()
        assert diff.max() < 0.03, diff.max()


def map_points(boxes, size):
    u = (torch.arange(size) + 0.5) / size
    x = boxes[:, 0, None] + u * (boxes[:, 2] - boxes[:, 0])[:, None]  # (V, S)
    y = boxes[:, 1, None] + u * (boxes[:, 3] - boxes[:, 1])[:, None]
    return torch.stack([x[:, None, :].expand(-1, size, -1), y[:, :, None].expand(-1, -1, size)], -1)


def test_covering_box_contains_the_views_and_tight_union():
    views = [(10, 20, 50, 60), (40, 5, 30, 70)]  # (top, left, h, w)
    for _ in range(20):
        t, left, h, w = covering_box(views, 100, 120)
        assert t <= 10 and left <= 5 and t + h >= 70 and left + w >= 80
        assert t >= 0 and left >= 0 and t + h <= 100 and left + w <= 120
    assert covering_box(views, 100, 120, scale=0.0) == (10, 5, 60, 75)  # the union
    assert relative_box((10, 20, 50, 60), (10, 5, 60, 75)) == (15 / 75, 0.0, 1.0, 50 / 60)


def test_views_with_photometric_aug_are_independent():
    out = MultiViewTransform(32, 2)(gradient_image())
    assert out["views"].dtype == torch.float32 and not torch.equal(out["views"][0], out["views"][1])


# ---------------------------------------------------------------- picture, distributed


def test_render_masks_writes_png(tmp_path):
    transform = MultiViewTransform(32, 2)
    samples = [transform(gradient_image()) for _ in range(2)]
    batch = dict(
        views=torch.stack([s["views"] for s in samples], dim=1),
        teacher_image=torch.stack([s["teacher_image"] for s in samples]),
        boxes=torch.stack([s["boxes"] for s in samples]),
    )
    out = render_masks(aclip(), batch, tmp_path / "masks.png", n=2)
    assert out.stat().st_size > 1000 and Image.open(out).size[0] > 100


def _nt_xent_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)  # the global batch, same on every rank
    local = slice(rank * 3, rank * 3 + 3)
    a, b = z1[local].clone().requires_grad_(), z2[local].clone().requires_grad_()
    loss = nt_xent(a, b, 0.1)
    loss.backward()
    torch.save(dict(loss=loss.detach(), ga=a.grad, gb=b.grad), os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_nt_xent_two_process_gather_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules instead of importing this file again
    args = (2, f"file://{tmp_path}/init", str(tmp_path))
    mp.start_processes(_nt_xent_worker, args=args, nprocs=2, start_method="fork")
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8).requires_grad_(), torch.randn(6, 8).requires_grad_()
    loss = nt_xent(z1, z2, 0.1, gather=False)
    loss.backward()
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, loss.detach())
    # each rank's gradient covers every rank's loss (all_gather backward); DDP then averages
    ga = torch.cat([p["ga"] for p in parts]) / 2
    gb = torch.cat([p["gb"] for p in parts]) / 2
    torch.testing.assert_close(ga, z1.grad)
    torch.testing.assert_close(gb, z2.grad)
