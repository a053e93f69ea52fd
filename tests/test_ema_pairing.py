"""Issue 20 item 3: A-CLIP's EMA evaluation pairings. `--weights ema` pairs the EMA image tower
with the online text tower; `--weights ema-both` is the official pairing (eval_zeroshot.py: both
EMA towers), for runs trained with `--ema-text`, which keeps an EMA of the text transformer and
projection as the official code does (embeddings, ln_final and logit scale stay online)."""

from __future__ import annotations

import pytest
import torch

from clipkit import checkpoint
from clipkit.config import ConfigError
from clipkit.eval.loading import load_model
from clipkit.models import factory
from tests.cli_util import invoke

TINY = ["--model", "test", "--image-size", "64", "--batch-size", "8", "--workers", "1"]
TINY += ["--threads", "1", "--warmup", "1", "--steps", "3", "--report-to", "none"]
TINY += ["--ssl-hidden-dim", "32", "--ssl-embed-dim", "16", "--method", "aclip"]


def _train(demo_root, out, *extra) -> None:
    result = invoke("pretrain", "--data", demo_root / "train", "--out", out, *TINY, *extra)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def ema_text_run(demo_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("ema-text") / "run"
    # momentum 0.5 -> 0.9: the EMA moves visibly in 3 steps (the default ends at 1.0)
    _train(demo_root, run, "--ema-text", "--ema-momentum", "0.5")
    return run


def _reference(state: dict, teacher: dict, arch: dict) -> torch.nn.Module:
    """An open_clip model holding the online weights, with the EMA parts put in by name."""
    model = factory.build_from_arch(arch)
    model.load_state_dict({**state, **teacher})
    return model.eval()


def test_ema_both_is_both_ema_towers(ema_text_run, demo_root):
    saved = checkpoint.load(ema_text_run / "checkpoints" / "latest.pt")
    method_state, online = saved["method_state"], saved["model"]
    text_ema = {
        k[len("teacher_text.") :]: v for k, v in method_state.items() if "teacher_text." in k
    }
    visual_ema = {
        f"visual.{k[len('teacher_visual.') :]}": v
        for k, v in method_state.items()
        if k.startswith("teacher_visual.")
    }
    # the official EMA set on the text side: the transformer and the projection, nothing else
    assert set(text_ema) == {k for k in online if k.startswith("transformer.")} | {
        "text_projection"
    }
    assert not torch.equal(text_ema["text_projection"], online["text_projection"])  # it lags
    arch = saved["config"]["model"]["arch"]
    both = load_model(str(ema_text_run), weights="ema-both").model.eval()
    image_only = load_model(str(ema_text_run), weights="ema").model.eval()
    reference = _reference(online, {**text_ema, **visual_ema}, arch)
    online_model = _reference(online, {}, arch)
    text = torch.randint(1, 400, (3, reference.context_length))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(both.encode_text(text), reference.encode_text(text))
        torch.testing.assert_close(both.encode_image(images), reference.encode_image(images))
        # `ema` keeps the online text tower, with the same EMA image tower
        torch.testing.assert_close(image_only.encode_text(text), online_model.encode_text(text))
        torch.testing.assert_close(image_only.encode_image(images), reference.encode_image(images))
        assert not torch.allclose(both.encode_text(text), online_model.encode_text(text))
    # the online logit scale in both (the official code does not EMA it)
    assert both.logit_scale.item() == image_only.logit_scale.item() == online["logit_scale"].item()


def test_ema_both_export_and_refusal(ema_text_run, demo_root, tmp_path):
    out = tmp_path / "export"
    result = invoke("export", "--checkpoint", ema_text_run, "--out", out, "--weights", "ema-both")
    assert result.exit_code == 0, result.output
    exported = load_model(model=f"local-dir:{out}").model
    reference = load_model(str(ema_text_run), weights="ema-both").model
    text = torch.randint(1, 400, (2, reference.context_length))
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_text(text), reference.encode_text(text))
    # a run trained without --ema-text keeps no EMA text tower: ema-both is refused, ema works
    plain = tmp_path / "plain"
    _train(demo_root, plain)
    assert (
        "teacher_text.text_projection"
        not in checkpoint.load(plain / "checkpoints/latest.pt")["method_state"]
    )
    with pytest.raises(ConfigError, match="trained without --ema-text"):
        load_model(str(plain), weights="ema-both").model  # noqa: B018
    load_model(str(plain), weights="ema")
