"""The demo's model preset `tiny-rn-64` (scripts/demo.sh): it builds as open_clip's ModifiedResNet
beside the small text tower, trains through the CLI, and reloads from its checkpoint."""

import json
import math

import torch
from click.testing import CliRunner
from open_clip.modified_resnet import ModifiedResNet

from clipkit import checkpoint
from clipkit.cli.main import cli
from clipkit.eval.loading import load_model
from clipkit.models import factory


def test_tiny_rn_64_builds_a_resnet_with_the_documented_size():
    arch = factory.resolve_arch(factory.ModelConfig(name="tiny-rn-64"))
    model = factory.build_from_arch(arch)
    assert isinstance(model.visual, ModifiedResNet)
    # `clipkit models tiny-rn-64`: 1,329,368 image + 199,936 text-transformer parameters
    assert sum(p.numel() for p in model.visual.parameters()) == 1_329_368
    assert sum(p.numel() for p in model.transformer.parameters()) == 199_936
    with torch.no_grad():
        image = model.encode_image(torch.zeros(2, 3, 64, 64))
    assert image.shape == (2, 64)


def test_tiny_rn_64_trains_and_reloads(demo_root, tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        [
            "pretrain", "--data", str(demo_root / "train"), "--out", str(run),
            "--model", "tiny-rn-64", "--steps", "2", "--batch-size", "16", "--lr", "1e-3",
            "--warmup", "1", "--workers", "1", "--threads", "1", "--log-every", "1",
            "--report-to", "none",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output + str(res.exception)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    weights = checkpoint.load(run)["model"]
    # BatchNorm running statistics moved off their initial (0 mean) during training
    assert weights["visual.bn1.running_mean"].abs().sum() > 0
    loaded = load_model(checkpoint=str(run))
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, weights[key])
