"""Images in and out of the service: the query image of a request (base64 bytes, or fetched
from an http(s) / file URL), and the indexed images that results carry inline, read straight
from their tar shard through a table of member offsets made once per shard."""

from __future__ import annotations

import tarfile
import threading
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path

from clipkit.data.eval_io import WDS_IMAGE_KEYS
from clipkit.data.tarscan import sample_key
from clipkit.serve.query import BadRequest

FETCH_TIMEOUT_S = 10


def fetch_image(url: str, max_bytes: int, allow_files: bool) -> bytes:
    """The bytes behind an image URL (http, https or file); `BadRequest` when it cannot be had."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        if not allow_files:
            raise BadRequest("image_url: file URLs are turned off on this server (--no-file-urls)")
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        if not path.is_file():
            raise BadRequest(f"image_url: no such file {path}")
        if path.stat().st_size > max_bytes:
            raise BadRequest(f"image_url: the file is larger than {max_bytes:,} bytes", 413)
        return path.read_bytes()
    if scheme not in ("http", "https"):
        raise BadRequest(f"image_url must be an http, https or file URL, got {url[:80]!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "clipkit-serve"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
        raise BadRequest(f"image_url: cannot fetch it ({type(e).__name__}: {e})") from None
    if len(data) > max_bytes:
        raise BadRequest(f"image_url: the image is larger than {max_bytes:,} bytes", 413)
    return data


class ImageStore:
    """Raw image bytes of indexed samples by (source, key). A tar source is scanned once for
    where each sample's image member starts (webdataset's naming, clipkit's preferred image
    member); later reads seek there. The tables of the most recently used shards are kept."""

    def __init__(self, max_shards: int = 64):
        self._offsets: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._max_shards = max_shards
        self._lock = threading.Lock()

    def get(self, source: str, key: str) -> bytes | None:
        if not source or not Path(source).is_file():
            return None
        if not source.endswith(".tar"):
            return Path(source).read_bytes()
        where = self._table(source).get(key)
        if where is None:
            return None
        with open(source, "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def _table(self, source: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            if source in self._offsets:
                self._offsets.move_to_end(source)
                return self._offsets[source]
        table = _image_offsets(source)
        with self._lock:
            self._offsets[source] = table
            while len(self._offsets) > self._max_shards:
                self._offsets.popitem(last=False)
        return table


def _image_offsets(source: str) -> dict[str, tuple[int, int]]:
    """key -> (data offset, size) of each sample's image member, by WDS_IMAGE_KEYS' order."""
    found: dict[str, tuple[int, tuple[int, int]]] = {}
    try:
        with tarfile.open(source) as tar:
            for info in tar:
                key = sample_key(info.name)
                ext = info.name.rpartition("/")[2].partition(".")[2].lower()
                if key is None or not info.isreg() or ext not in WDS_IMAGE_KEYS:
                    continue
                rank = WDS_IMAGE_KEYS.index(ext)
                if key not in found or rank < found[key][0]:
                    found[key] = (rank, (info.offset_data, info.size))
    except (OSError, tarfile.TarError):  # damaged since it was indexed: what was read is kept
        pass
    return {key: where for key, (_, where) in found.items()}
