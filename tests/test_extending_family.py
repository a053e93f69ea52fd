"""A model family defined outside clipkit: registered from this module, described by `clipkit
models`, trained two steps through the CLI from a JSON config and a preset name, and evaluated
from its checkpoint, without editing any clipkit file (docs/extending.md shows the same family)."""

import json

import torch
import torch.nn.functional as F
from cli_util import run, user_error
from torch import nn

from clipkit.config import ConfigError, ModelConfig
from clipkit.models import factory
from clipkit.models.family import ModelFamily, register_family


class BagOfPatchesCLIP(nn.Module):
    """A toy two-tower model: mean of linear patch embeddings / mean of token embeddings."""

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, context_length: int):
        super().__init__()
        self.patch = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.tokens = nn.Embedding(49408, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.patch(image).flatten(2).mean(-1)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.tokens(text).mean(1)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image=None, text=None) -> dict:
        return {
            "image_features": None if image is None else self.encode_image(image, True),
            "text_features": None if text is None else self.encode_text(text, True),
            "logit_scale": self.logit_scale.exp(),
        }


class BagOfPatchesFamily(ModelFamily):
    name = "bag-of-patches"

    def preset_groups(self) -> dict[str, dict[str, dict]]:
        config = {"embed_dim": 16, "patch_size": 8, "image_size": 32, "context_length": 16}
        return {"bag-of-patches": {"bop-test": {"family": self.name, "config": config}}}

    def from_json(self, data: dict, source: str) -> dict:
        if not isinstance(data.get("config"), dict):
            raise ConfigError(f"{source}: a bag-of-patches config needs a 'config' object")
        return {"family": self.name, "config": dict(data["config"])}

    def config(self, arch: dict) -> dict:
        return arch["config"]

    def tower_configs(self, arch: dict) -> tuple[dict, dict]:
        return arch["config"], arch["config"]

    def build(self, arch: dict) -> nn.Module:
        return BagOfPatchesCLIP(**arch["config"])

    def load_weights(self, model: nn.Module, path) -> None:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


register_family(BagOfPatchesFamily())

_TRAIN = ["--steps", 2, "--batch-size", 16, "--workers", 0, "--device", "cpu"]


def test_family_is_listed_and_described():
    assert factory.list_models()["bag-of-patches"] == ["bop-test"]
    text = factory.describe(ModelConfig(name="bop-test"))
    assert "family: bag-of-patches" in text and "image size 32, context length 16" in text
    total = sum(p.numel() for p in BagOfPatchesCLIP(16, 8, 32, 16).parameters())
    assert f"total {total:>14,d} params".replace(" ", "") in text.replace(" ", "")


def test_family_trains_from_json_and_preset_then_evaluates(demo_root, tmp_path):
    config = tmp_path / "bop.json"
    body = {"embed_dim": 8, "patch_size": 4, "image_size": 32, "context_length": 16}
    config.write_text(json.dumps({"family": "bag-of-patches", "config": body}))
    for name, model in (("json", config), ("preset", "bop-test")):
        out = tmp_path / name
        code, stdout, stderr = run(
            "pretrain", "--data", demo_root / "train", "--out", out, "--model", model, *_TRAIN
        )
        assert code == 0, stderr
        state = torch.load(out / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
        assert state["config"]["model"]["arch"]["family"] == "bag-of-patches"
    width = state["model"]["patch.weight"].shape[0]
    assert width == 16  # the preset's, not the JSON's
    results = tmp_path / "zs.json"
    code, _, stderr = run(
        "zero-shot", "demo", "--data-root", demo_root, "--checkpoint", tmp_path / "json",
        "--workers", 0, "-o", results,
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(results.read_text())["metrics"]["acc1"] >= 0.0


def test_family_refusals_are_one_line(tmp_path):
    # what the base class does not know how to do is refused, not half-done
    line = user_error(
        "pretrain", "--data", tmp_path, "--out", tmp_path / "r", "--model", "bop-test",
        "--image-pool", "gem", *_TRAIN,
    )  # fmt: skip
    assert "image pooling 'gem' is not available for bag-of-patches models" in line
    arch = factory.resolve_arch(ModelConfig(name="bop-test"))
    try:
        factory.export_config(arch)
    except ConfigError as e:
        assert "cannot be exported to open_clip" in str(e)
    else:
        raise AssertionError("a family without an open_clip class exported")
