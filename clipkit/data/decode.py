"""Turn one raw WebDataset sample (bytes per extension) into an RGB image and a caption, or say
why it is unusable. Reasons are counted by the stream and reported in logs and metrics.jsonl."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
from PIL import Image


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short, stable name for counting, `detail` a
    phrase for messages (which key was missing, what the sample held)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


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
    too_big = BadSample("too_many_pixels", f"image over --max-pixels {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns past its own limit; ours decides
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise too_big
            img.load()
            return _to_rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError:  # over twice PIL's limit: refused before our check
        raise too_big from None
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


def member(sample: dict, keys: str, reason: str, what: str) -> bytes:
    """The member `pick` finds, or BadSample(reason) naming the keys looked for and those found
    (a --text-key or --image-key typo then reads plainly in the error)."""
    data = pick(sample, keys)
    if data is None:
        found = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        raise BadSample(reason, f"no {what} under key '{keys}'; found keys: {found}")
    return data


def pick(sample: dict, keys: str) -> bytes | None:
    """The first present member among `keys` ('jpg;png;webp' style, as webdataset's to_tuple)."""
    for key in keys.split(";"):
        if key in sample:
            return sample[key]
    return None
