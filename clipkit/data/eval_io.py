"""Reading the evaluation sets' files: the errors a bad layout or a damaged file raises, image
decoding that never raises, and tar shards sample by sample (webdataset's grouping), each
DataLoader worker reading its own share."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.utils.data
from PIL import Image

from clipkit.config import ConfigError
from clipkit.data.tarscan import TarStopped, read_members, sample_key

WDS_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")


class DatasetLayoutError(ConfigError):
    """A data root that does not have the expected layout (a user error: exit 2)."""


class DataReadError(DatasetLayoutError):
    """Data that cannot be read to its end (a damaged tar shard).

    Raised in a DataLoader worker, it reaches the main process as `DataReadError(text)` where
    the text is torch's "Caught ... Original Traceback ..." report; only the original message
    (its last line) is kept, so the command still ends with one line."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2] or message
        super().__init__(message)


def open_image(data_or_path, transform: Callable):
    """The transformed image, or None if it cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
            with Image.open(src) as img:
                img.load()
                return transform(img.convert("RGB"))
    except Exception:  # PIL raises many types for corrupt data
        return None


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar; members of one sample are consecutive and share
    the name up to the first dot of the basename (webdataset's convention).

    A shard that stops before its end raises `DataReadError`: scoring part of a test set
    without a word would report numbers on data nobody chose."""
    key, fields, done = None, {}, 0
    try:
        with open(path, "rb") as f:
            for name, data in read_members(f):
                new = sample_key(name)
                if new is None:
                    continue
                if new != key:
                    if key is not None:
                        yield key, fields
                        done += 1
                    key, fields = new, {}
                fields[name.rpartition("/")[2].split(".", 1)[1].lower()] = data
    except TarStopped as stop:
        raise DataReadError(
            f"{path} is damaged: {stop}, after {done} sample(s); re-download or repair the shard"
        ) from None
    except OSError as e:
        raise DataReadError(f"{path}: cannot read it ({e.strerror or e})") from None
    if key is not None:
        yield key, fields


def image_member(fields: dict[str, bytes]) -> bytes | None:
    """A tar sample's image: its first member named in WDS_IMAGE_KEYS, None without one."""
    return next((fields[k] for k in WDS_IMAGE_KEYS if k in fields), None)


class TarShards(torch.utils.data.IterableDataset):
    """Base of the datasets over tars: `samples()` walks this DataLoader worker's share."""

    def __init__(self, shards: list[str], transform: Callable):
        self.shards, self.transform = shards, transform

    def samples(self) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """(shard, key, members) of each sample of this worker's shards (round-robin share;
        all of them outside workers)."""
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            for key, fields in iter_tar_samples(shard):
                yield shard, key, fields
