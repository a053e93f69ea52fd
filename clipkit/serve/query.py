"""A `/knn-service` request body, read and checked field by field: every mistake is a
`BadRequest` with one line that names the field, never a traceback.

The fields are clip-retrieval's (clip_back.py's KnnService.post and ClipClient.query): text,
image (base64), image_url, embedding_input, modality, num_images, num_result_ids, indice_name,
deduplicate, use_safety_model, use_violence_detector, use_mclip, aesthetic_score,
aesthetic_weight. The safety, violence, mclip and aesthetic ones are accepted and ignored: clipkit
has no such models."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

IGNORED_FIELDS = (
    "use_safety_model",
    "use_violence_detector",
    "use_mclip",
    "aesthetic_score",
    "aesthetic_weight",
    "verbose",
)
MODALITIES = ("image", "text")


class BadRequest(ValueError):
    """A request the service refuses: `status` is the HTTP code (400, 404, 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class KnnQuery:
    """One search: exactly one of text / image_bytes / image_url / embedding is set."""

    indice_name: str
    text: str | None = None
    image_bytes: bytes | None = None
    image_url: str | None = None
    embedding: list[float] | None = None
    modality: str = "image"
    num_images: int = 40
    num_result_ids: int = 40
    deduplicate: bool = False

    @property
    def kind(self) -> str:
        """What the worker does with it: 'text' / 'image' to encode, 'embedding' as it is."""
        if self.text is not None:
            return "text"
        return "embedding" if self.embedding is not None else "image"


def _count(body: dict, name: str, default: int, limit: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {value!r}")
    if not 1 <= value <= limit:
        raise BadRequest(f"{name} must be between 1 and {limit} (the server's --max-results)")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {value!r}")
    return value


def _embedding(value: Any) -> list[float]:
    if not isinstance(value, list) or not value:
        raise BadRequest("embedding_input must be a non-empty list of numbers")
    if len(value) == 1 and isinstance(value[0], list):  # a (1, D) batch of one, as numpy prints it
        value = value[0]
    ok = all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)
    if not ok or not all(math.isfinite(x) for x in value):
        raise BadRequest("embedding_input must be a list of finite numbers")
    return [float(x) for x in value]


def _image_bytes(value: Any, max_bytes: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise BadRequest("image must be a base64 string of an image file")
    if "," in value[:64] and value.startswith("data:"):  # a data URI from a browser
        value = value.split(",", 1)[1]
    if len(value) > max_bytes * 4 // 3 + 4:
        raise BadRequest(f"image is larger than {max_bytes:,} bytes", status=413)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"text must be a string, got {value!r}")
    if not value.strip():
        raise BadRequest("text is empty")
    return value


def parse_knn(body: Any, default_index: str, max_results: int, max_image_bytes: int) -> KnnQuery:
    """The request `body` (decoded JSON) as a KnnQuery; `BadRequest` on any mistake."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    given = {
        k: body.get(k)
        for k in ("text", "image", "image_url", "embedding_input")
        if body.get(k) not in (None, "")
    }
    if "text" in body and body["text"] is not None and "text" not in given:
        raise BadRequest("text is empty")
    if len(given) != 1:
        raise BadRequest("give exactly one of text, image, image_url or embedding_input")
    modality = body.get("modality") or "image"
    if modality not in MODALITIES:
        raise BadRequest(f"modality must be 'image' or 'text', got {modality!r}")
    num_images = _count(body, "num_images", 40, max_results)
    indice = body.get("indice_name") or default_index
    if not isinstance(indice, str):
        raise BadRequest(f"indice_name must be a string, got {indice!r}")
    url = given.get("image_url")
    if url is not None and not isinstance(url, str):
        raise BadRequest("image_url must be a string")
    return KnnQuery(
        indice_name=indice,
        text=_text(given["text"]) if "text" in given else None,
        image_bytes=_image_bytes(given["image"], max_image_bytes) if "image" in given else None,
        image_url=url,
        embedding=_embedding(given["embedding_input"]) if "embedding_input" in given else None,
        modality=modality,
        num_images=num_images,
        num_result_ids=max(num_images, _count(body, "num_result_ids", num_images, max_results)),
        deduplicate=_flag(body, "deduplicate"),
    )


def parse_metadata(body: Any, default_index: str, max_results: int) -> tuple[str, list[int]]:
    """A `/metadata` body: {"ids": [...], "indice_name": ...} -> (index name, ids)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise BadRequest("ids must be a list of integers")
    if len(ids) > max_results:
        raise BadRequest(f"at most {max_results} ids per request (the server's --max-results)")
    indice = body.get("indice_name") or default_index
    if not isinstance(indice, str):
        raise BadRequest(f"indice_name must be a string, got {indice!r}")
    return indice, ids
