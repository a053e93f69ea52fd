"""Issue 20 item 1: every named augmentation pipeline reaches both training loaders. A batch is
drawn through `build_loader` from shards of one synthetic image whose red channel encodes x,
green encodes y and blue is constant, so a view's red/green range is the share of the image
width/height it kept, and any blue change is a colour change."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import clipkit.methods  # noqa: F401  (the config checks method names against the registry)
from clipkit.config import Config, ConfigError, DataConfig, validate
from clipkit.data.augment import resolve_augment
from clipkit.data.pipeline import build_loader
from clipkit.data.tarwrite import write_tar
from clipkit.data.tokenize import build_tokenizer
from clipkit.data.views import ViewSpec
from clipkit.distributed import DistInfo
from clipkit.models import factory
from tests.cli_util import user_error

PREPROCESS = factory.preprocess(factory.resolve_arch(factory.ModelConfig(name="test")))
SIDE = 96  # source image side; the `test` preset's views are smaller
BLUE = 128
BATCH = 48


def _gradient_png() -> bytes:
    ramp = np.linspace(0, 255, SIDE).round().astype(np.uint8)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(BLUE)), axis=-1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def gradient_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gradient")
    png = _gradient_png()
    write_tar(
        folder / "000000.tar", ((f"{i:04d}", {"png": png, "txt": b"a ramp"}) for i in range(BATCH))
    )
    return folder


def _batch(folder, augment=None, photometric=None, views=ViewSpec()) -> torch.Tensor:
    """One batch of online views as 0-255 pixels, (N, 3, S, S) (multi-view: views flattened)."""
    cfg = DataConfig(
        data=str(folder), batch_size=BATCH, workers=0, augment=augment, photometric=photometric
    )
    loader, _ = build_loader(
        cfg, PREPROCESS, views, build_tokenizer(PREPROCESS), DistInfo(), seed=0
    )
    batch = next(iter(loader))
    images = batch["image"] if views.online_views == 0 else batch["views"].flatten(0, 1)
    mean, std = torch.tensor(PREPROCESS.mean), torch.tensor(PREPROCESS.std)
    return (images * std[:, None, None] + mean[:, None, None]) * 255


def _stats(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view: the share of the source image area it kept (red span x green span), and whether
    its blue channel moved from the constant (a colour change)."""
    span = lambda c: (pixels[:, c].amax((1, 2)) - pixels[:, c].amin((1, 2))) / 255  # noqa: E731
    kept = span(0) * span(1)
    recoloured = (pixels[:, 2] - BLUE).abs().amax((1, 2)) > 12
    return kept, recoloured


MULTI = ViewSpec(online_views=2, augment="aclip")


@pytest.mark.parametrize("views", [ViewSpec(), MULTI], ids=["single-view", "multi-view"])
def test_each_pipeline_reaches_the_loader(gradient_shards, views):
    measured = {}
    for name in ("clip", "slip", "aclip", "none"):
        kept, recoloured = _stats(_batch(gradient_shards, name, views=views))
        measured[name] = (kept, recoloured.float().mean().item())
    # none: the whole (square) image, every time, colours untouched
    assert measured["none"][0].min() > 0.95 and measured["none"][1] == 0
    # clip: 90-100% of the area (RandomResizedCrop's aspect ratio trims a little more, and the
    # resized edges lose a pixel), never recoloured
    assert measured["clip"][0].min() > 0.8 and measured["clip"][1] == 0
    # slip: 50-100%: smaller on average and sometimes near half; never recoloured
    assert 0.6 < measured["slip"][0].mean() < 0.85 and measured["slip"][0].min() < 0.65
    assert measured["slip"][1] == 0
    # aclip: colour jitter (p 0.8), grayscale (p 0.2), solarize (p 0.2) on most views (they also
    # move the red/green spans, so its crops are measured with --no-photometric below)
    assert measured["aclip"][1] > 0.6


def test_method_default_and_photometric_override(gradient_shards):
    # A-CLIP's multi-view loader keeps its own pipeline by default (today's behaviour)...
    _, recoloured = _stats(_batch(gradient_shards, views=MULTI))
    assert recoloured.float().mean() > 0.6
    # ...and --no-photometric keeps its crops (50-100%, as slip's) without the colour changes
    kept, recoloured = _stats(_batch(gradient_shards, photometric=False, views=MULTI))
    assert 0.6 < kept.mean() < 0.85 and kept.min() < 0.65 and not recoloured.any()
    # CLIP's default is open_clip's; --photometric adds the colour changes to it
    kept, recoloured = _stats(_batch(gradient_shards))
    assert kept.min() > 0.8 and not recoloured.any()
    _, recoloured = _stats(_batch(gradient_shards, photometric=True))
    assert recoloured.float().mean() > 0.6


def test_resolve_and_refuse():
    assert resolve_augment(None, "aclip").describe() == "aclip (crop 0.5-1, photometric)"
    assert resolve_augment("clip", "aclip", True, [0.3, 0.6]).crop_scale == (0.3, 0.6)
    for data, message in [
        ({"augment": "simclr"}, "--augment must be one of"),
        ({"crop_scale": [0.8, 0.5]}, "--crop-scale must be LO,HI"),
        ({"augment": "none", "crop_scale": [0.5, 1]}, "does not apply to --augment none"),
    ]:
        cfg = Config.from_dict({"data": {"data": "x", **data}, "run": {"out": "o", "steps": 1}})
        with pytest.raises(ConfigError, match=message):
            validate(cfg)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--crop-scale", "0.9"], "is not two numbers LO,HI"),
        (["--crop-scale", "0.9,0.5"], "--crop-scale must be LO,HI"),
        (["--augment", "none", "--crop-scale", "0.5,1"], "does not apply to --augment none"),
    ],
)
def test_cli_refuses_bad_augmentation(tmp_path, flags, message):
    out = tmp_path / "run"
    error = user_error(
        "pretrain", "--data", str(tmp_path), "--out", str(out), "--steps", "1", *flags
    )
    assert message in error and not out.exists()


def test_resume_keeps_the_augmentation_and_old_configs_resume():
    from clipkit.config_resume import check_resume

    saved = Config().to_dict()
    for key in ("augment", "photometric", "crop_scale"):  # a config saved before the choice
        del saved["data"][key]
    check_resume(Config(), saved)  # null = the method's own pipeline, what old runs used
    changed = Config.from_dict({"data": {"augment": "slip"}})
    with pytest.raises(ConfigError, match=r"data.augment \(saved None, given 'slip'\)"):
        check_resume(changed, saved)


def test_results_record_the_augmentation(tiny_checkpoint):
    from clipkit.eval.loading import load_model
    from clipkit.eval.results import results_dict

    record = results_dict(
        dataset="d", loaded=load_model(str(tiny_checkpoint)), task="t", metrics={}, num_samples=1
    )
    assert record["clipkit"]["augment"] == "clip (crop 0.9-1, no colour change)"
