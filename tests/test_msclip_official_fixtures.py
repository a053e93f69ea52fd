"""clipkit's MS-CLIP against outputs of the official model code (github.com/Hxyou/MSCLIP, e25daf3).

The fixture set lives beside the repository, in `../shared/fixtures/msclip-official/` (override
with CLIPKIT_MSCLIP_FIXTURES); its README says what each file holds and why the tolerance is
atol 1e-5, rtol 0 (logit_scale exact). Each file's official `state_dict` goes through the same
path as `--pretrained FILE`, then the fp32 eval-mode outputs must match the stored ones.
Without the folder the tests skip, except under CI (`CI=true`), where they fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from clipkit.config import ModelConfig
from clipkit.models.factory import build
from clipkit.models.msclip import MSCLIP, PRESETS
from clipkit.models.msclip_official import to_official_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_FILES = [
    "msclip-tiny-shared.pt",
    "msclip-tiny-ln.pt",
    "msclip-tiny-early.pt",
    "msclip-tiny-6layer.pt",  # stand-ins for msclip-tiny / -branch: built from clipkit_config
    "msclip-tiny-branch-6layer.pt",
]
ATOL = 1e-5  # the README's bound: about 10x clipkit's measured error, far below any real bug


def _fixture_dir() -> Path:
    override = os.environ.get("CLIPKIT_MSCLIP_FIXTURES")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "fixtures" / "msclip-official"


def _fixture(name: str) -> dict:
    folder = _fixture_dir()
    if not folder.is_dir():
        msg = (
            f"MS-CLIP official fixtures not found at {folder} (expected the shared/ folder "
            "beside the repository, or CLIPKIT_MSCLIP_FIXTURES=DIR)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    path = folder / name
    assert path.is_file(), f"the fixture set in {folder} lacks {name}"
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_with_official_weights(fixture: dict, path: Path, tmp_path: Path) -> MSCLIP:
    """The model for this file, its weights loaded as `--pretrained` loads them."""
    config = fixture["config"]
    preset = config["clipkit_preset"]
    if preset is None:  # the 6-layer stand-ins exist only as a config
        model_json = tmp_path / "model.json"
        model_json.write_text(json.dumps({"family": "msclip", "config": config["clipkit_config"]}))
        name = str(model_json)
    else:
        name = preset
        got, wanted = PRESETS[preset].to_dict(), config["clipkit_config"]
        assert {k: got[k] for k in wanted} == wanted, f"preset {preset} drifted from the fixture"
    model = build(ModelConfig(name=name, pretrained=str(path)))
    assert isinstance(model, MSCLIP)
    return model.float().eval()


def _assert_weights_reproduced(model: MSCLIP, official: dict) -> None:
    """Every key of the official file, and only those, comes back with the value stored."""
    ours = to_official_state_dict(model)
    assert sorted(ours) == sorted(official)
    for key, stored in official.items():
        value = ours[key]
        assert value.dtype == (torch.int64 if stored.dtype == torch.int64 else torch.float32), key
        assert torch.equal(value, stored.to(value.dtype)), f"{key} differs from the file"


def _assert_close(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == torch.float32, name
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("file_name", FIXTURE_FILES)
@torch.no_grad()
def test_official_outputs_reproduced(file_name, tmp_path):
    fixture = _fixture(file_name)
    model = _build_with_official_weights(fixture, _fixture_dir() / file_name, tmp_path)
    _assert_weights_reproduced(model, fixture["state_dict"])
    image, text = fixture["image"], fixture["text"]
    _assert_close("image_embeds", model.encode_image(image), fixture["image_embeds"])
    _assert_close("image_features", model.encode_image(image, True), fixture["image_features"])
    _assert_close("text_embeds", model.encode_text(text), fixture["text_embeds"])
    _assert_close("text_features", model.encode_text(text, True), fixture["text_features"])
    out = model(image, text)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    _assert_close("logits_per_image", logits, fixture["logits_per_image"])
    assert torch.equal(model.logit_scale, fixture["logit_scale"])  # the log scale, stored as is
