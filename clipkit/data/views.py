"""What a method asks of each sample (`ViewSpec`), and the multi-view sample transform of A-CLIP
(arXiv 2212.08653 Sec. 3.2 and 4.1; spec aclip.md Sec. 2).

Per image: `num_views` online views (RandomResizedCrop, scale (0.5, 1), BYOL-style photometric
augmentation, no flip since a flip would break the box mapping), and one teacher view: a
zoomed-out crop that contains every online view, resized (aspect ratio not kept) with no
photometric augmentation. `boxes` gives each online view's crop inside the teacher crop in the
teacher's normalised coordinates, so the teacher's attention map can be resampled onto each view.

Randomness comes from torch's global RNG (DataLoader workers are seeded by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # A-CLIP follows SLIP: ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # (top, left, height, width) in original-image pixels


@dataclass(frozen=True)
class ViewSpec:
    """What the data pipeline must produce per sample for a method.

    `online_views == 0`: a single `image` [B,3,H,W] (CLIP, FLIP, MS-CLIP).
    `online_views >= 1`: also `views` [V,B,3,H,W], `teacher_image` [B,3,H',W'] and `boxes`
    [B,V,4] (each view's crop inside the teacher crop, normalised (x0, y0, x1, y1)).
    """

    online_views: int = 0
    teacher_size: int | None = None  # teacher view side in pixels; None = the model's image size
    augment: str = "clip"  # the method's own pipeline (clipkit.data.augment.PIPELINES)


class RandomPILGaussianBlur:
    """PIL Gaussian blur with sigma ~ U(lo, hi), the BYOL/SLIP version A-CLIP imports."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        radius = lo + (hi - lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def photometric_augmentation() -> T.Compose:
    """A-CLIP's online-view colour pipeline (main.py L171-180 of the official code)."""
    return T.Compose(
        [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([RandomPILGaussianBlur((0.1, 2.0))], p=0.1),
            T.RandomSolarize(threshold=128, p=0.2),
        ]
    )


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive) from torch's global RNG."""
    return int(torch.randint(low, high + 1, ()).item())


def covering_box(views: list[Box], height: int, width: int, scale: float = 1.0) -> Box:
    """A random box containing every view box: the views' union, grown towards the image border.

    The spec's intended rule (the released code had two bugs, aclip.md Sec. 7.4): top ~ U{0..
    top_union}, bottom ~ U{bottom_union..H}, same for left/right. `scale` in [0, 1] caps the growth
    to that fraction of the room left to each border (1: the spec, 0: the tight union).
    """
    top_u = min(t for t, _, _, _ in views)
    left_u = min(left for _, left, _, _ in views)
    bottom_u = max(t + h for t, _, h, _ in views)
    right_u = max(left + w for _, left, _, w in views)
    top = _randint(top_u - round(scale * top_u), top_u)
    left = _randint(left_u - round(scale * left_u), left_u)
    bottom = _randint(bottom_u, bottom_u + round(scale * (height - bottom_u)))
    right = _randint(right_u, right_u + round(scale * (width - right_u)))
    return top, left, bottom - top, right - left


def centre_box(height: int, width: int, size: tuple[int, int]) -> Box:
    """The largest centred box of the output's aspect ratio (what resize + centre crop keeps)."""
    ratio = size[1] / size[0]  # width / height
    h = min(height, round(width / ratio))
    w = min(width, round(h * ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def relative_box(view: Box, teacher: Box) -> tuple[float, float, float, float]:
    """`view` in `teacher`'s normalised (x0, y0, x1, y1) coordinates (continuous pixel edges)."""
    t, left, h, w = view
    te, le, he, we = teacher
    return ((left - le) / we, (t - te) / he, (left + w - le) / we, (t + h - te) / he)


class MultiViewTransform:
    """RGB PIL image -> dict(views (V,3,S,S), teacher_image (3,T,T), boxes (V,4) x0,y0,x1,y1).

    Args:
        image_size: online view side (int or (H, W)).
        num_views: online views per image.
        teacher_size: teacher view side; None = `image_size` (A-CLIP-eff uses half).
        mean, std: normalisation of every view.
        teacher_scale: how far the teacher crop grows past the views' union, as a fraction of the
            room left to each image border (1.0 = the spec's uniform growth).
        view_scale, ratio: the online views' RandomResizedCrop parameters; `view_scale` None:
            every view is the centre crop (`--augment none`).
        photometric: apply the colour/blur/solarize pipeline to the online views.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        num_views: int = 2,
        teacher_size: int | tuple[int, int] | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        teacher_scale: float = 1.0,
        view_scale: tuple[float, float] | None = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        photometric: bool = True,
    ):
        if num_views < 1:
            raise ValueError("MultiViewTransform needs num_views >= 1")
        if not 0.0 <= teacher_scale <= 1.0:
            raise ValueError("teacher_scale must be within [0, 1]")
        self.size = _pair(image_size)
        self.teacher_size = _pair(teacher_size if teacher_size is not None else image_size)
        self.num_views = num_views
        self.teacher_scale = teacher_scale
        self.view_scale = None if view_scale is None else tuple(view_scale)
        self.ratio = tuple(ratio)
        self.photometric = photometric_augmentation() if photometric else None
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def _crop(self, img: Image.Image, box: Box, size: tuple[int, int]) -> Image.Image:
        return TF.resized_crop(img, *box, list(size), InterpolationMode.BILINEAR)

    def _view_box(self, img: Image.Image) -> Box:
        if self.view_scale is None:
            return centre_box(img.height, img.width, self.size)
        return tuple(T.RandomResizedCrop.get_params(img, list(self.view_scale), list(self.ratio)))

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        img = img.convert("RGB")
        boxes = [self._view_box(img) for _ in range(self.num_views)]
        teacher_box = covering_box(boxes, img.height, img.width, self.teacher_scale)
        views = []
        for box in boxes:
            view = self._crop(img, box, self.size)
            if self.photometric is not None:
                view = self.photometric(view)
            views.append(self.to_tensor(view))
        return {
            "views": torch.stack(views),  # (V, 3, S, S)
            "teacher_image": self.to_tensor(self._crop(img, teacher_box, self.teacher_size)),
            "boxes": torch.tensor([relative_box(b, teacher_box) for b in boxes]),  # (V, 4)
        }
