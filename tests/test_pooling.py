"""Image pooling (`--image-pool`): the pool modules on hand-made tensors, their hook into open_clip
and MS-CLIP towers, kept-token pooling for A-CLIP/FLIP, the registry, and a CLI run."""

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from clipkit import checkpoint
from clipkit.cli.main import cli
from clipkit.config import Config, ConfigError, ModelConfig
from clipkit.losses import clip_loss
from clipkit.models import factory
from clipkit.models.pooling import (
    GEM_EPS,
    AttentionPool,
    GeMPool,
    GGeMPool,
    get_pooling,
    list_poolings,
    open_clip_pool_type,
)
from clipkit.models.vit import embed_patches, forward_kept, keep_tokens

ALL = ["attn", "avg", "cls", "gem", "ggem", "max"]


def positive_tokens(b: int = 3, n: int = 16, d: int = 8) -> torch.Tensor:
    return torch.rand(b, n, d, dtype=torch.float64) + 0.1  # (B, N, D) in [0.1, 1.1)


def gem_with(p: float) -> GeMPool:
    return GeMPool(p=p).double()


# ---------------------------------------------------------------- GeM / GGeM on hand-made tensors


def test_gem_p1_is_the_mean_and_matches_the_formula():
    x = positive_tokens()
    torch.testing.assert_close(gem_with(1.0)(x), x.mean(dim=1))
    reference = x.pow(3).mean(dim=1).pow(1 / 3)  # the plain GeM formula, p = 3
    torch.testing.assert_close(GeMPool().double()(x), reference)


def test_gem_tends_to_max_as_p_grows():
    x = positive_tokens(n=16)
    top = x.amax(dim=1)
    gaps = [(top - gem_with(p)(x)).max().item() for p in (1.0, 3.0, 10.0, 50.0)]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)) and gaps[-1] >= 0
    # mean((x/m)^p)^(1/p) >= N^(-1/p): at p=50 within 1 - 16^(-1/50) (5.4%) of the max
    torch.testing.assert_close(gem_with(50.0)(x), top, rtol=1 - 16 ** (-1 / 50), atol=0)
    # large activations do not overflow (x^p is taken relative to the max)
    big = gem_with(50.0)(x * 1e4)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, gem_with(50.0)(x) * 1e4)


def test_gem_clamps_non_positive_activations_to_eps():
    # channel 0: [-1, 0, 2, 2]; channel 1: all negative
    x = torch.tensor([[[-1.0, -5.0], [0.0, -2.0], [2.0, -1.0], [2.0, -3.0]]], dtype=torch.float64)
    mean = torch.tensor([[(2 * GEM_EPS + 4) / 4, GEM_EPS]], dtype=torch.float64)
    torch.testing.assert_close(gem_with(1.0)(x), mean)
    rms = math.sqrt((2 * GEM_EPS**2 + 8) / 4)
    torch.testing.assert_close(
        gem_with(2.0)(x), torch.tensor([[rms, GEM_EPS]], dtype=torch.float64)
    )
    # the exponent is clamped at 1: a p that drifted below 1 still gives the mean
    torch.testing.assert_close(gem_with(0.5)(x), gem_with(1.0)(x))


def test_ggem_with_one_group_is_gem():
    x = torch.randn(3, 10, 8, dtype=torch.float64, requires_grad=True)
    gem, ggem = GeMPool(p=2.5).double(), GGeMPool(8, groups=1, p=2.5).double()
    out_gem, out_ggem = gem(x), ggem(x)
    torch.testing.assert_close(out_ggem, out_gem)
    (out_gem * torch.arange(8.0)).sum().backward()
    grad_x_gem, x.grad = x.grad.clone(), None
    (out_ggem * torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(x.grad, grad_x_gem)
    torch.testing.assert_close(ggem.p.grad, gem.p.grad.view(1))


def test_ggem_groups_have_their_own_p():
    x = positive_tokens(b=2, n=6, d=8)
    ggem = GGeMPool(8, groups=4).double()
    with torch.no_grad():
        ggem.p.copy_(torch.tensor([1.0, 2.0, 4.0, 8.0]))
    out = ggem(x)
    for g, p in enumerate([1.0, 2.0, 4.0, 8.0]):  # each channel pair is GeM with its own p
        ch = slice(2 * g, 2 * g + 2)
        torch.testing.assert_close(out[:, ch], x[:, :, ch].pow(p).mean(dim=1).pow(1 / p))
    with torch.no_grad():
        ggem.p[1] = 5.0
    changed = (ggem(x) != out).any(dim=0)
    assert changed.tolist() == [False, False, True, True, False, False, False, False]
    # each group's p gets the gradient of a GeM over its own channels only
    weights = torch.arange(1.0, 9.0, dtype=torch.float64)
    (ggem(x) * weights).sum().backward()
    for g in range(4):
        gem = gem_with(ggem.p[g].item())
        ch = slice(2 * g, 2 * g + 2)
        (gem(x[:, :, ch]) * weights[ch]).sum().backward()
        torch.testing.assert_close(ggem.p.grad[g], gem.p.grad)
    assert len(set(ggem.p.grad.tolist())) == 4


def test_ggem_rejects_a_width_that_does_not_split():
    with pytest.raises(ConfigError, match="groups"):
        GGeMPool(10, groups=4)


# ---------------------------------------------------------------- attention pooling


def test_attention_pool_matches_a_single_head_reference_and_trains():
    torch.manual_seed(0)
    pool = AttentionPool(width=8, heads=1).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    out = pool(x)
    assert out.shape == (2, 8)
    # by hand: the query's row of attention over LN([query, patches]), residual, then the MLP
    q0 = pool.query.expand(2, 1, 8)
    u = F.layer_norm(torch.cat([q0, x], dim=1), (8,), pool.norm1.weight, pool.norm1.bias)
    w_q, w_k, w_v = pool.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = pool.attn.in_proj_bias.chunk(3)
    scores = (u[:, :1] @ w_q.T + b_q) @ (u @ w_k.T + b_k).transpose(1, 2) / math.sqrt(8)
    mixed = scores.softmax(dim=-1) @ (u @ w_v.T + b_v)  # (B, 1, D)
    q = q0 + pool.attn.out_proj(mixed)
    q = q + pool.mlp(pool.norm2(q))
    torch.testing.assert_close(out, q[:, 0])
    # a set function of the patch tokens: their order does not matter
    torch.testing.assert_close(pool(x[:, torch.randperm(5)]), out)
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in pool.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- registry and hooks


def test_registry_lists_itself_and_rejects_unknown_names():
    assert list_poolings() == ALL
    with pytest.raises(ConfigError) as err:
        get_pooling("median")
    assert all(name in str(err.value) for name in ALL)
    with pytest.raises(ConfigError, match="unknown image pooling 'median'"):
        factory.build(ModelConfig(name="test", image_pool="median"))


def test_non_vit_towers_accept_only_cls():
    model = nn.Module()
    model.visual = nn.Conv2d(3, 8, 3)  # stands in for a timm / ResNet tower
    assert factory._apply_pool(model, {"family": "open_clip", "image_pool": "cls"}) is model
    with pytest.raises(ConfigError, match="needs a ViT image tower.*Conv2d"):
        factory._apply_pool(model, {"family": "open_clip", "image_pool": "gem"})


def test_avg_equals_open_clip_pool_type_avg_so_it_exports():
    import open_clip

    arch = factory.resolve_arch(ModelConfig(name="test", image_pool="avg"))
    ours = factory.build_from_arch(arch).eval()
    cfg = dict(arch["model_cfg"])
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "pool_type": open_clip_pool_type("avg")}
    theirs = open_clip.model.CLIP(**cfg, output_dict=True).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images))
    assert open_clip_pool_type("cls") == "tok"
    with pytest.raises(ConfigError, match="no open_clip equivalent"):
        open_clip_pool_type("gem")


@pytest.mark.parametrize("name", ["avg", "gem", "attn"])
def test_kept_token_forward_pools_only_the_kept_tokens(name):
    model = factory.build(ModelConfig(name="test", image_pool=name)).eval()
    visual = model.visual
    images = torch.randn(2, 3, 32, 32)  # 4x4 = 16 patches
    keep_idx = torch.tensor([[0, 5, 9, 15], [3, 4, 7, 12]])
    seen = []
    visual.image_pool.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    features, pooled = forward_kept(visual, images, keep_idx, return_pooled=True)
    assert seen == [torch.Size([2, 4, 32])]  # only the K kept patch tokens, no [CLS]
    tokens = visual.transformer(keep_tokens(embed_patches(visual, images), keep_idx))
    expected = visual.image_pool(visual.ln_post(tokens)[:, 1:])
    if name == "avg":  # and by hand, for the pooling without weights
        torch.testing.assert_close(expected, visual.ln_post(tokens)[:, 1:].mean(dim=1))
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(features, expected @ visual.proj)
    # without a selection forward_kept is exactly the tower's own forward
    torch.testing.assert_close(forward_kept(visual, images), visual(images))


def test_aclip_trains_with_gem_pooling_and_its_teacher_pools_too():
    from clipkit.methods.aclip import ACLIPMethod
    from clipkit.methods.aclip_settings import ACLIPSettings

    model = factory.build(ModelConfig(name="test", image_pool="gem"))
    settings = ACLIPSettings(ssl_hidden_dim=32, ssl_embed_dim=16)
    method = ACLIPMethod(settings, model)
    assert isinstance(method.teacher_visual.image_pool, GeMPool)
    assert method.teacher_visual._pool.__self__ is method.teacher_visual  # rebound by deepcopy
    batch = dict(
        views=torch.randn(2, 4, 3, 32, 32),
        teacher_image=torch.randn(4, 3, 32, 32),
        boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.9, 1.0]]).expand(4, -1, -1),
        text=torch.randint(0, 49408, (4, 16)),
    )
    loss, _ = method.forward(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.visual.image_pool.p.grad.abs() > 0


@pytest.mark.parametrize("name", ["avg", "max"])
def test_msclip_pools_its_patch_tokens(name):
    model = factory.build(ModelConfig(name="msclip-tiny", image_pool=name)).eval()
    images = torch.randn(2, 3, 32, 32)
    patches = model.visual.ln_post(model.visual.forward_tokens(images))[:, 1:]  # (B, N, W)
    pooled = patches.mean(dim=1) if name == "avg" else patches.amax(dim=1)
    torch.testing.assert_close(model.encode_image(images), pooled @ model.visual.proj)


# ---------------------------------------------------------------- contract over every pooling


@pytest.mark.parametrize("family", ["test", "msclip-tiny"])
@pytest.mark.parametrize("name", ALL)
def test_contract_every_pooling(family, name):
    model = factory.build(ModelConfig(name=family, image_pool=name))
    images, text = torch.randn(4, 3, 32, 32), torch.randint(0, 49408, (4, 16))
    out = model(image=images, text=text)
    assert out["image_features"].shape == out["text_features"].shape == (4, model.visual.output_dim)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    pool_params = [n for n, _ in model.named_parameters() if "image_pool" in n]
    assert bool(pool_params) == (name in ("gem", "ggem", "attn"))
    clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    # every parameter gets a gradient (the [CLS] embedding still does, through attention)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    for n in pool_params:
        assert model.get_parameter(n).grad.abs().sum() > 0, n


# ---------------------------------------------------------------- CLI


def test_cli_pretrain_with_gem_pooling_reloads_strictly(demo_root, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--data", demo_root / "train", "--out", run, "--model", "test"]
    args += ["--batch-size", 8, "--workers", 1, "--threads", 1, "--steps", 2, "--image-pool", "gem"]
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output + str(res.exception)
    state = checkpoint.load(run)
    cfg = Config.from_dict(state["config"])
    assert cfg.model.image_pool == "gem" and cfg.model.arch["image_pool"] == "gem"
    model = factory.build_from_arch(cfg.model.arch)
    model.load_state_dict(state["model"], strict=True)
    assert isinstance(model.visual.image_pool, GeMPool)
    assert state["model"]["visual.image_pool.p"].item() != 3.0  # p was trained
    images = torch.randn(2, 3, 32, 32)
    expected = model.visual.image_pool(model.visual.ln_post(_tokens(model.visual, images))[:, 1:])
    torch.testing.assert_close(model.encode_image(images), expected @ model.visual.proj)


def _tokens(visual, images):
    return visual.transformer(embed_patches(visual, images))


def test_cli_unknown_pooling_is_a_user_error(demo_root, tmp_path):
    args = ["pretrain", "--data", demo_root / "train", "--out", tmp_path / "r", "--model", "test"]
    res = CliRunner().invoke(cli, [str(a) for a in args + ["--steps", 1, "--image-pool", "median"]])
    assert res.exit_code == 2 and "unknown image pooling 'median'" in res.output


def test_pooling_with_pretrained_weights_and_export(tmp_path, demo_root):
    """Plain open_clip weights load under any pooling; avg exports to open_clip, gem refuses."""
    import open_clip
    from click.testing import CliRunner

    from clipkit import checkpoint
    from clipkit.cli.main import cli
    from clipkit.config import ModelConfig
    from clipkit.models import factory

    plain = factory.build(ModelConfig(name="test"))
    weights = tmp_path / "w.pt"
    torch.save(plain.state_dict(), weights)
    for pool in ("gem", "attn"):
        model = factory.build(ModelConfig(name="test", pretrained=str(weights), image_pool=pool))
        assert torch.equal(model.visual.proj, plain.visual.proj)
    for pool, code in (("avg", 0), ("gem", 2)):
        run = tmp_path / f"run-{pool}"
        args = [
            "pretrain",
            "--data",
            str(demo_root / "train"),
            "--out",
            str(run),
            "--model",
            "test",
            "--image-pool",
            pool,
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "1",
            "--threads",
            "1",
        ]
        assert CliRunner().invoke(cli, args).exit_code == 0
        res = CliRunner().invoke(
            cli, ["export", "--checkpoint", str(run), "--out", str(tmp_path / f"oc-{pool}")]
        )
        assert res.exit_code == code, res.output
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc-avg'}")
    state = checkpoint.load(tmp_path / "run-avg")
    ours = factory.build_from_arch(state["config"]["model"]["arch"])
    ours.load_state_dict(state["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(x), ours.encode_image(x))
    assert not (tmp_path / "oc-gem").exists()
