"""The `msclip` model family: MS-CLIP (You et al. 2022, arXiv 2207.12661), one Transformer shared
by image and text with modality-specific modules (clipkit.models.msclip).

Names: the `msclip-*` presets; JSON configs `{"family": "msclip", "config": {...MSCLIPConfig}}`.
Weights: clipkit's layout or the official release's (detected by their keys). The official
evaluation normalises images with ImageNet statistics, so those are the default preprocessing.
MS-CLIP has no open_clip class, so it does not export to open_clip.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from clipkit.config import ConfigError
from clipkit.models.arch_config import check_sizes
from clipkit.models.family import ModelFamily, register_family
from clipkit.models.msclip import MSCLIP, PRESETS, MSCLIPConfig
from clipkit.models.msclip_official import load_weights_file
from clipkit.models.pooling import build_pool


class MSCLIPFamily(ModelFamily):
    name = "msclip"
    separate_towers = False  # one Transformer serves both modalities

    def preset_groups(self) -> dict[str, dict[str, dict]]:
        return {"msclip": {n: self._arch(cfg) for n, cfg in PRESETS.items()}}

    def _arch(self, cfg: MSCLIPConfig) -> dict:
        return {"family": self.name, "config": cfg.to_dict()}

    def from_json(self, data: dict, source: str) -> dict:
        body = data.get("config", data)
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: 'config' must be a JSON object")
        body = {k: v for k, v in body.items() if k != "family"}
        check_sizes(body, source)  # before MSCLIPConfig's own checks divide by them
        return {"family": self.name, "config": MSCLIPConfig.from_dict(body).to_dict()}

    def config(self, arch: dict) -> dict:
        return arch["config"]

    def tower_configs(self, arch: dict) -> tuple[dict, dict]:
        return arch["config"], arch["config"]

    def validate(self, arch: dict, source: str) -> None:
        # its own checks, with the overrides applied; normalised (defaults filled in)
        arch["config"] = MSCLIPConfig.from_dict(arch["config"]).to_dict()

    def build(self, arch: dict) -> nn.Module:
        return MSCLIP(MSCLIPConfig.from_dict(arch["config"]))

    def load_weights(self, model: nn.Module, path: Path) -> None:
        load_weights_file(model, str(path))

    def shared_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return model.shared_parameters()

    def logit_init_config(self, arch: dict) -> dict:
        return arch["config"]  # MSCLIPConfig.init_logit_scale / init_logit_bias

    def apply_image_pool(self, model: nn.Module, pool: str) -> None:
        visual = model.visual
        visual.image_pool = build_pool(pool, visual.ln_post.weight.shape[0], visual.heads)

    def export_config(self, arch: dict, preprocess_cfg: dict) -> dict:
        raise ConfigError(
            "a 'msclip' model cannot be exported to open_clip (MS-CLIP shares one Transformer "
            "between image and text; open_clip has no such model). Evaluate it with "
            "--checkpoint instead"
        )

    def preprocess_defaults(self, arch: dict) -> dict:
        defaults = super().preprocess_defaults(arch)
        config = arch["config"]
        defaults["mean"] = tuple(config.get("image_mean", defaults["mean"]))
        defaults["std"] = tuple(config.get("image_std", defaults["std"]))
        return defaults


FAMILY = register_family(MSCLIPFamily())
