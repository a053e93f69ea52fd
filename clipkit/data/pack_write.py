"""The per-record and per-shard work of `clipkit data pack`, run in its worker processes.

`fingerprint` reads one record (image bytes, caption) and either names why it is unusable or
returns the sha256 that finds exact duplicates; `encode_record` decodes, resizes and encodes
one. Both run in the worker processes, record by record, so every process is busy however few
shards there are. `write_shard` (in the main process) writes a shard's encoded records
atomically with its img2dataset-style stats file; its bytes depend only on the records and the
settings, never on the process or the time.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipkit.data.decode import BadSample, decode_image
from clipkit.data.pack_sources import Record, read_image_bytes
from clipkit.data.tarwrite import write_tar_atomic
from clipkit.fileio import atomic_write_bytes

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")


@dataclass(frozen=True)
class ShardSettings:
    """What the bytes of a shard depend on, besides its records."""

    kind: str  # the source kind (pack_sources.KINDS)
    source: str
    image_col: str
    resize_mode: str
    image_size: int
    quality: int  # JPEG quality
    max_pixels: int
    eval_layout: bool  # KEY.png + KEY.cls instead of KEY.jpg + KEY.txt
    key_digits: int  # of the sample index inside a shard


def check_caption(caption: str | bytes | None, needed: bool = True) -> str:
    """The caption as text, or BadSample: none, not UTF-8, or blank."""
    if caption is None:
        if not needed:
            return ""
        raise BadSample("no_caption")
    try:
        text = caption.decode("utf-8") if isinstance(caption, bytes) else caption
        text.encode("utf-8")  # a CSV cell read with surrogateescape fails here
    except UnicodeError:
        raise BadSample("caption_not_utf8") from None
    if needed and not text.strip():
        raise BadSample("empty_caption")
    return text.strip()


def _image_bytes(record: Record, s: ShardSettings) -> bytes:
    try:
        return read_image_bytes(record, s.kind, s.source, s.image_col)
    except OSError:
        raise BadSample("missing_image") from None


def fingerprint(record: Record, s: ShardSettings) -> tuple[str | None, str | None]:
    """(sha256 of image bytes + caption, None), or (None, the reason the record is unusable)."""
    try:
        caption = check_caption(record.caption, needed=not s.eval_layout)
        data = _image_bytes(record, s)
    except BadSample as e:
        return None, e.reason
    if not data:
        return None, "empty_image"
    h = hashlib.sha256(data)
    h.update(b"\0" + caption.encode("utf-8") + b"\0" + str(record.label).encode())
    return h.hexdigest(), None


def resize(image: Image.Image, mode: str, size: int) -> Image.Image:
    """img2dataset's resize modes: `keep_ratio` (shorter side to `size`), `center_crop` (then the
    middle square), `border` (longer side to `size`, padded to a black square), `no`."""
    if mode == "no":
        return image
    w, h = image.size
    side = min(w, h) if mode != "border" else max(w, h)
    scale = size / side
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "center_crop":
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif mode == "border":
        square = Image.new("RGB", (size, size))
        square.paste(image, ((size - new[0]) // 2, (size - new[1]) // 2))
        image = square
    return image


def encode_image(data: bytes, s: ShardSettings) -> tuple[bytes, dict]:
    """(encoded bytes, size fields for KEY.json); BadSample for an unusable image."""
    image = decode_image(data, s.max_pixels)
    original = image.size
    image = resize(image, s.resize_mode, s.image_size)
    buf = io.BytesIO()
    if s.eval_layout:
        image.save(buf, format="PNG")
    elif s.resize_mode == "no" and data[:3] == b"\xff\xd8\xff":
        buf.write(data)  # a JPEG kept as it is: no second lossy pass
    else:
        image.save(buf, format="JPEG", quality=s.quality)
    sizes = {"width": image.width, "height": image.height}
    sizes.update(original_width=original[0], original_height=original[1])
    return buf.getvalue(), sizes


def encode_record(record: Record, s: ShardSettings) -> tuple[dict | None, str | None]:
    """({image, sizes, caption}, None) ready for a shard, or (None, why it is unusable)."""
    try:
        caption = check_caption(record.caption, needed=not s.eval_layout)
        image, sizes = encode_image(_image_bytes(record, s), s)
    except BadSample as e:
        return None, e.reason
    return {"image": image, "sizes": sizes, "caption": caption}, None


def _fields(record: Record, key: str, encoded: dict, s: ShardSettings) -> dict[str, bytes]:
    meta = {"key": key, "source": record.name, **record.meta, **encoded["sizes"]}
    if s.eval_layout:
        fields = {"png": encoded["image"], "cls": str(record.label).encode()}
    else:
        meta["caption"] = encoded["caption"]
        fields = {"jpg": encoded["image"], "txt": encoded["caption"].encode("utf-8")}
    fields["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return fields


def stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name.split(".")[0] + "_stats.json")


def write_shard(
    path: Path, index: int, records: list[Record], encoded: list[tuple], s: ShardSettings, plan: str
) -> dict:
    """Write one shard from its records and what `encode_record` made of them (unusable ones
    skipped), then its stats file, whose `plan` says which pack it belongs to; returns the
    stats."""
    skipped: dict[str, list[str]] = {}
    samples = []
    for record, (done, reason) in zip(records, encoded, strict=True):
        if done is None:
            skipped.setdefault(reason, []).append(record.name)
            continue
        key = f"{index:05d}{len(samples):0{s.key_digits}d}"
        samples.append((key, _fields(record, key, done, s)))
    write_tar_atomic(path, samples)
    stats = {
        "count": len(records),
        "successes": len(samples),
        "failed": {reason: len(names) for reason, names in sorted(skipped.items())},
        "failed_names": dict(sorted(skipped.items())),
        "bytes": path.stat().st_size,
        "plan": plan,
    }
    atomic_write_bytes(stats_path(path), (json.dumps(stats, indent=1) + "\n").encode())
    return stats
