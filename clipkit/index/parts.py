"""Embedding parts on disk, in clip-retrieval's inference layout (so tools that read its output,
autofaiss or embedding-reader, read ours):

    DIR/img_emb/img_emb_{n}.npy              (rows, D) image embeddings, float16 or float32
    DIR/text_emb/text_emb_{n}.npy            (rows, D) one caption embedding per image row
    DIR/metadata/metadata_{n}.parquet        one row per image: image_path, caption, key, shard,
                                             and the fields of the sample's json (url, ...)

`n` is the part number zero-padded to the digits of the part count, as clip-retrieval pads it,
so the files sort in part order. A part counts only when its three files exist: the writer
renames the metadata into place last. Parts are read memory-mapped, one at a time.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipkit.fileio import make_temp_file

IMAGE_DIR, TEXT_DIR, META_DIR = "img_emb", "text_emb", "metadata"


def part_label(number: int, count: int) -> str:
    """Part `number` of `count`, zero-padded as clip-retrieval pads it (10 parts: 00..09)."""
    return str(number).zfill(int(math.log10(max(count, 1))) + 1)


@dataclass(frozen=True)
class PartFiles:
    """The three files of one part."""

    image: Path
    text: Path
    metadata: Path

    @classmethod
    def at(cls, root: str | Path, label: str) -> PartFiles:
        root = Path(root)
        return cls(
            root / IMAGE_DIR / f"img_emb_{label}.npy",
            root / TEXT_DIR / f"text_emb_{label}.npy",
            root / META_DIR / f"metadata_{label}.parquet",
        )

    def done(self) -> bool:
        return self.image.is_file() and self.text.is_file() and self.metadata.is_file()


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_temp_file(path.parent, f".{path.name}.", ".tmp")


def write_part(
    files: PartFiles, images: np.ndarray, texts: np.ndarray, metadata: list[dict]
) -> None:
    """Write one part atomically: every file goes to a temporary name first, the two arrays are
    renamed into place, the metadata last (its presence marks the part done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    temps = {files.image: _temp_beside(files.image), files.text: _temp_beside(files.text)}
    temps[files.metadata] = _temp_beside(files.metadata)
    try:
        for array, final in ((images, files.image), (texts, files.text)):
            with open(temps[final], "wb") as f:
                np.save(f, array)
        pq.write_table(pa.Table.from_pylist(metadata), temps[files.metadata])
        for final, temp in temps.items():  # dict order: image, text, metadata last
            os.replace(temp, final)
    finally:
        for temp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def find_parts(root: str | Path) -> list[PartFiles]:
    """The complete parts under `root`, in part order (metadata file names sort in it)."""
    found = []
    for meta in sorted((Path(root) / META_DIR).glob("metadata_*.parquet")):
        files = PartFiles.at(root, meta.stem.removeprefix("metadata_"))
        if files.done():
            found.append(files)
    return found


def read_metadata(files: PartFiles) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(files.metadata).to_pylist()


@dataclass
class EmbeddingParts:
    """The parts of an embedding folder, read lazily: `images(i)` maps one part's array."""

    root: Path
    parts: list[PartFiles]
    counts: list[int]
    dim: int

    @classmethod
    def open(cls, root: str | Path) -> EmbeddingParts:
        parts = find_parts(root)
        if not parts:
            raise FileNotFoundError(
                f"{root}: no embedding parts ({IMAGE_DIR}/, {TEXT_DIR}/, {META_DIR}/)"
            )
        shapes = [np.load(p.image, mmap_mode="r").shape for p in parts]
        dims = {s[1] for s in shapes if len(s) == 2}
        if len(dims) != 1 or any(len(s) != 2 for s in shapes):
            raise ValueError(f"{root}: parts disagree on the embedding shape ({shapes[:4]}...)")
        return cls(Path(root), parts, [s[0] for s in shapes], dims.pop())

    @property
    def total(self) -> int:
        return sum(self.counts)

    def images(self, i: int) -> np.ndarray:
        return np.load(self.parts[i].image, mmap_mode="r")

    def texts(self, i: int) -> np.ndarray:
        return np.load(self.parts[i].text, mmap_mode="r")

    def offsets(self) -> list[int]:
        """Global row number of each part's first row."""
        return [0, *np.cumsum(self.counts)[:-1].tolist()]

    def chunks(self, which: str = "image") -> Iterator[tuple[int, np.ndarray]]:
        """(first global row, float32 rows) of every part in turn; one part in memory at once."""
        read = self.images if which == "image" else self.texts
        for i, start in enumerate(self.offsets()):
            if self.counts[i]:  # an empty shard's part holds no rows
                yield start, np.ascontiguousarray(read(i), dtype=np.float32)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The image rows with these global numbers, in the order given, float32 (read from the
        memory-mapped parts they fall in)."""
        ids = np.asarray(ids, dtype=np.int64)
        part = np.searchsorted(np.cumsum(self.counts), ids, side="right")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        starts = self.offsets()
        for i in np.unique(part):
            mine = part == i
            out[mine] = self.images(int(i))[ids[mine] - starts[i]]
        return out

    def sample(self, n: int, seed: int, which: str = "image") -> np.ndarray:
        """A seeded random sample of `n` rows (all rows when fewer), float32, read from the
        memory-mapped parts part by part (never the whole collection)."""
        n = min(n, self.total)
        rows = np.sort(np.random.default_rng(seed).choice(self.total, n, replace=False))
        read = self.images if which == "image" else self.texts
        out, bounds = [], np.cumsum(self.counts)
        for i, start in enumerate(self.offsets()):
            mine = rows[(rows >= start) & (rows < bounds[i])] - start
            if len(mine):
                out.append(np.asarray(read(i)[mine], dtype=np.float32))
        return np.concatenate(out)
