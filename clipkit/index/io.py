"""Save and load index files (atomically, memory-mapped) and summarise an index as JSON."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import faiss

from clipkit.fileio import make_temp_file
from clipkit.index.build import _inner, to_cpu
from clipkit.index.errors import IndexFileError

log = logging.getLogger(__name__)


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write `index` (a CPU copy if on GPU) to `path` atomically: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(make_temp_file(path.parent, f".{path.name}.", ".tmp"))  # umask's mode, not 0600
    try:
        faiss.write_index(to_cpu(index), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_index(path: str | os.PathLike, mmap: bool = True) -> faiss.Index:
    """Read an index; with `mmap`, vectors / codes / inverted lists stay on disk, read-only.
    A file faiss cannot parse raises `IndexFileError` (faiss's own error is a long C++ trace)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}")
    # On-disk inverted lists (`clipkit.index.ondisk`) are found beside the index file, wherever
    # the folder has been moved since it was written.
    same_dir = faiss.IO_FLAG_ONDISK_SAME_DIR
    if mmap:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY | same_dir
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError as e:  # an index type faiss cannot map: read it into memory
            log.debug("faiss cannot memory-map %s (%s); reading it into memory", path, e)
    try:
        return faiss.read_index(str(path), same_dir)
    except (RuntimeError, MemoryError) as e:  # MemoryError: a corrupt size field
        raise IndexFileError(f"{path} is not a readable faiss index ({_faiss_reason(e)})") from None


def _faiss_reason(e: Exception) -> str:
    """The useful tail of a faiss error ('Error in <C++ signature> at file:line: reason')."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "read error" in text:  # faiss read fewer bytes than a size field promised
        return "truncated"
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", text)[:160]


def index_report(
    index: faiss.Index,
    *,
    factory: str | None = None,
    build_seconds: float | None = None,
    tuning: dict[str, Any] | None = None,
    path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """JSON-ready summary: type, factory, size (file size, else serialised bytes), build time,
    recall@k vs exact and median query latency (from `tuning`), and the current nprobe/efSearch.
    """
    inner = _inner(index)
    outer_name, inner_name = type(faiss.downcast_index(index)).__name__, type(inner).__name__
    size = os.path.getsize(path) if path else int(faiss.serialize_index(to_cpu(index)).size)
    report: dict[str, Any] = {
        "index_type": inner_name if outer_name == inner_name else f"{outer_name}/{inner_name}",
        "factory": factory,
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "size_bytes": size,
        "build_seconds": build_seconds,
        "nprobe": int(inner.nprobe) if hasattr(inner, "nlist") else None,
        "efSearch": int(inner.hnsw.efSearch) if hasattr(inner, "hnsw") else None,
    }
    if tuning is not None:
        report[f"recall@{tuning['k']}"] = tuning["recall"]
        report["target_recall"] = tuning["target_recall"]
        report["reached"] = tuning["reached"]
        report["median_query_ms"] = tuning["median_query_ms"]
        report["batch_ms_per_query"] = tuning["batch_ms_per_query"]
    return report
