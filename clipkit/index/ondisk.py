"""Indexes built from embedding parts (`clipkit.index.parts`) without loading the collection.

While the raw float32 vectors fit the memory budget the parts are read into one matrix and
built as `build_index` builds any matrix (the one-command `retrieve index --data` path). Beyond
it, an IVF index is trained on a seeded sample read from the memory-mapped parts, each part is
added to its own copy of the trained index and saved, and the parts' inverted lists are merged
into one `OnDiskInvertedLists` file (`IMAGE.ivfdata` beside the index file; faiss's
`contrib/ondisk.py` recipe): at most one part's vectors and codes are in memory at a time, and
searches read the lists from disk. Exact top-k ground truth for tuning is computed part by part.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from clipkit.index.build import _robust_sq_ranges, _seed_training, _train_size, build_index
from clipkit.index.choose import IndexChoice, choose_index
from clipkit.index.errors import IndexBudgetError
from clipkit.index.parts import EmbeddingParts

log = logging.getLogger(__name__)
IVF_KINDS = ("ivf-flat", "ivf-sq", "ivf-pq")


def raw_bytes(parts: EmbeddingParts) -> int:
    """Memory of the collection as one float32 matrix."""
    return parts.total * parts.dim * 4


def fits_in_memory(parts: EmbeddingParts, max_memory: int) -> bool:
    return raw_bytes(parts) <= max_memory


def train_rows(parts: EmbeddingParts, choice: IndexChoice, max_memory: int) -> int:
    """Rows of the training sample: what `build_index` takes, but no more raw vectors than
    `max_memory` holds, while keeping 16 per list (faiss's k-means warns below 39 and still
    converges; the in-memory build trains on all rows of collections this small)."""
    fits = max_memory // (4 * parts.dim)
    floor = 16 * choice.params.get("nlist", 1)
    if choice.kind == "ivf-pq":
        floor = max(floor, 16 * 2 ** choice.params["nbits"])
    return min(_train_size(parts.total, choice), max(fits, floor))


def _trained_ivf(
    parts: EmbeddingParts, choice: IndexChoice, seed: int, max_memory: int
) -> faiss.Index:
    """An empty IVF index of `choice`, trained on a seeded sample of the parts' rows."""
    index = faiss.index_factory(parts.dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    _seed_training(index, seed)
    if choice.kind == "ivf-sq":
        _robust_sq_ranges(index)
    index.train(parts.sample(train_rows(parts, choice, max_memory), seed))
    return index


def _part_indexes(parts: EmbeddingParts, trained: faiss.Index, workdir: Path) -> list[Path]:
    """One saved copy of `trained` per part holding that part's rows (ids = global rows)."""
    paths = []
    for number, (start, rows) in enumerate(parts.chunks()):
        index = faiss.clone_index(trained)
        index.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
        paths.append(workdir / f"part-{number}.index")
        faiss.write_index(index, str(paths[-1]))
        del index
    return paths


def merge_on_disk(trained: faiss.Index, part_files: list[Path], lists_file: Path) -> faiss.Index:
    """`trained` holding every part's inverted lists, merged into `lists_file` on disk."""
    ivf = faiss.extract_index_ivf(trained)
    on_disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_file))
    # Memory-mapped: the parts' lists are paged in while merged, never all held at once.
    loaded = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in part_files]
    lists = faiss.InvertedListsPtrVector()
    for index in loaded:
        lists.push_back(faiss.extract_index_ivf(index).invlists)
    ntotal = on_disk.merge_from_multiple(lists.data(), lists.size(), False)  # ids kept
    del lists, loaded
    ivf.ntotal = trained.ntotal = ntotal
    ivf.replace_invlists(on_disk, True)  # the index now owns (and frees) the on-disk lists
    on_disk.this.disown()
    return trained


def build_from_parts(
    parts: EmbeddingParts,
    kind: str,
    max_memory: int,
    *,
    seed: int,
    lists_file: Path,
    workdir: Path,
) -> tuple[faiss.Index, IndexChoice, bool]:
    """(index, its choice, whether its inverted lists are on disk in `lists_file`). In memory
    while the raw vectors fit `max_memory`, else IVF with on-disk lists (see the module doc);
    `workdir` holds the per-part indexes while they are merged."""
    choice = choose_index(parts.total, parts.dim, max_memory, kind=kind)
    if fits_in_memory(parts, max_memory):
        vectors = np.concatenate([rows for _, rows in parts.chunks()])
        return build_index(vectors, kind, max_memory, seed=seed), choice, False
    if choice.kind not in IVF_KINDS:
        raise IndexBudgetError(
            f"the {parts.total} x {parts.dim} embeddings ({raw_bytes(parts):,} bytes) exceed "
            f"--max-memory and a {choice.kind} index holds them all in memory; use "
            "--index-type auto or an ivf kind"
        )
    trained = _trained_ivf(parts, choice, seed, max_memory)
    part_files = _part_indexes(parts, trained, workdir)
    log.info("merging %d part indexes into %s", len(part_files), lists_file)
    return merge_on_disk(trained, part_files, lists_file), choice, True


def exact_neighbours(parts: EmbeddingParts, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the exact top-k by inner product, scanning the parts one at a time."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, rows in parts.chunks():
        scores, ids = faiss.knn(queries, rows, min(k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
        if ids.shape[1] < k:  # a part smaller than k: pad with no-result entries
            pad = ((0, 0), (0, k - ids.shape[1]))
            scores = np.pad(scores, pad, constant_values=-np.inf)
            ids = np.pad(ids, pad, constant_values=-1 - start)
        heap.add_result(scores, ids + start)
    heap.finalize()
    return heap.I
