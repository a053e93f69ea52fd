"""Turn one raw WebDataset sample (bytes per extension) into an RGB image and a caption, or say
why it is unusable. Reasons are counted by the stream and reported in logs and metrics.jsonl."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
from PIL import Image


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short, stable name for counting."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: rescale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr / top * 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise BadSample("too_many_pixels")
            img.load()
            return _to_rgb(img)
    except BadSample:
        raise
    except Exception:  # PIL raises many types for corrupt data
        raise BadSample("undecodable_image") from None


def decode_caption(data: bytes | None, rng: random.Random) -> str:
    """One caption; a `txt` member with several lines holds several captions (one is drawn)."""
    if data is None:
        raise BadSample("no_caption")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("caption_not_utf8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise BadSample("empty_caption")
    return lines[0] if len(lines) == 1 else rng.choice(lines)


def pick(sample: dict, keys: str) -> bytes | None:
    """The first present member among `keys` ('jpg;png;webp' style, as webdataset's to_tuple)."""
    for key in keys.split(";"):
        if key in sample:
            return sample[key]
    return None
