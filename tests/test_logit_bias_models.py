"""A learnable logit bias (SigLIP, arXiv 2303.15343 Sec. 3) in every model family: built with the
paper's start values, returned by `forward` as open_clip returns it, carried through export."""

import math

import pytest
import torch

from clipkit.config import ConfigError, ModelConfig
from clipkit.losses import SIGLIP_INIT
from clipkit.models import factory

INIT = dict(init_logit_scale=SIGLIP_INIT["logit_scale"], init_logit_bias=SIGLIP_INIT["logit_bias"])


@pytest.mark.parametrize("name", ["test", "msclip-tiny"])
def test_families_build_a_learnable_bias_with_the_papers_start(name):
    model = factory.build(ModelConfig(name=name, **INIT))
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.requires_grad and model.logit_bias.item() == -10.0
    size = factory.image_size(factory.resolve_arch(ModelConfig(name=name)))
    out = model(torch.zeros(2, 3, size, size), torch.ones(2, 16, dtype=torch.long))
    assert out["logit_bias"] is model.logit_bias
    plain = factory.build(ModelConfig(name=name))
    assert getattr(plain, "logit_bias", None) is None and "logit_bias" not in plain(None, None)


def test_open_clip_rebuilds_the_bias_from_the_export_config():
    import open_clip

    arch = factory.resolve_arch(ModelConfig(name="test", **INIT))
    config = factory.export_config(arch)
    assert config["model_cfg"]["init_logit_bias"] == -10.0
    theirs = open_clip.model.CLIP(**config["model_cfg"])
    ours = factory.build_from_arch(arch)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    assert theirs.logit_bias.item() == ours.logit_bias.item() == -10.0


def test_a_family_without_bias_support_refuses():
    from clipkit.models.family import ModelFamily

    with pytest.raises(ConfigError, match="cannot take a logit scale"):
        ModelFamily().set_logit_init({}, 1.0, -10.0)
