"""Token-keep forward and [CLS] attention over open_clip's ViT (clipkit.models.vit)."""

import open_clip
import pytest
import torch

from clipkit.models.vit import (
    cls_attention,
    embed_patches,
    forward_kept,
    positional_embedding,
    require_vit,
)


def tiny_clip(**vision) -> open_clip.model.CLIP:
    vision_cfg = dict(image_size=32, patch_size=4, width=64, layers=2, head_width=16, **vision)
    text_cfg = dict(context_length=16, vocab_size=49408, width=64, heads=4, layers=2)
    return open_clip.model.CLIP(
        embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True
    )


@pytest.fixture
def visual():
    return tiny_clip().visual.eval()


def test_embed_patches_matches_open_clip(visual):
    images = torch.randn(2, 3, 32, 32)
    # our code path against open_clip's: equal up to rounding on any CPU
    torch.testing.assert_close(
        embed_patches(visual, images), visual._embeds(images), rtol=0, atol=1e-6
    )


def test_forward_kept_all_tokens_equals_full_forward(visual):
    images = torch.randn(3, 3, 32, 32)
    full = visual(images)
    torch.testing.assert_close(forward_kept(visual, images), full, rtol=0, atol=1e-6)
    every = torch.arange(64).expand(3, -1)
    torch.testing.assert_close(forward_kept(visual, images, every), full, rtol=0, atol=1e-6)


def test_forward_kept_subset_equals_forward_on_those_tokens(visual):
    images = torch.randn(2, 3, 32, 32)
    keep = torch.stack([torch.randperm(64)[:20] for _ in range(2)])  # different per sample
    got, pooled = forward_kept(visual, images, keep, return_pooled=True)
    tokens = visual._embeds(images)  # reference: open_clip's own tokens, sliced by hand
    for i in range(2):
        seq = torch.cat([tokens[i, :1], tokens[i, 1:][keep[i]]])[None]  # (1, 21, D)
        x = visual.ln_post(visual.transformer(seq))[:, 0]
        torch.testing.assert_close(pooled[i : i + 1], x, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[i : i + 1], x @ visual.proj, rtol=0, atol=1e-5)
    # [CLS] pooling is permutation-invariant, positions travel with the tokens
    shuffled = keep[:, torch.randperm(20)]
    torch.testing.assert_close(forward_kept(visual, images, shuffled), got, rtol=0, atol=1e-5)
    assert (got - visual(images)).abs().max() > 1e-3


def test_cls_attention_matches_multihead_attention_weights(visual):
    images = torch.randn(2, 3, 32, 32)
    x = visual._embeds(images)
    rows = []
    for block in visual.transformer.resblocks:
        h = block.ln_1(x)
        _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
        rows.append(weights[:, :, 0, 1:].mean(dim=1))  # (B, N): [CLS] query, heads averaged
        x = block(x)
    expected = torch.stack(rows).mean(dim=0)
    scores, pooled = cls_attention(visual, images, return_pooled=True)
    assert scores.shape == (2, 64)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled @ visual.proj, visual(images), rtol=0, atol=1e-5)
    assert (scores.sum(dim=1) < 1).all()  # the [CLS]->[CLS] share is dropped, not renormalised


def test_positional_embedding_resampled_for_half_resolution(visual):
    assert positional_embedding(visual, (8, 8)) is visual.positional_embedding
    with torch.no_grad():
        visual.positional_embedding[1:] = 0.25  # a constant table must stay constant
        visual.positional_embedding[0] = 7.0
    half = positional_embedding(visual, (4, 4))
    assert half.shape == (17, 64)
    assert torch.equal(half[0], visual.positional_embedding[0])
    torch.testing.assert_close(half[1:], torch.full((16, 64), 0.25))
    assert cls_attention(visual, torch.randn(2, 3, 16, 16)).shape == (2, 16)


def test_non_vit_tower_is_rejected():
    with pytest.raises(TypeError, match="VisionTransformer"):
        require_vit(torch.nn.Linear(2, 2))
