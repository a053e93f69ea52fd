"""`retrieve index --embeddings DIR`: an index directory (`clipkit.eval.retrieval`) built from an
embedding folder (`retrieve embed`, clip-retrieval's layout) without loading it whole.

The index is built by `clipkit.index.ondisk.build_from_parts` (in memory while the raw vectors
fit --max-memory, else IVF with its inverted lists in `image.ivfdata` beside `image.index`),
tuned like any index on the caption embeddings as queries, with exact ground truth computed part
by part. `metadata.jsonl` is written from the parts' Parquet files, `model.json` is the
embedding folder's. The vectors themselves stay in the embedding folder (no
`image_embeddings.npy` copy); report.json names it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.config import ConfigError
from clipkit.eval.retrieval import (
    INDEX_KIND,
    build_report,
    check_model_info,
    guard_index_out,
    read_json,
    write_json,
)
from clipkit.fileio import output_dir
from clipkit.index.parts import EmbeddingParts, read_metadata

log = logging.getLogger(__name__)
_TUNING_QUERIES = 1000


def open_embeddings(folder: str | Path) -> tuple[EmbeddingParts, dict]:
    """The parts of an embedding folder and its model.json (how to embed queries)."""
    folder = Path(folder)
    try:
        parts = EmbeddingParts.open(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--embeddings: {e}; write one with `clipkit retrieve embed`") from None
    info = check_model_info(read_json(folder / "model.json"), folder / "model.json")
    if info["embed_dim"] != parts.dim:
        raise ConfigError(
            f"--embeddings {folder}: parts hold {parts.dim}-dim vectors, model.json says "
            f"{info['embed_dim']}"
        )
    return parts, info


def tuning_set(parts: EmbeddingParts, seed: int) -> tuple[np.ndarray, str]:
    """(queries, what they are): a sample of the caption embeddings (text -> image, what a search
    does), else database rows moved by noise as `tune_index` makes them."""
    from clipkit import index as faiss_index

    texts = parts.sample(_TUNING_QUERIES, seed, which="text")
    texts = texts[np.linalg.norm(texts, axis=1) > 0]  # images without a caption have zero rows
    if len(texts):
        return texts, "given"
    rows = parts.sample(_TUNING_QUERIES, seed)
    return faiss_index.make_queries(rows, _TUNING_QUERIES, seed, 0.1), "perturbed rows, noise 0.1"


def _write_metadata(path: Path, parts: EmbeddingParts) -> None:
    import json

    row = 0
    with open(path, "w", encoding="utf-8") as f:
        for files in parts.parts:
            for record in read_metadata(files):
                caption = record.get("caption") or ""
                line = {
                    "row": row,
                    "key": record.get("key", record.get("image_path", str(row))),
                    "caption": caption,
                    "captions": [caption] if caption else [],
                    "source": record.get("shard", ""),
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                row += 1
    if row != parts.total:
        raise ConfigError(f"{parts.root}: metadata has {row} rows, the embeddings {parts.total}")


def _build_tuned(parts, tmp: Path, index_type, max_memory, target_recall, seed):
    """Build into `tmp` (image.index, image.ivfdata when on disk), tune, return the report."""
    from clipkit import index as faiss_index
    from clipkit.index import ondisk

    start = time.perf_counter()
    workdir = tmp / ".part-indexes"
    workdir.mkdir()
    built, choice, on_disk = ondisk.build_from_parts(
        parts, index_type, max_memory, seed=seed, lists_file=tmp / "image.ivfdata",
        workdir=workdir,
    )  # fmt: skip
    shutil.rmtree(workdir)
    seconds = time.perf_counter() - start
    queries, what = tuning_set(parts, seed)
    k = min(10, parts.total)
    truth = ondisk.exact_neighbours(parts, queries, k)
    tuning = faiss_index.tune_index(
        built, None, target_recall, k=k, seed=seed, queries=queries, truth=truth
    )
    tuning["queries"] = what
    report = build_report(built, choice, seconds, tuning)
    faiss_index.save_index(built, tmp / "image.index")
    lists = tmp / "image.ivfdata"
    report["size_bytes"] = os.path.getsize(tmp / "image.index") + (
        os.path.getsize(lists) if lists.is_file() else 0
    )
    report.update(on_disk_lists=on_disk, raw_bytes=ondisk.raw_bytes(parts))
    return report


def index_from_embeddings(
    embeddings: str | Path,
    out: str | Path,
    *,
    index_type: str = "auto",
    max_memory: int = 8 * 2**30,
    target_recall: float = 0.95,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an index directory over an embedding folder's image embeddings (atomically, as
    `build_index_dir` does)."""
    parts, model_info = open_embeddings(embeddings)
    out = guard_index_out(out, model_info, str(embeddings), overwrite)
    with output_dir(out, INDEX_KIND) as tmp:
        report = _build_tuned(parts, tmp, index_type, max_memory, target_recall, seed)
        _write_metadata(tmp / "metadata.jsonl", parts)
        write_json(tmp / "model.json", model_info)
        report.update(
            num_images=parts.total,
            num_parts=len(parts.parts),
            embeddings=str(Path(embeddings).resolve()),
            data=str(Path(embeddings).resolve()),
        )
        write_json(tmp / "report.json", report)
    return report
