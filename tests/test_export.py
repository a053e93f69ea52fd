"""`clipkit export`: A-CLIP's EMA image tower, and the models that cannot be exported."""

import pytest
import torch

from clipkit import checkpoint, methods
from clipkit.config import Config, ConfigError, ModelConfig
from clipkit.models import factory


def _checkpoint(path, model_name: str, method: str):
    """A checkpoint as the trainer writes it, without training (random weights)."""
    cfg = Config.from_dict({"model": {"name": model_name}, "method": {"name": method}})
    model = factory.build(cfg.model)
    meth = methods.build(cfg.method, model)
    if method == "aclip":  # make the EMA tower differ from the online one
        with torch.no_grad():
            for p in meth.teacher_visual.parameters():
                p.add_(0.01 * torch.randn_like(p))
    checkpoint.save(
        {
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "method_state": meth.extra_state(),
            "step": 0,
        },
        path,
    )
    return path, meth


def test_export_aclip_ema_image_tower(tmp_path):
    import open_clip

    from clipkit.eval.loading import load_model
    from clipkit.export import export_open_clip

    path, meth = _checkpoint(tmp_path / "aclip.pt", "test", "aclip")
    export_open_clip(path, tmp_path / "ema", weights="ema")
    export_open_clip(path, tmp_path / "online", weights="online")
    images = torch.rand(3, 3, 32, 32)
    tokens = factory.tokenizer(factory.resolve_arch(ModelConfig(name="test")))(
        ["a star", "two red rings"]
    )
    ema = meth.eval_model("ema").eval()
    online = meth.eval_model("online").eval()
    with torch.no_grad():
        for folder, ref in (("ema", ema), ("online", online)):
            model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / folder}")
            model.eval()
            assert torch.equal(model.encode_image(images), ref.encode_image(images)), folder
            assert torch.equal(model.encode_text(tokens), ref.encode_text(tokens)), folder
        assert not torch.equal(ema.encode_image(images), online.encode_image(images))
        # --weights ema through the loader gives the same model as the EMA export
        loaded = load_model(checkpoint=str(path), weights="ema")
        assert torch.equal(loaded.model.encode_image(images), ema.encode_image(images))


def test_export_refuses_msclip_and_missing_ema(tmp_path):
    from clipkit.eval.loading import load_model
    from clipkit.export import export_open_clip

    names = factory.list_models()["msclip"]
    path, _ = _checkpoint(tmp_path / "ms.pt", names[0], "clip")
    with pytest.raises(ConfigError, match="cannot be exported to open_clip"):
        export_open_clip(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    clip_path, _ = _checkpoint(tmp_path / "clip.pt", "test", "clip")
    with pytest.raises(ConfigError, match="keeps no EMA"):
        export_open_clip(clip_path, tmp_path / "out", weights="ema")
    with pytest.raises(ConfigError, match="keeps no EMA"):
        load_model(checkpoint=str(clip_path), weights="ema")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
