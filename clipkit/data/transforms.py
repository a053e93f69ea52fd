"""Image preprocessing for training and evaluation. Single-view images use open_clip's own
transforms (train: RandomResizedCrop; eval: resize + centre crop); methods that train on several
views of each image (A-CLIP) use `clipkit.data.views.MultiViewTransform`."""

from __future__ import annotations

from open_clip.transform import image_transform

from clipkit.data.preprocess import Preprocess
from clipkit.data.views import MultiViewTransform, ViewSpec


def single_view_transform(pp: Preprocess, is_train: bool):
    """PIL image -> (3, S, S) tensor, exactly as open_clip preprocesses for this model."""
    return image_transform(
        pp.image_size,
        is_train=is_train,
        mean=pp.mean,
        std=pp.std,
        interpolation=pp.interpolation,
        resize_mode=pp.resize_mode,
    )


def eval_transform(pp: Preprocess):
    """The evaluation transform (zero-shot, retrieval, probe)."""
    return single_view_transform(pp, is_train=False)


def train_transform(pp: Preprocess, views: ViewSpec):
    """The training transform for a method's views: one augmented image (a tensor), or the
    multi-view dict of `MultiViewTransform` when the method asks for online views."""
    if views.online_views == 0:
        return single_view_transform(pp, is_train=True)
    return MultiViewTransform(
        image_size=pp.image_size,
        num_views=views.online_views,
        teacher_size=views.teacher_size,
        mean=pp.mean,
        std=pp.std,
    )
