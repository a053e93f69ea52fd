"""Reading the evaluation sets' files: the errors a bad layout or a damaged file raises, image
decoding that never raises, and tar shards sample by sample (webdataset's grouping), each
DataLoader worker reading its own share."""

from __future__ import annotations

import copy
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
    """Base of the datasets over tars, each DataLoader worker reading its share of the shards.

    A subclass turns one sample into an item (`item`, None to leave it out). `share(rank,
    world)` gives a copy that decodes only every world-th sample of each shard, starting at
    `rank`, and appends to each item its place in the whole set, (shard number, sample number):
    sorting the ranks' items by it restores the order one process reads them in."""

    def __init__(self, shards: list[str], transform: Callable):
        self.shards, self.transform = shards, transform
        self.part: tuple[int, int] | None = None  # (rank, world) of a share; None: everything

    def share(self, rank: int, world: int) -> TarShards:
        part = copy.copy(self)
        part.part = (rank, world)
        return part

    def item(self, shard: str, key: str, fields: dict[str, bytes]) -> tuple | None:
        raise NotImplementedError

    def __iter__(self):
        rank, world = self.part or (0, 1)
        for place, (shard, key, fields) in self.placed_samples():
            if place[1] % world != rank:
                continue
            item = self.item(shard, key, fields)
            if item is not None:
                yield item if self.part is None else (*item, place)

    def placed_samples(self) -> Iterator[tuple[tuple[int, int], tuple[str, str, dict]]]:
        """((shard number, sample number), (shard, key, members)) of this worker's shards
        (round-robin share; all of them outside workers)."""
        info = torch.utils.data.get_worker_info()
        numbered = list(enumerate(self.shards))
        mine = numbered if info is None else numbered[info.id :: info.num_workers]
        for number, shard in mine:
            for position, (key, fields) in enumerate(iter_tar_samples(shard)):
                yield (number, position), (shard, key, fields)


class IndexedShare(torch.utils.data.Dataset):
    """Every world-th item of a map-style dataset from `rank` on, each with its index appended."""

    def __init__(self, dataset, rank: int, world: int):
        self.dataset, self.indices = dataset, range(rank, len(dataset), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        return (*self.dataset[index], index)


def rank_share(dataset, rank: int, world: int):
    """This rank's share of an evaluation dataset, each item tagged with its place in the whole
    (the last element; `tagged` collates it as "order")."""
    if isinstance(dataset, TarShards):
        return dataset.share(rank, world)
    return IndexedShare(dataset, rank, world)


def tagged(collate: Callable[[list], dict]) -> Callable[[list], dict]:
    """`collate` for items tagged by `rank_share`: the tags of the decodable items go to "order"
    (an item is decodable when its image, the first element, is not None)."""

    def collate_tagged(samples: list) -> dict:
        batch = collate([s[:-1] for s in samples])
        batch["order"] = [s[-1] for s in samples if s[0] is not None]
        return batch

    return collate_tagged
