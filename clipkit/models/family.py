"""Model families: the one place that knows how each kind of model is described, built, loaded,
preprocessed, exported and counted.

An architecture dict (`arch`, saved in every run config and checkpoint) names its family in
`arch["family"]`; everything else in it is the family's own. clipkit has two: `open_clip`
(separate encoders built with open_clip's classes, clipkit.models.open_clip_family) and `msclip`
(one Transformer shared by both modalities, clipkit.models.msclip_family). A new family subclasses
`ModelFamily` and calls `register_family` (see docs/extending.md); no other module switches on
the family name.

Model names are parsed once, here (`parse_model_name`, after timm's `parse_model_name`): a
source prefix (`local-dir:`) or a JSON file, else a name for the families to look up.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from clipkit.config import ConfigError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

LOCAL_DIR = "local-dir"


@dataclass(frozen=True)
class ModelName:
    """`--model` split into where it comes from and what it names there.

    source: "local-dir" (an open_clip export folder), "json" (a model config file) or "name"
    (a preset or a name a family knows, e.g. one of open_clip's)."""

    source: str
    ref: str

    @property
    def folder(self) -> Path | None:
        return Path(self.ref) if self.source == LOCAL_DIR else None


def parse_model_name(name: str) -> ModelName:
    if name.startswith(LOCAL_DIR + ":"):
        return ModelName(LOCAL_DIR, name[len(LOCAL_DIR) + 1 :])
    if name.endswith(".json"):
        return ModelName("json", name)
    return ModelName("name", name)


def local_dir_name(folder: Path) -> str:
    return f"{LOCAL_DIR}:{folder}"


class ModelFamily:
    """What clipkit needs to know about one kind of model. Subclasses set `name` and implement
    the methods that raise NotImplementedError; the rest have defaults that suit most families.

    - `separate_towers`: the image and text encoders share no parameter, so one can be replaced
      or frozen alone (`--lock-image` / `--lock-text`).
    - `hf_text_tower`: its arch can take a Hugging Face text encoder (`--text-tower hf:DIR`,
      clipkit.models.towers), as open_clip's `hf_model_name` text config does.
    """

    name: str = ""
    separate_towers: bool = True
    hf_text_tower: bool = False

    # -- naming and architecture dicts ---------------------------------------------------------
    def preset_groups(self) -> dict[str, dict[str, dict]]:
        """clipkit's own names for this family, by listing group: {group: {name: arch}}."""
        return {}

    def lookup(self, name: str) -> dict | None:
        """An arch for a name the family's own library knows (checked after every preset)."""
        return None

    def external_names(self) -> dict[str, list[str]]:
        """Names `lookup` accepts, by listing group (for `clipkit models`)."""
        return {}

    def from_json(self, data: dict, source: str) -> dict:
        """The arch a JSON model config of this family describes."""
        raise NotImplementedError

    def config(self, arch: dict) -> dict:
        """The architecture body (sizes at any depth), as checked and as `describe` prints it."""
        raise NotImplementedError

    def tower_configs(self, arch: dict) -> tuple[dict, dict]:
        """The dicts holding `image_size` and `context_length` (overrides are written there)."""
        raise NotImplementedError

    def validate(self, arch: dict, source: str) -> None:
        """Refuse what the model classes would only trip over later (sizes are checked before)."""

    # -- models ----------------------------------------------------------------------------------
    def build(self, arch: dict) -> nn.Module:
        raise NotImplementedError

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """Load a local weights file into `model` (ConfigError / CheckpointError on a mismatch)."""
        raise NotImplementedError

    def shared_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters both modalities use, each once (their own lr / weight decay group)."""
        return []

    def logit_init_config(self, arch: dict) -> dict | None:
        """The dict of `arch` whose `init_logit_scale` / `init_logit_bias` keys the model class
        reads (None: the family has no such settings)."""
        return None

    def set_logit_init(self, arch: dict, scale: float | None, bias: float | None) -> None:
        """Start the (log) logit scale at `scale` and give the model a learnable logit bias
        starting at `bias` (SigLIP); None leaves that part as the arch has it."""
        target = self.logit_init_config(arch)
        if target is None:
            raise ConfigError(
                f"{self.name} models cannot take a logit scale / bias start (SigLIP needs a bias)"
            )
        for key, value in (("init_logit_scale", scale), ("init_logit_bias", bias)):
            if value is not None:
                target[key] = value

    def apply_image_pool(self, model: nn.Module, pool: str) -> None:
        raise ConfigError(f"image pooling '{pool}' is not available for {self.name} models")

    # -- preprocessing and export ----------------------------------------------------------------
    def preprocess_defaults(self, arch: dict) -> dict:
        """open_clip PreprocessCfg fields before the arch's own `preprocess_cfg` overrides."""
        return {
            "mean": OPENAI_MEAN,
            "std": OPENAI_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }

    def tokenizer_name(self, arch: dict) -> str | None:
        """A Hugging Face tokenizer to use instead of CLIP's BPE (None: CLIP's)."""
        return None

    def export_config(self, arch: dict, preprocess_cfg: dict) -> dict:
        """The open_clip `open_clip_config.json` body for `clipkit export`."""
        raise ConfigError(
            f"a '{self.name}' model cannot be exported to open_clip (open_clip has no class for "
            "it). Evaluate it with --checkpoint instead"
        )


_FAMILIES: dict[str, ModelFamily] = {}
# clipkit's own families: name -> the module whose import registers it (imported on first use).
_BUILTIN = {
    "open_clip": "clipkit.models.open_clip_family",
    "msclip": "clipkit.models.msclip_family",
}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` known by `family.name` (in arch dicts and JSON model configs)."""
    if not family.name:
        raise TypeError("a ModelFamily needs a name")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    if name not in _FAMILIES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family '{name}' (known: {', '.join(family_names())})")
    return _FAMILIES[name]


def family_of(arch: dict) -> ModelFamily:
    """The family of a resolved architecture (every saved arch names its family)."""
    if "family" not in arch:
        raise ConfigError("the model architecture names no family (resolve it first)")
    return get_family(arch["family"])


def family_names() -> list[str]:
    return list(dict.fromkeys([*_BUILTIN, *_FAMILIES]))


def all_families() -> Iterable[ModelFamily]:
    return [get_family(name) for name in family_names()]
