"""timm image towers (PiT, TNT, ConvNeXt V2, MViTv2, ViT) through open_clip's TimmModel."""

import json

import pytest
import timm
import torch
from click.testing import CliRunner

from clipkit import checkpoint
from clipkit.cli.main import cli
from clipkit.config import ModelConfig
from clipkit.data.tokenize import build_tokenizer
from clipkit.models import factory
from clipkit.models.timm_presets import TIMM_PRESETS, register_timm_models

TINY = sorted(name for name in TIMM_PRESETS if name.endswith("-test"))
BASE = ["--batch-size", "8", "--workers", "1", "--threads", "1", "--warmup", "1"]


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_timm_models()


def _model_file(tmp_path, name: str):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(TIMM_PRESETS[name]))
    return path


def test_full_size_presets_name_real_timm_models():
    for name, cfg in TIMM_PRESETS.items():
        assert timm.is_model(cfg["vision_cfg"]["timm_model_name"]), name
    assert len(TINY) == 5 and len(TIMM_PRESETS) == 10


@pytest.mark.parametrize("name", TINY)
def test_tiny_tower_forward_backward(name, tmp_path):
    cfg = ModelConfig(name=str(_model_file(tmp_path, name)))
    model = factory.build(cfg)
    assert type(model.visual).__name__ == "TimmModel"
    assert sum(p.numel() for p in model.visual.parameters()) < 100_000
    images = torch.randn(2, 3, 32, 32)
    tokens = build_tokenizer(factory.preprocess(cfg.arch))(["a dog", "a cat"])
    out = model(images, tokens)
    assert out["image_features"].shape == (2, 32)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2), atol=1e-5)
    out["image_features"].sum().backward()
    missing = [n for n, p in model.visual.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", TINY)
def test_tiny_tower_pretrains_two_steps(name, tmp_path, demo_root):
    run = tmp_path / "run"
    res = run_cli(
        "pretrain", "--data", demo_root / "train", "--out", run,
        "--model", _model_file(tmp_path, name), "--steps", 2, "--save-every", 1, *BASE,
    )  # fmt: skip
    assert res.exit_code == 0, res.output + str(res.exception)
    first = torch.load(run / "checkpoints" / "step-1.pt", weights_only=True)["model"]
    last = checkpoint.load(run)["model"]
    assert checkpoint.load(run)["step"] == 2
    assert not torch.equal(first["visual.head.proj.weight"], last["visual.head.proj.weight"])


def test_lock_timm_tower_leaves_last_block(tmp_path):
    cfg = ModelConfig(name=str(_model_file(tmp_path, "convnextv2-test")), lock_image=True)
    cfg.lock_image_unlocked_layers = 1
    trainable = {n for n, p in factory.build(cfg).named_parameters() if p.requires_grad}
    image = {n for n in trainable if n.startswith("visual.")}
    assert any(n.startswith("visual.trunk.stages.3.blocks.0.") for n in image)
    assert {"visual.trunk.head.norm.weight", "visual.head.proj.weight"} <= image
    assert not any(n.startswith(("visual.trunk.stem", "visual.trunk.stages.2")) for n in image)


@pytest.mark.parametrize("method", ["aclip", "flip"])
def test_token_removal_on_convnet_exits_2(method, tmp_path, demo_root):
    res = run_cli(
        "pretrain", "--data", demo_root / "train", "--out", tmp_path / "run",
        "--model", _model_file(tmp_path, "convnextv2-test"), "--method", method, "--steps", 1,
        *BASE,
    )  # fmt: skip
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "ViT" in err, err
