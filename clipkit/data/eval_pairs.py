"""Captioned (image, captions) data for retrieval: img2dataset shards (`key.jpg|png|webp` +
`key.txt`, one caption per line), CLIP_benchmark's retrieval layout (DIR/{split}/*.tar), or a
folder of images with same-name `.txt` captions (clip-retrieval's folder input). Undecodable
images are dropped by the collate and reported by name, as for the labelled sets."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.data

from clipkit.data.eval_io import (
    DataReadError,
    DatasetLayoutError,
    TarShards,
    image_member,
    iter_tar_samples,
    open_image,
)
from clipkit.data.eval_sets import IMAGE_EXTS, fingerprint_files
from clipkit.data.names import folder_dataset_name, wds_dataset_name

log = logging.getLogger(__name__)


@dataclass
class PairedSet:
    """Images with one or more captions each: img2dataset / CLIP_benchmark retrieval shards, or
    a folder of images with same-name `.txt` captions (clip-retrieval's folder input)."""

    root: str
    dataset: object
    num_samples: int | None
    kind: str  # "shards" | "folder"
    fingerprint: list = field(default_factory=list)
    name: str = ""  # what results call it (`clipkit.data.names.folder_dataset_name`)


def split_captions(data: bytes | None) -> list[str]:
    """A `txt` member holds one caption per non-empty line."""
    if data is None:
        return []
    text = data.decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


class TarPairs(TarShards):
    """item = (image | None, captions, key, source shard)."""

    def item(self, shard: str, key: str, fields: dict[str, bytes]):
        image = image_member(fields)
        if image is None:
            return None  # not an image sample (e.g. a stray json)
        captions = split_captions(fields.get("txt"))
        return open_image(image, self.transform), captions, key, shard


class FolderPairs(torch.utils.data.Dataset):
    """item = (image | None, captions from PATH.txt (may be empty), relative path, path)."""

    def __init__(self, root: Path, files: list[Path], transform: Callable):
        self.root, self.files, self.transform = root, files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        txt = path.with_suffix(".txt")
        captions = split_captions(txt.read_bytes()) if txt.is_file() else []
        key = str(path.relative_to(self.root))
        return open_image(str(path), self.transform), captions, key, str(path)


def collate_pairs(samples: list) -> dict:
    good = [s for s in samples if s[0] is not None]
    return {
        "image": torch.stack([s[0] for s in good]) if good else None,
        "captions": [s[1] for s in good],
        "key": [s[2] for s in good],
        "source": [s[3] for s in good],
        "bad": [f"{s[3]}:{s[2]}" for s in samples if s[0] is None],
    }


def _shard_count(shards: list[Path]) -> int | None:
    from clipkit.data.sources import read_sizes

    return read_sizes([str(s) for s in shards])


def paired_set(data: str | Path, transform: Callable, split: str = "test") -> PairedSet:
    """Open captioned data: a .tar, a directory of *.tar (or DIR/{split}/*.tar, CLIP_benchmark's
    retrieval layout), or a folder tree of images with optional same-name .txt captions."""
    root = Path(data)
    name = folder_dataset_name(root)
    if root.is_file() and root.suffix == ".tar":
        shards = [root]
    elif root.is_dir():
        shards = sorted(root.glob("*.tar"))
        if not shards and (root / split).is_dir():  # CLIP_benchmark's retrieval layout
            shards, name = sorted((root / split).glob("*.tar")), wds_dataset_name(root)
    else:
        raise DatasetLayoutError(f"data not found: {root}")
    if shards:
        return PairedSet(
            str(root),
            TarPairs([str(s) for s in shards], transform),
            _shard_count(shards),
            "shards",
            fingerprint_files(shards),
            name,
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise DatasetLayoutError(
            f"{root}: expected img2dataset shards (*.tar with jpg|png|webp + txt), {root}/{split}/"
            "*.tar, or a folder of images with same-name .txt captions"
        )
    fp = fingerprint_files(files[:: max(1, len(files) // 64)]) + [len(files)]
    return PairedSet(str(root), FolderPairs(root, files, transform), len(files), "folder", fp, name)


def read_image_bytes(wanted: list[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """Raw images of indexed samples, by (source, key): one pass per shard, for galleries.
    Samples whose source is gone are left out."""
    found: dict[tuple[str, str], bytes] = {}
    by_source: dict[str, set[str]] = {}
    for source, key in wanted:
        by_source.setdefault(source, set()).add(key)
    for source, keys in by_source.items():
        if not Path(source).is_file():
            continue
        if not source.endswith(".tar"):
            found.update({(source, k): Path(source).read_bytes() for k in keys})
            continue
        try:
            for key, fields in iter_tar_samples(source):
                image = image_member(fields)
                if key in keys and image is not None:
                    found[(source, key)] = image
        except DataReadError as e:  # damaged since it was indexed: show what could be read
            log.warning("%s", e)
    return found
