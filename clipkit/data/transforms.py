"""Image preprocessing for training and evaluation. Single-view images use open_clip's own
transforms (train: RandomResizedCrop; eval: resize + centre crop); methods that train on several
views of each image (A-CLIP) use `clipkit.data.views.MultiViewTransform`. Both take any named
augmentation pipeline (`clipkit.data.augment`) for the online views."""

from __future__ import annotations

from open_clip.transform import image_transform

from clipkit.data.augment import PIPELINES, Augment
from clipkit.data.preprocess import Preprocess
from clipkit.data.views import MultiViewTransform, ViewSpec, photometric_augmentation


def single_view_transform(pp: Preprocess, is_train: bool, augment: Augment = PIPELINES["clip"]):
    """PIL image -> (3, S, S) tensor, as open_clip preprocesses for this model; in training the
    crop scale and photometric changes are `augment`'s (the default: open_clip's own)."""
    train = is_train and augment.crop_scale is not None
    transform = image_transform(
        pp.image_size,
        is_train=train,
        mean=pp.mean,
        std=pp.std,
        interpolation=pp.interpolation,
        resize_mode=pp.resize_mode,
        aug_cfg={"scale": augment.crop_scale} if train else None,
    )
    if is_train and augment.photometric:
        # On the RGB crop, before ToTensor and Normalize (open_clip's last two steps).
        transform.transforms.insert(len(transform.transforms) - 2, photometric_augmentation())
    return transform


def eval_transform(pp: Preprocess):
    """The evaluation transform (zero-shot, retrieval, probe)."""
    return single_view_transform(pp, is_train=False)


def train_transform(pp: Preprocess, views: ViewSpec, augment: Augment | None = None):
    """The training transform for a method's views: one augmented image (a tensor), or the
    multi-view dict of `MultiViewTransform` when the method asks for online views. `augment`
    None: the method's own pipeline (`views.augment`)."""
    augment = augment or PIPELINES[views.augment]
    if views.online_views == 0:
        return single_view_transform(pp, is_train=True, augment=augment)
    return MultiViewTransform(
        image_size=pp.image_size,
        num_views=views.online_views,
        teacher_size=views.teacher_size,
        mean=pp.mean,
        std=pp.std,
        view_scale=augment.crop_scale,
        photometric=augment.photometric,
    )
