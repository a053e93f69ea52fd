"""A training method defined outside clipkit: registered from this module, trained two steps
through the CLI and evaluated from its checkpoint, without editing any clipkit file (the walk-
through in docs/extending.md uses the same method)."""

import importlib
import json
from dataclasses import dataclass

import pytest
import torch
from cli_util import run, user_error

from clipkit import methods
from clipkit.config import ConfigError, MethodConfig
from clipkit.losses import clip_loss
from clipkit.method_config import setting
from clipkit.methods import Method, register


@dataclass
class ScaleL2Settings:
    penalty: float = setting(0.1, "weight of the pull of the logit scale to its start.")

    def check(self) -> None:
        if self.penalty < 0:
            raise ConfigError("--penalty must be >= 0")


@register("clip-scale-l2")
class CLIPScaleL2(Method):
    """CLIP plus an L2 penalty that holds the logit scale near its starting value (a toy)."""

    name = "clip-scale-l2"
    settings_class = ScaleL2Settings

    def __init__(self, cfg: MethodConfig, model: torch.nn.Module):
        super().__init__(model)
        self.penalty = cfg.settings.penalty
        # A buffer is method state: it rides in the checkpoint beside the model's weights.
        self.register_buffer("scale_start", model.logit_scale.detach().clone())

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(batch["image"], batch["text"])
        contrastive = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        drift = (self.model.logit_scale - self.scale_start).pow(2).sum()
        loss = contrastive + self.penalty * drift
        return loss, {
            "clip_loss": contrastive.detach(),
            "scale_l2": drift.detach(),
            "logit_scale": out["logit_scale"].detach(),
        }


def test_registered_method_trains_through_the_cli_and_evaluates(demo_root, tmp_path):
    out = tmp_path / "run"
    settings = tmp_path / "toy.yaml"
    settings.write_text("method:\n  name: clip-scale-l2\n  penalty: 0.5\n")
    code, stdout, stderr = run(
        "pretrain",
        "--config",
        settings,
        "--data",
        demo_root / "train",
        "--out",
        out,
        "--model",
        "test",
        "--method",
        "clip-scale-l2",
        "--steps",
        2,
        "--batch-size",
        16,
        "--workers",
        0,
        "--device",
        "cpu",
    )
    assert code == 0, stderr
    assert "done: 2 steps" in stdout
    state = torch.load(out / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    section = state["config"]["method"]
    assert section["name"] == "clip-scale-l2" and section["penalty"] == 0.5
    assert section["loss"] == "clip" and section["distill_from"] is None  # shared by all methods
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("scale_l2" in row for row in logged)
    code, stdout, stderr = run(
        "zero-shot",
        "demo",
        "--data-root",
        demo_root,
        "--checkpoint",
        out,
        "--workers",
        0,
        "-o",
        tmp_path / "zs.json",
    )
    assert code == 0, stderr
    assert json.loads((tmp_path / "zs.json").read_text())["metrics"]["acc1"] >= 0


def test_registered_method_is_listed_and_its_capabilities_read():
    assert "clip-scale-l2" in methods.list_methods()
    assert methods.method_class("clip-scale-l2") is CLIPScaleL2
    assert "clip-scale-l2" not in methods.list_methods("has_ema")
    code, stdout, _ = run("pretrain", "--help")
    assert code == 0 and "clip-scale-l2" in " ".join(stdout.split())


def test_registered_method_settings_are_checked(demo_root, tmp_path):
    out, f = tmp_path / "run", tmp_path / "toy.yaml"
    args = ["--data", demo_root / "train", "--out", out, "--steps", 1, "--config", f]
    f.write_text("method:\n  name: clip-scale-l2\n  penalty: -1\n")
    assert "--penalty must be >= 0" in user_error("pretrain", *args)
    f.write_text("method:\n  name: clip\n  penalty: 0.5\n")
    assert "does not apply to method clip (it is a setting of: clip-scale-l2)" in user_error(
        "pretrain", *args
    )
    f.write_text("method:\n  name: clip-scale-l2\n  keep_ratio: 0.5\n")
    assert "does not apply to method clip-scale-l2" in user_error("pretrain", *args)
    assert not out.exists()
    assert MethodConfig.of("clip-scale-l2", penalty="2").settings == ScaleL2Settings(2.0)


def test_unknown_method_is_refused_before_anything_is_written(demo_root, tmp_path):
    out = tmp_path / "run"
    args = ["--data", demo_root / "train", "--out", out, "--steps", 1, "--method", "magic"]
    assert "unknown method 'magic'" in user_error("pretrain", *args)
    assert not out.exists()


def test_register_refuses_what_is_not_a_method():
    with pytest.raises(TypeError, match="Method subclass"):
        register("not-a-method")(lambda cfg, model: None)


def test_builtin_table_names_the_modules_that_register_them():
    for name, module in methods._BUILTIN.items():
        importlib.import_module(module)
        assert methods._METHODS[name].__module__ == module, name
        assert methods.method_class(name).name in (name, "aclip")  # aclip-eff: same class
