"""Issue 20 item 2: the paper recipes in configs/*.yaml load, validate, and train two steps at a
tiny size override; the optimizer options they need (warmup start lr, final lr, epoch warmup,
A-CLIP's weight-decay rule) behave as the official schedules do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from clipkit.cli.pretrain import resolve_config
from clipkit.config import OptimConfig, section_dict, validate
from clipkit.models import factory
from clipkit.train.optim import decays, epoch_warmup, lr_at, param_groups
from tests.cli_util import invoke

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
RECIPES = {
    "aclip-b16-yfcc15m": "aclip",
    "aclip-eff-b16-yfcc15m": "aclip-eff",
    "clip-b16-laion400m": "clip",
    "flip-b16-laion400m": "flip",
    "msclip-s-b16-yfcc22m": "clip",
    "msclip-s-b32-yfcc22m": "clip",
}
TINY = ["--model", "test", "--batch-size", "4", "--samples", "8", "--workers", "1"]
TINY += ["--threads", "1", "--device", "cpu", "--report-to", "none", "--log-every", "1"]
SMALL_HEADS = ["--ssl-hidden-dim", "32", "--ssl-embed-dim", "16"]


def test_every_recipe_is_listed():
    assert [p.stem for p in CONFIGS] == sorted(RECIPES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_validates_with_its_paper_values(path):
    cfg = resolve_config(str(path), False, {"data": {"data": "shards"}, "run": {"out": "o"}})
    validate(cfg)
    assert cfg.method.name == RECIPES[path.stem]
    raw = yaml.safe_load(path.read_text())
    # every value the file sets is the value the run gets (none lost or renamed on the way)
    for section, values in raw.items():
        for key, value in values.items():
            got = section_dict(cfg, section)[key]
            assert got == pytest.approx(value) if isinstance(value, float) else got == value


def test_aclip_recipe_is_the_official_command():
    cfg = resolve_config(
        "configs/aclip-b16-yfcc15m.yaml", False, {"data": {"data": "s"}, "run": {"out": "o"}}
    )
    o = cfg.optim
    assert (cfg.data.batch_size * 64, o.lr, o.weight_decay, o.eps, o.grad_clip) == (
        4096,
        5e-4,
        0.5,
        1e-8,
        None,
    )
    assert (o.warmup_epochs, o.warmup_start_lr, o.final_lr, o.wd_rule) == (1, 1e-6, 1e-5, "aclip")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_trains_two_steps_at_a_tiny_size(path, demo_root, tmp_path):
    heads = SMALL_HEADS if RECIPES[path.stem].startswith("aclip") else []
    out = tmp_path / "run"
    args = ["pretrain", "--config", path, "--data", demo_root / "train", "--out", out]
    result = invoke(*args, *TINY, *heads)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    optim = OptimConfig(**saved["optim"])
    assert records[0]["lr"] == pytest.approx(lr_at(0, 2, optim), rel=1e-9)
    if optim.warmup_epochs is not None:  # one epoch of 512 demo samples at batch 4
        assert optim.warmup == round(optim.warmup_epochs * 512 / 4)


def test_lr_schedule_from_start_lr_to_final_lr():
    cfg = OptimConfig(lr=5e-4, warmup=4, warmup_start_lr=1e-6, final_lr=1e-5)
    # linear from 1e-6 (the official linspace reaches the peak at the warmup's last step)
    assert [lr_at(s, 14, cfg) for s in range(4)] == pytest.approx(
        [1e-6 + (5e-4 - 1e-6) * k / 4 for k in (1, 2, 3, 4)]
    )
    assert lr_at(9, 14, cfg) == pytest.approx(
        1e-5 + 0.5 * (5e-4 - 1e-5) * (1 + math.cos(math.pi / 2))
    )
    assert lr_at(14, 14, cfg) == pytest.approx(1e-5)  # the cosine ends at final_lr
    # defaults: today's schedule (from 0, to 0)
    assert lr_at(0, 14, OptimConfig(lr=1.0, warmup=4)) == pytest.approx(0.25)
    assert lr_at(14, 14, OptimConfig(lr=1.0, warmup=4)) == pytest.approx(0.0)
    assert epoch_warmup(OptimConfig(warmup_epochs=1.0), 15_000_000, 4096) == 3662
    assert epoch_warmup(OptimConfig(warmup_epochs=0.0), 512, 4) == 0


def test_aclip_weight_decay_rule_decays_embeddings():
    model = factory.build(factory.ModelConfig(name="test"))
    params = dict(model.named_parameters())
    rule = {
        name: (decays(name, p, "clipkit"), decays(name, p, "aclip")) for name, p in params.items()
    }
    assert rule["token_embedding.weight"] == (False, True)
    assert rule["positional_embedding"] == (False, True)
    assert rule["visual.conv1.weight"] == (True, True)
    assert rule["logit_scale"] == (False, False)
    assert rule["visual.class_embedding"] == (False, False)  # 1-D in open_clip (3-D officially)
    assert rule["ln_final.weight"] == rule["visual.transformer.resblocks.0.ln_1.bias"]
    groups = param_groups(model, OptimConfig(weight_decay=0.5, wd_rule="aclip"))
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.5 for p in g["params"]}
    assert id(params["token_embedding.weight"]) in decayed
    assert sum(p.numel() for p in params.values() if id(p) in decayed) > sum(
        p.numel() for n, p in params.items() if decays(n, p, "clipkit")
    )
    assert torch.is_tensor(params["logit_scale"])
