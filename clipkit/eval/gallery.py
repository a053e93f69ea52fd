"""A self-contained HTML page of search results: thumbnails embedded as base64 data URIs (read
from the indexed shards or files), with rank, score, key and caption. No external assets, so the
page can be mailed or archived as one file."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from PIL import Image

from clipkit.data.eval_pairs import read_image_bytes

THUMB_SIDE = 160

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; background: #fafafa; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
.sub { color: #666; font-size: 13px; margin-bottom: 16px; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.card { width: 176px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.card img { width: 160px; height: 160px; object-fit: contain; image-rendering: pixelated;
            background: #eee; display: block; }
.meta { font-size: 12px; margin-top: 6px; }
.score { font-weight: 600; }
.key { color: #888; font-family: monospace; font-size: 11px; word-break: break-all; }
.missing { width: 160px; height: 160px; background: #eee; color: #999; display: flex;
           align-items: center; justify-content: center; font-size: 12px; }
"""


def thumbnail_data_uri(data: bytes, side: int = THUMB_SIDE) -> str | None:
    """A PNG data URI of the image scaled to fit `side` (upscaled small images stay sharp)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            scale = side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            resample = Image.NEAREST if scale > 1 else Image.BICUBIC
            buf = io.BytesIO()
            img.resize(size, resample).save(buf, format="PNG")
    except Exception:  # a thumbnail that cannot be made is shown as missing
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(hit: dict[str, Any], uri: str | None) -> str:
    image = (
        f'<img src="{uri}" alt="{html.escape(hit["key"])}">'
        if uri
        else '<div class="missing">image not found</div>'
    )
    return (
        f'<div class="card">{image}<div class="meta"><span class="score">#{hit["rank"]} '
        f"&middot; {hit['score']:.4f}</span><br>{html.escape(hit['caption'])}<br>"
        f'<span class="key">{html.escape(hit["key"])}</span></div></div>'
    )


def gallery_html(query: str, hits: list[dict[str, Any]], subtitle: str = "") -> str:
    images = read_image_bytes([(h["source"], h["key"]) for h in hits])
    cards = []
    for hit in hits:
        data = images.get((hit["source"], hit["key"]))
        cards.append(_card(hit, thumbnail_data_uri(data) if data else None))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>clipkit search: {html.escape(query)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(query)}</h1><div class='sub'>{html.escape(subtitle)}</div>"
        f'<div class="grid">{"".join(cards)}</div></body></html>\n'
    )
