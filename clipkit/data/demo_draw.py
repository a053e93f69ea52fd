"""Drawing the demo dataset's scenes: the attributes a scene can have and how they look.

A scene is a group of 1-3 same-coloured shapes in one region of a textured background; every
random choice comes from the caller's generator, so a seed fixes the image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
PLURALS = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}
COLOURS = {  # base RGB, far apart so that colour names are learnable
    "red": (220, 30, 30), "green": (30, 165, 50), "blue": (35, 75, 225),
    "yellow": (245, 215, 25), "purple": (140, 45, 185), "orange": (250, 135, 15),
    "white": (250, 250, 250), "black": (20, 20, 20),
}  # fmt: skip
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("plain", "gradient", "striped", "noisy")
# Muted background tones; each object colour uses only those that contrast with it.
_BG_TONES = np.array(
    [(200, 200, 200), (128, 128, 128), (60, 60, 65), (222, 205, 170), (75, 90, 110),
     (115, 95, 75), (175, 195, 220), (228, 196, 202), (185, 215, 195), (242, 236, 215),
     (35, 40, 75), (40, 105, 105)],
    dtype=np.float32,
)  # fmt: skip


def _lightness(rgb: np.ndarray) -> np.ndarray:
    """CIE L* (0-100) of sRGB colours (..., 3): what makes a shape stand out to the eye."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    return 116.0 * np.cbrt(linear @ np.array([0.2126, 0.7152, 0.0722])) - 16.0


# Per object colour, the background tones far from it in RGB *and* in lightness (yellow on cream
# is far in RGB yet hard to see).
_TONES_FOR = {
    name: _BG_TONES[
        (np.linalg.norm(_BG_TONES - np.array(rgb), axis=1) >= 140.0)
        & (np.abs(_lightness(_BG_TONES) - _lightness(np.array(rgb))) >= 20.0)
    ]
    for name, rgb in COLOURS.items()
}
_SIZE_RANGE = {"small": (0.17, 0.23), "large": (0.32, 0.45)}  # object extent / image side
_SUPERSAMPLE = 3  # shapes are drawn at 3x and box-filtered down for anti-aliased edges


def _background(rng: np.random.Generator, kind: str, colour: str, size: int) -> np.ndarray:
    """(H, W, 3) float32 background whose tones all contrast with the object colour."""
    tones = _TONES_FOR[colour]
    c1, c2 = tones[rng.choice(len(tones), size=2, replace=False)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    proj = xx * math.cos(angle) + yy * math.sin(angle)  # (H, W) coordinate along a random axis
    if kind == "plain":
        return np.broadcast_to(c1, (size, size, 3)).copy()
    if kind == "gradient":
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
        return c1 * (1 - t) + c2 * t
    if kind == "striped":
        period = rng.uniform(0.1, 0.2) * size
        triangle = np.abs(proj / period % 1.0 - 0.5) * 2  # 0..1 triangle wave along the axis
        stripe = np.clip((triangle - 0.5) * period / 2 + 0.5, 0, 1)[..., None]  # 1 px soft edge
        return c1 * (1 - stripe) + c2 * stripe
    blobs = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize(
        (size, size), Image.BILINEAR
    )  # low-frequency blotches plus per-pixel grain
    low = np.asarray(blobs, np.float32)[..., None] / 255.0
    return c1 * (1 - low) + c2 * low + rng.normal(0, 12, (size, size, 3)).astype(np.float32)


def _layout(rng: np.random.Generator, attrs: dict) -> tuple[float, list[tuple[float, float]]]:
    """Object extent and centres (fractions of the image side) for the group in its region."""
    n = attrs["count"]
    lo, hi = _SIZE_RANGE[attrs["size"]]
    extent = min(rng.uniform(lo, hi), (0.98 - 0.04 * (n - 1)) / n)  # n must fit side by side
    step = extent + rng.uniform(0.04, min(0.12, (0.98 - n * extent) / max(n - 1, 1)))
    slack = 0.98 - (n - 1) * step - extent
    pos = attrs["position"]
    shift = rng.uniform(-1, 1) * slack * (0.08 if pos == "center" else 0.18)
    along = 0.5 + shift + (np.arange(n) - (n - 1) / 2) * step
    if pos == "center":
        across = 0.5 + rng.uniform(-0.06, 0.06)
    else:  # the group hugs its half of the image, but stays fully inside it
        near = extent / 2 + 0.03
        far = max(0.42 - extent / 2, near)
        across = rng.uniform(near, far) if pos in ("left", "top") else 1 - rng.uniform(near, far)
    vertical = pos in ("left", "right")  # groups stack along the long side of their region
    return extent, [(across, a) if vertical else (a, across) for a in along]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices (polar, then rotated by `angle`) of a shape inscribed in the circle of radius r,
    so no rotation can push it into a neighbour or past the image border."""
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    else:  # cross: a plus sign with arms 0.6 r wide and 0.92 r long
        w, a = 0.3 * r, 0.92 * r
        xy = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a)]
        xy += [(-x, -y) for x, y in xy]
        pts = [(math.atan2(y, x), math.hypot(x, y)) for x, y in xy]
    return [(cx + d * math.cos(t + angle), cy + d * math.sin(t + angle)) for t, d in pts]


_MAX_TILT = {"square": 20.0, "triangle": 20.0, "star": 180.0, "cross": 20.0}


def draw_scene(rng: np.random.Generator, attrs: dict, image_size: int = 64) -> Image.Image:
    """Render `attrs` (from `sample_attrs`) as an RGB image of side `image_size`."""
    big = image_size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    extent, centres = _layout(rng, attrs)
    shape = attrs["shape"]
    for fx, fy in centres:
        cx, cy = fx * big, fy * big
        r = extent * big / 2 * rng.uniform(0.92, 1.0)
        if shape in ("circle", "ring"):
            for radius, fill in ((0.9 * r, 255), (0.5 * r, 0))[: 1 + (shape == "ring")]:
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            tilt = math.radians(rng.uniform(-_MAX_TILT[shape], _MAX_TILT[shape]))
            draw.polygon(_polygon(shape, cx, cy, r, tilt), fill=255)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.BOX), np.float32)[..., None]
    alpha /= 255.0  # (H, W, 1) anti-aliased coverage
    colour = np.array(COLOURS[attrs["colour"]], np.float32) + rng.integers(-12, 13, 3)
    bg = _background(rng, attrs["background"], attrs["colour"], image_size)
    pixels = bg * (1 - alpha) + colour * alpha  # (H, W, 3)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
