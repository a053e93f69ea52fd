"""Named augmentation pipelines for the online training views, a choice of every method.

`clip`: open_clip's train transform (RandomResizedCrop at scale 0.9-1, no colour change).
`slip`: SLIP's CLIP baseline (crop at scale 0.5-1, no colour change), which A-CLIP compares with.
`aclip`: A-CLIP's online views (crop at scale 0.5-1 plus colour jitter, grayscale, blur, solarize;
  clipkit.data.views.photometric_augmentation).
`none`: no randomness: resize + centre crop (open_clip's evaluation transform).

`data.photometric` and `data.crop_scale` override the named pipeline's parts; `data.augment`
null means the method's own paper pipeline (`ViewSpec.augment`: A-CLIP's is `aclip`, the others'
`clip`), so configs saved before the choice existed resume unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipkit.config import AUGMENT_NAMES, DataConfig, check_augment


@dataclass(frozen=True)
class Augment:
    """What the online views get: a random crop of `crop_scale` of the image area (None: resize +
    centre crop), and the photometric changes or not."""

    name: str
    crop_scale: tuple[float, float] | None
    photometric: bool

    def describe(self) -> str:
        crop = (
            "centre crop" if self.crop_scale is None else "crop {:g}-{:g}".format(*self.crop_scale)
        )
        return f"{self.name} ({crop}, {'photometric' if self.photometric else 'no colour change'})"


PIPELINES = {
    "clip": Augment("clip", (0.9, 1.0), False),
    "slip": Augment("slip", (0.5, 1.0), False),
    "aclip": Augment("aclip", (0.5, 1.0), True),
    "none": Augment("none", None, False),
}
assert tuple(PIPELINES) == AUGMENT_NAMES  # the config validates the names without this module


def resolve_augment(
    name: str | None,
    default: str,
    photometric: bool | None = None,
    crop_scale: list[float] | None = None,
) -> Augment:
    """The pipeline a run uses: `name` (None: the method's `default`) with the overrides given."""
    check_augment(name, crop_scale)
    base = PIPELINES[name or default]
    scale = base.crop_scale if crop_scale is None else (float(crop_scale[0]), float(crop_scale[1]))
    colour = base.photometric if photometric is None else photometric
    return Augment(base.name, scale, colour)


def run_augment(cfg: DataConfig, views) -> Augment:
    """The online views' pipeline of a run: `data.augment` (null: the method's own, `views.augment`
    of its `ViewSpec`) with the run's overrides."""
    return resolve_augment(cfg.augment, views.augment, cfg.photometric, cfg.crop_scale)
