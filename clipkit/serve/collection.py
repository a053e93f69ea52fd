"""One served index directory: its FAISS index, metadata rows, stored embeddings (for
deduplication) and the encoder that embeds its queries, and the result rows clip-retrieval's
back returns: {"id", "similarity", "caption", "url" / "image", ...}."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipkit.eval.retrieval import IndexDir
from clipkit.index.parts import EmbeddingParts
from clipkit.serve.images import ImageStore
from clipkit.serve.query import BadRequest
from clipkit.serve.worker import Encoder

# clip-retrieval's back drops results whose image embedding has a cosine >= 0.94 with a
# better-ranked one (connected components of that graph; the best of each is kept).
DEDUP_THRESHOLD = 0.94


@dataclass
class Collection:
    name: str
    index_dir: IndexDir
    encoder: Encoder
    inline_images: bool = True
    images: ImageStore = field(default_factory=ImageStore)
    # the image embeddings of given rows (for deduplication): image_embeddings.npy, or the
    # embedding parts an index built with --embeddings names; None when neither is there
    embeddings: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def open(cls, name: str, index_dir: IndexDir, encoder: Encoder, **kwargs) -> Collection:
        return cls(name, index_dir, encoder, embeddings=_row_reader(index_dir), **kwargs)

    @property
    def size(self) -> int:
        return int(self.index_dir.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index_dir.index.d)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.index_dir.path),
            "images": self.size,
            "dim": self.dim,
            "index_type": self.index_dir.report.get("index_type"),
            "model": self.index_dir.model_info.get("name"),
        }

    def check_vector(self, values: list[float]) -> None:
        if len(values) != self.dim:
            raise BadRequest(
                f"embedding_input has {len(values)} values but index '{self.name}' holds "
                f"{self.dim}-dim vectors"
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's own search (as `clipkit retrieve search`), k capped at its size."""
        from clipkit import index as faiss_index

        return faiss_index.search(self.index_dir.index, queries, min(k, self.size))

    def results(
        self, scores: np.ndarray, ids: np.ndarray, num_images: int, deduplicate: bool
    ) -> list[dict[str, Any]]:
        """clip-retrieval's answer: every kept id with its similarity, best first; the first
        `num_images` also carry their metadata (caption, key, url / inline image)."""
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        if deduplicate and self.embeddings is not None and len(ids) > 1:
            keep = _unique_rows(self.embeddings(ids))
            scores, ids = scores[keep], ids[keep]
        out = []
        for rank, (score, row) in enumerate(zip(scores, ids, strict=True)):
            entry = self.metadata_of(int(row)) if rank < num_images else {}
            entry.update(id=int(row), similarity=float(score))
            out.append(entry)
        return out

    def metadata_of(self, row: int) -> dict[str, Any]:
        """The metadata fields of one row: caption, key, and url (when the data had one) or
        the image itself inline (base64, when --inline-images and its file is readable)."""
        meta = self.index_dir.metadata[row]
        entry = {"caption": meta.get("caption", ""), "key": meta.get("key", "")}
        if meta.get("url"):
            entry["url"] = meta["url"]
        if self.inline_images:
            data = self.images.get(meta.get("source", ""), meta.get("key", ""))
            if data is not None:
                entry["image"] = base64.b64encode(data).decode("ascii")
        return entry

    def metadata(self, ids: list[int]) -> list[dict[str, Any]]:
        """`/metadata`: [{"id", "metadata": {...}}]; ids outside the index get {} as metadata."""
        return [
            {"id": i, "metadata": self.metadata_of(i) if 0 <= i < self.size else {}} for i in ids
        ]


def _unique_rows(vectors: np.ndarray) -> np.ndarray:
    """Mask over results (best first) keeping the best-ranked member of each group of
    near-duplicates (cosine >= DEDUP_THRESHOLD, grouped transitively)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms == 0, 1, norms)
    similar = vectors @ vectors.T >= DEDUP_THRESHOLD
    group = list(range(len(vectors)))  # union-find: each group's root is its best-ranked member

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(similar, 1)), strict=True):
        a, b = root(int(i)), root(int(j))
        if a != b:
            group[max(a, b)] = min(a, b)
    return np.array([root(i) == i for i in range(len(vectors))])


def _row_reader(index_dir: IndexDir) -> Callable[[np.ndarray], np.ndarray] | None:
    """Where the index's image rows can be read back, memory-mapped; None (no deduplication)
    when the stored rows are missing or are not the index's."""
    total = index_dir.index.ntotal
    path = index_dir.path / "image_embeddings.npy"
    if path.is_file():
        stored = np.load(path, mmap_mode="r")
        if stored.shape[0] == total:
            return lambda ids: np.asarray(stored[ids], dtype=np.float32)
        return None
    folder = index_dir.report.get("embeddings")
    try:
        parts = EmbeddingParts.open(folder) if folder else None
    except (OSError, ValueError):
        return None
    return parts.rows if parts is not None and parts.total == total else None
