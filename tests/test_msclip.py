"""MS-CLIP model (clipkit.models.msclip) against the numbers of methods/msclip.md and hand-built
references. Big presets are built on the meta device (no memory); forwards run on msclip-tiny."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from clipkit.config import ConfigError
from clipkit.models.msclip import (
    MSCLIP,
    PRESETS,
    Attention,
    LateralAdapter,
    MSCLIPConfig,
    shared_parameter_names,
)
from clipkit.models.msclip_official import load_official_state_dict, to_official_state_dict


def _meta(name: str) -> MSCLIP:
    with torch.device("meta"):
        return MSCLIP(PRESETS[name])


def _numel(params) -> int:
    return sum(p.numel() for p in params)


@pytest.fixture
def tiny() -> MSCLIP:
    return MSCLIP(PRESETS["msclip-tiny"])


def _batch(model: MSCLIP, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    image = torch.randn(b, 3, cfg.image_size, cfg.image_size)
    text = torch.randint(1, 49405, (b, cfg.context_length))
    text[:, 0], text[:, 6:] = 49406, 0  # SOT ... EOT, then padding
    text[:, 5] = 49407
    return image, text


@pytest.mark.parametrize(
    "name,count",
    [
        ("msclip-b32", 132_408_001),
        ("msclip-b16", 132_503_617),
        ("msclip-b32-shared", 126_248_449),
        ("msclip-b32-ln", 126_285_313),
        ("msclip-b32-early", 128_436_721),
        ("msclip-b32-branch", 130_256_593),
    ],
)
def test_parameter_counts_match_spec(name, count):
    assert _numel(_meta(name).parameters()) == count


def test_b32_breakdown_matches_spec():
    m = _meta("msclip-b32")
    v = m.visual
    assert _numel(v.parameters()) == 86_887_104  # everything the image path uses
    text = [p for n, p in m.named_parameters(remove_duplicate=False) if not n.startswith("visual.")]
    assert _numel(text) - 1 == 123_453_696  # minus logit_scale
    assert _numel(m.buffers()) == 25_284  # BN running stats
    assert _numel(v.stem.parameters()) == 4_513_776
    assert [_numel(s.parameters()) for s in v.branch] == [1392, 32832, 130176, 518400, 2068992]
    assert [_numel(a.parameters()) for a in v.adapters] == [59232, 90048, 160896, 307200, 602112]
    assert [_numel(a.parameters()) for a in _meta("msclip-b16").visual.adapters] == [
        50016,
        85440,
        158592,
        306048,
        602112,
    ]
    shared = dict(m.named_parameters())
    names = shared_parameter_names(m)
    assert len(names) == 88 and _numel(shared[n] for n in names) == 77_932_800
    assert _numel(m.text_blocks[0].parameters()) == 7_087_872  # text-only slot 0
    assert len(v.blocks) == 11 and len(m.text_blocks) == 12


@pytest.mark.parametrize("name,tokens,grid", [("msclip-b32", 50, 7), ("msclip-b16", 197, 14)])
def test_token_count_entering_shared_layers(name, tokens, grid):
    m = _meta(name)
    seen = []
    m.visual.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    stem = m.visual.stem(torch.empty(2, 3, 224, 224, device="meta"))
    m.visual.forward_tokens(torch.empty(2, 3, 224, 224, device="meta"))
    assert tuple(stem.shape) == (2, 768, grid, grid)
    assert seen == [torch.Size([2, tokens, 768])]


def test_sharing_is_real(tiny):
    cfg, v = tiny.config, tiny.visual
    for slot in range(cfg.shared_from, cfg.layers):
        t, vb = tiny.text_blocks[slot], v.blocks[slot - v.first_slot]
        assert t.attn is vb.attn and t.mlp is vb.mlp
        assert t.attn.in_proj_weight is vb.attn.in_proj_weight
        assert t.ln_1 is not vb.ln_1 and t.ln_2 is not vb.ln_2
    params = list(tiny.parameters())
    assert len(params) == len({id(p) for p in params})
    all_ids = [id(p) for p in params]
    for name in shared_parameter_names(tiny):
        assert all_ids.count(id(dict(tiny.named_parameters())[name])) == 1
    # 8 tied tensors per shared slot: in_proj w/b, out_proj w/b, c_fc w/b, c_proj w/b
    assert len(shared_parameter_names(tiny)) == 8 * (cfg.layers - cfg.shared_from)
    private = tiny.text_blocks[0]
    assert all(private.attn is not b.attn for b in v.blocks)


def test_shared_layernorm_variant_ties_norms():
    m = _meta("msclip-b32-shared")
    assert all(t.ln_1 is vb.ln_1 for t, vb in zip(m.text_blocks, m.visual.blocks, strict=True))
    assert len(shared_parameter_names(m)) == 12 * 12
    m = _meta("msclip-b32-ln")
    assert all(t.ln_1 is not vb.ln_1 for t, vb in zip(m.text_blocks, m.visual.blocks, strict=True))


@pytest.mark.parametrize("which", ["image", "text"])
def test_shared_params_get_gradient_from_one_modality(tiny, which):
    image, text = _batch(tiny)
    out = tiny.encode_image(image) if which == "image" else tiny.encode_text(text)
    out.pow(2).sum().backward()
    named = dict(tiny.named_parameters())
    for name in shared_parameter_names(tiny):
        g = named[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_attention_matches_multihead_attention():
    attn = Attention(32, 4)
    nn.init.normal_(attn.in_proj_weight, std=0.2)
    nn.init.normal_(attn.in_proj_bias, std=0.2)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 7, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1)  # the official additive causal mask
    for causal, m in [(True, mask), (False, None)]:
        expect = ref(x, x, x, attn_mask=m, need_weights=False)[0]
        torch.testing.assert_close(attn(x, causal), expect, atol=1e-5, rtol=1e-5)


def test_text_causal_and_vision_unmasked(tiny):
    tiny.eval()
    image, text = _batch(tiny, 2)
    changed = text.clone()
    changed[:, 4] = 1234
    with torch.no_grad():
        a, b = tiny.forward_text_tokens(text), tiny.forward_text_tokens(changed)
        torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-6, rtol=0)
        assert (a[:, 4:] - b[:, 4:]).abs().amax() > 1e-3
        # padding after EOT cannot reach the EOT-pooled feature
        padded = text.clone()
        padded[:, 6:] = 77
        torch.testing.assert_close(tiny.encode_text(text), tiny.encode_text(padded))
        other = image.clone()
        other[:, :, -8:, -8:] += 1.0  # only the last patch changes
        x, y = tiny.visual.forward_tokens(image), tiny.visual.forward_tokens(other)
        assert (x[:, :2] - y[:, :2]).abs().amax() > 1e-3  # CLS and the first patch see it


def _naive_adapter(ad: LateralAdapter, branch, tokens, h, w):
    """Loop-by-loop reference of §3.4 with BN in eval mode."""

    def bn(x, m):
        scale = m.weight / torch.sqrt(m.running_var + m.eps)
        return (x - m.running_mean[:, None, None]) * scale[:, None, None] + m.bias[:, None, None]

    C, k = branch.shape[0], ad.branch_dw.kernel_size[0]
    t = torch.zeros(C, h, w)
    for c in range(C):
        for i in range(h):
            for j in range(w):
                patch = branch[c, i * k : (i + 1) * k, j * k : (j + 1) * k]
                t[c, i, j] = (patch * ad.branch_dw.weight[c, 0]).sum()
    t = torch.einsum("oc,chw->ohw", ad.branch_pw.weight[:, :, 0, 0], bn(t, ad.branch_bn))
    W = tokens.shape[1]
    grid = F.pad(tokens[1:].T.reshape(W, h, w), (1, 1, 1, 1))
    g = torch.zeros(W, h, w)
    for c in range(W):
        for i in range(h):
            for j in range(w):
                g[c, i, j] = (grid[c, i : i + 3, j : j + 3] * ad.token_dw.weight[c, 0]).sum()
    rows = torch.cat([2 * tokens[:1], (bn(g, ad.token_bn) + t).reshape(W, h * w).T])
    mu, var = rows.mean(-1, keepdim=True), rows.var(-1, unbiased=False, keepdim=True)
    return (rows - mu) / torch.sqrt(var + 1e-12) * ad.ln.weight + ad.ln.bias


def test_fusion_adapter_equations_hand_built():
    ad = LateralAdapter(branch_channels=3, width=4, kernel=2).eval()
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
        for m in (ad.branch_bn, ad.token_bn):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    branch, tokens = torch.randn(2, 3, 6, 4), torch.randn(2, 1 + 3 * 2, 4)
    with torch.no_grad():
        out = ad(branch, tokens, (3, 2))
        for b in range(2):
            expect = _naive_adapter(ad, branch[b], tokens[b], 3, 2)
            torch.testing.assert_close(out[b], expect, atol=1e-5, rtol=1e-5)
        # LN is scale and shift invariant, so LN(2 CLS) equals LN(CLS): what can be checked is
        # that the CLS output is the LN of the input CLS alone, blind to patches and branch
        cls = F.layer_norm(2 * tokens[:, 0], (4,), ad.ln.weight, ad.ln.bias, eps=1e-12)
        torch.testing.assert_close(out[:, 0], cls)
        other = ad(torch.randn(2, 3, 6, 4), torch.cat([tokens[:, :1], -tokens[:, 1:]], 1), (3, 2))
        torch.testing.assert_close(other[:, 0], out[:, 0])
        # no identity term: with both conv paths zeroed every patch is LN(BN(0)), whatever
        # the tokens are (x + ... would make them depend on the input tokens)
        ad.token_dw.weight.zero_()
        ad.branch_pw.weight.zero_()
        const = ad.token_bn(torch.zeros(1, 4, 1, 1)).flatten()
        expect = F.layer_norm(const, (4,), ad.ln.weight, ad.ln.bias, eps=1e-12)
        out = ad(branch, tokens, (3, 2))
        torch.testing.assert_close(out[:, 1:], expect.expand(2, 6, 4))


def test_official_layout_round_trip(tiny):
    sd = to_official_state_dict(tiny)
    assert "visual.transformer.resblocks.0.resnet_stage.conv_3.downsample.1.running_var" in sd
    assert "visual.transformer.parallel_branch_v.1.resnet_stage.conv_0.residual_bn.weight" in sd
    assert "visual.transformer.parallel_lateral_adapter.4.top2bottom_dw_conv.conv.weight" in sd
    assert "transformer.resblocks.1.mlp.c_fc.weight" in sd and "visual.conv1.weight" not in sd
    fresh = MSCLIP(PRESETS["msclip-tiny"])
    report = load_official_state_dict(fresh, sd)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.tied_checked == 8 * 3
    mine, theirs = tiny.state_dict(), fresh.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert fresh.text_blocks[2].attn is fresh.visual.blocks[1].attn  # still tied after loading


def test_official_layout_b32_keys():
    sd = to_official_state_dict(_meta("msclip-b32"))
    assert len(sd) == 521  # the released checkpoint's key count (§7.11)
    assert tuple(sd["visual.transformer.resblocks.11.attn.in_proj_weight"].shape) == (2304, 768)
    assert tuple(sd["transformer.resblocks.11.attn.in_proj_weight"].shape) == (2304, 768)
    assert tuple(sd["visual.positional_embedding"].shape) == (50, 768)
    assert tuple(sd["token_embedding.weight"].shape) == (49408, 768)
    assert "visual.transformer.resblocks.0.last_conv.weight" in sd
    assert "visual.conv1.weight" in to_official_state_dict(_meta("msclip-b32-ln"))


def test_official_load_rejects_bad_checkpoints(tiny):
    sd = to_official_state_dict(tiny)
    bad = dict(sd)
    bad["transformer.resblocks.1.attn.in_proj_weight"] = (
        sd["transformer.resblocks.1.attn.in_proj_weight"] + 1
    )
    with pytest.raises(ConfigError, match="different values"):
        load_official_state_dict(MSCLIP(PRESETS["msclip-tiny"]), bad)
    partial = {k: v for k, v in sd.items() if k != "ln_final.weight"}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="missing"):
        load_official_state_dict(MSCLIP(PRESETS["msclip-tiny"]), partial)
    report = load_official_state_dict(MSCLIP(PRESETS["msclip-tiny"]), partial, strict=False)
    assert report.missing_keys == ["ln_final.weight"]
    assert report.unexpected_keys == ["extra.weight"]
    ddp = {"module." + k: v for k, v in sd.items()}
    assert load_official_state_dict(MSCLIP(PRESETS["msclip-tiny"]), ddp).missing_keys == []


def test_forward_contract_and_backward_reaches_everything(tiny):
    image, text = _batch(tiny, 4)
    out = tiny(image=image, text=text)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == out["text_features"].shape == (4, 64)
    for key in ("image_features", "text_features"):
        assert torch.isfinite(out[key]).all()
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert tiny.visual.image_size == (32, 32)
    assert tiny(text=text)["image_features"] is None
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(4)
    (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0 or name.startswith("token_embedding"), name


def test_grad_checkpointing_same_result(tiny):
    image, text = _batch(tiny)
    grads = []
    for enable in (False, True):
        tiny.zero_grad()
        tiny.set_grad_checkpointing(enable)
        out = tiny(image, text)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        grads.append([p.grad for p in tiny.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_initialisation_follows_spec(tiny):
    w = tiny.config.width
    assert tiny.token_embedding.weight.std().item() == pytest.approx(1.0, abs=0.02)
    xavier = math.sqrt(2 / (w + 3 * w))
    assert tiny.visual.blocks[0].attn.in_proj_weight.std().item() == pytest.approx(xavier, rel=0.1)
    assert tiny.visual.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert tiny.visual.proj.std().item() == pytest.approx(w**-0.5, rel=0.15)
    assert tiny.text_projection.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.equal(tiny.visual.blocks[0].mlp.c_fc.bias, torch.zeros(4 * w))
    assert torch.equal(tiny.visual.adapters[0].ln.weight, torch.ones(w))


def test_config_round_trip_and_validation():
    for cfg in PRESETS.values():
        d = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
        assert MSCLIPConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        MSCLIPConfig.from_dict({"widht": 64})
    tiny = PRESETS["msclip-tiny"]
    with pytest.raises(ConfigError, match="stem_strides"):
        dataclasses.replace(tiny, stem_strides=(2, 2, 2, 2, 1))
    with pytest.raises(ConfigError, match="lateral_slots"):
        dataclasses.replace(tiny, lateral_slots=(1, 2, 3, 4, 5))
    with pytest.raises(ConfigError, match="shared_from"):
        dataclasses.replace(tiny, shared_from=0)
