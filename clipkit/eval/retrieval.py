"""Image-text retrieval: embed captioned data, measure recall@k exactly and through a FAISS index,
and build / query index directories (clip-retrieval's embed + autofaiss index, in one step).

An index directory holds:
    image.index            FAISS index of the image embeddings (ids = row numbers)
    image.ivfdata          its inverted lists on disk, when built out of core from an embedding
                           folder (`clipkit.eval.parts_index`)
    metadata.jsonl         one line per row: row, key, caption(s), source shard / file
    image_embeddings.npy   the embeddings the index holds (re-indexing, exact checks); not
                           written from an embedding folder, which holds them already
    model.json             how to load the model again to embed queries, and its embed dim
    report.json            index type, size, build time, recall@10 vs exact, median latency
    .clipkit-output        marker: only such a folder is ever replaced (`--overwrite`)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipkit.config import ConfigError
from clipkit.data.eval_pairs import PairedSet, collate_pairs
from clipkit.data.sources import local_paths
from clipkit.eval import LoaderSettings
from clipkit.eval.embed import (
    EmbeddedPart,
    SkipCounter,
    check_skipped,
    embed_loader,
    merge_parts,
    progress,
    share_loader,
    share_total,
)
from clipkit.eval.loading import model_inputs
from clipkit.eval.metrics import retrieval_recall, retrieval_recall_from_index
from clipkit.fileio import guard_output_dir, output_dir

log = logging.getLogger(__name__)
INDEX_KIND = "index"  # the marker clipkit leaves in the index directories it writes


@dataclass
class PairEmbeddings:
    image_features: torch.Tensor  # (N_img, D)
    text_features: torch.Tensor  # (N_txt, D)
    text_to_image: torch.Tensor  # (N_txt,) the image each caption belongs to
    keys: list[str]
    captions: list[list[str]]
    sources: list[str]
    skipped: SkipCounter


def embed_pairs(
    loaded,
    data: PairedSet,
    device: torch.device,
    reading: LoaderSettings = LoaderSettings(),
) -> PairEmbeddings:
    """Embed every image and every caption of `data` (several captions per image allowed)."""
    part = embed_pair_part(loaded, data.dataset, device, reading, total=data.num_samples)
    return pair_embeddings(part, data.root, reading.max_bad_fraction)


def embed_pair_part(
    loaded,
    dataset,
    device: torch.device,
    reading: LoaderSettings,
    *,
    total: int | None,
    rank: int = 0,
    world: int = 1,
    show: bool = True,
) -> EmbeddedPart:
    """Images and captions of a captioned dataset (a rank's share; all of it by default), in
    the order one process reads it."""
    loader = share_loader(dataset, collate_pairs, reading, rank, world)
    count = share_total(total, rank, world)
    part = embed_loader(
        loaded.model,
        loader,
        device,
        fields=("key", "captions", "source", "order"),
        bar=lambda batches: progress(batches, count, reading.batch_size, "embedding", show),
        tokenizer=loaded.tokenizer,
    )
    return merge_parts([part])


def pair_embeddings(part: EmbeddedPart, root: str, max_bad_fraction: float) -> PairEmbeddings:
    """Every image and caption embedded (`part`, in the set's order) as PairEmbeddings."""
    keys, captions = part.rows["key"], part.rows["captions"]
    check_skipped(part.skipped, len(keys), max_bad_fraction, root)
    if not keys:
        raise ConfigError(f"{root}: no images found")
    t2i = [row for row, caps in enumerate(captions) for _ in caps]
    texts = part.text_features
    return PairEmbeddings(
        part.image_features,
        texts if len(texts) else torch.zeros(0, part.image_features.shape[1]),
        torch.tensor(t2i, dtype=torch.long),
        keys,
        captions,
        part.rows["source"],
        part.skipped,
    )


def exact_recall(emb: PairEmbeddings, ks: list[int]) -> dict[str, float]:
    """Image->text and text->image recall@k over every pair (no index)."""
    if len(emb.text_features) == 0:
        raise ConfigError("no captions found: retrieval needs a txt member / .txt file per image")
    return retrieval_recall(emb.image_features, emb.text_features, emb.text_to_image, ks)


def _build(
    vectors: np.ndarray,
    index_type: str,
    max_memory: int,
    target_recall: float,
    queries: np.ndarray | None,
    seed: int,
) -> tuple[Any, dict]:
    """Build + tune one index; returns (index, report without the file size)."""
    from clipkit import index as faiss_index

    start = time.perf_counter()
    choice = faiss_index.choose_index(len(vectors), vectors.shape[1], max_memory, kind=index_type)
    built = faiss_index.build_index(vectors, index_type, max_memory, seed=seed)
    seconds = time.perf_counter() - start
    k = min(10, len(vectors))
    use_queries = queries if queries is not None and len(queries) else None
    tuning = faiss_index.tune_index(
        built, vectors, target_recall, k=k, seed=seed, queries=use_queries
    )
    return built, build_report(built, choice, seconds, tuning)


def build_report(built, choice, seconds: float, tuning: dict) -> dict:
    """What report.json says of a built and tuned index (without its file size)."""
    from clipkit import index as faiss_index

    report = faiss_index.index_report(
        built, factory=choice.factory, build_seconds=seconds, tuning=tuning
    )
    report.update(
        kind=choice.kind,
        reason=choice.reason,
        tuning_queries=tuning["queries"],
        reached_target=tuning["reached"],
        k=tuning["k"],
    )
    return report


def evaluate_retrieval(
    emb: PairEmbeddings,
    ks: list[int],
    *,
    index_type: str = "auto",
    max_memory: int = 8 * 2**30,
    target_recall: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Exact recall@k (chunked, no N x N matrix) and recall@k through FAISS indexes built over
    the images (text->image) and the captions (image->text)."""
    from clipkit import index as faiss_index

    exact = exact_recall(emb, ks)
    images, texts = emb.image_features.numpy(), emb.text_features.numpy()
    image_index, image_report = _build(images, index_type, max_memory, target_recall, texts, seed)
    text_index, text_report = _build(texts, index_type, max_memory, target_recall, images, seed)
    k_img, k_txt = min(max(ks), len(images)), min(max(ks), len(texts))
    _, image_ids = faiss_index.search(image_index, texts, k_img)
    _, text_ids = faiss_index.search(text_index, images, k_txt)
    # Pad with "no result" ids where k exceeds the collection, as the exact path clips k.
    image_ids = np.pad(image_ids, ((0, 0), (0, max(ks) - k_img)), constant_values=-1)
    text_ids = np.pad(text_ids, ((0, 0), (0, max(ks) - k_txt)), constant_values=-1)
    approx = retrieval_recall_from_index(
        emb.text_to_image, ks, image_ids=image_ids, text_ids=text_ids
    )
    return {
        "metrics": exact,
        "index_metrics": approx,
        "indexes": {"image": image_report, "text": text_report},
    }


# ---- index directories ----


def build_index_dir(
    loaded,
    emb: PairEmbeddings,
    out: str | Path,
    *,
    index_type: str = "auto",
    max_memory: int = 8 * 2**30,
    target_recall: float = 0.95,
    seed: int = 0,
    overwrite: bool = False,
    data_root: str = "",
) -> dict[str, Any]:
    """Write an index directory (see the module docstring) atomically: everything goes into a
    temporary sibling that is renamed into place only when complete. `out` may not be, contain
    or lie inside the model's files or the data; an existing `out` is replaced (`overwrite`)
    only when it is an earlier index directory."""
    from clipkit import index as faiss_index

    out = guard_index_out(out, loaded.source, data_root, overwrite)
    images = emb.image_features.numpy()
    texts = emb.text_features.numpy()
    built, report = _build(images, index_type, max_memory, target_recall, texts, seed)
    with output_dir(out, INDEX_KIND) as tmp:
        faiss_index.save_index(built, tmp / "image.index")
        report["size_bytes"] = os.path.getsize(tmp / "image.index")
        np.save(tmp / "image_embeddings.npy", images)
        _write_metadata(tmp / "metadata.jsonl", emb)
        model_info = {
            **loaded.source,
            "name": loaded.name,
            "sha256": loaded.sha256,
            "embed_dim": int(images.shape[1]),
        }
        write_json(tmp / "model.json", model_info)
        report.update(
            num_images=len(images),
            num_captions=len(texts),
            data=data_root,
            skipped_images=emb.skipped.count,
        )
        write_json(tmp / "report.json", report)
    return report


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def guard_index_out(out: str | Path, source: dict, data: str, overwrite: bool) -> Path:
    """Check `out` before any work (see clipkit.fileio.guard_output_dir): `source` says where
    the model comes from (LoadedModel.source, or the --checkpoint / --model / --pretrained
    flags), `data` is the --data the index is built from."""
    return guard_output_dir(
        out,
        INDEX_KIND,
        inputs=model_inputs(source) + local_paths(data),
        overwrite=overwrite,
        command="retrieve index",
    )


def _write_metadata(path: Path, emb: PairEmbeddings) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row, (key, caps, src) in enumerate(
            zip(emb.keys, emb.captions, emb.sources, strict=True)
        ):
            record = {
                "row": row,
                "key": key,
                "caption": caps[0] if caps else "",
                "captions": caps,
                "source": str(Path(src).resolve()),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


@dataclass
class IndexDir:
    path: Path
    index: Any
    metadata: list[dict]
    model_info: dict
    report: dict


class IndexDirError(ConfigError):
    """An index directory with missing or damaged files (a user error: exit 2)."""


def _damaged(path: Path, what: str) -> IndexDirError:
    """`what` is wrong with the file `path` of an index directory, and how to get a good one."""
    return IndexDirError(
        f"{path} {what}; rebuild the index with `clipkit retrieve index ... --out "
        f"{path.parent} --overwrite`"
    )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"is not readable JSON ({type(e).__name__})") from None


def _read_metadata(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(path, f"cannot be read ({type(e).__name__})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "key" not in row:
            raise _damaged(path, f"line {number} is not a metadata record (truncated?)")
        rows.append(row)
    return rows


def check_model_info(info: Any, path: Path) -> dict:
    """model.json must say how to load the model again and what it embeds into."""
    ok = (
        isinstance(info, dict)
        and (info.get("checkpoint") or info.get("model"))
        and "sha256" in info
        and isinstance(info.get("embed_dim"), int)
    )
    if not ok:
        raise _damaged(path, "lacks checkpoint / model, sha256 or embed_dim")
    return info


def open_index_dir(path: str | Path) -> IndexDir:
    """Open an index directory, checking that its files are readable and agree with each
    other (rows = metadata lines, dimension = the model's); any fault is an `IndexDirError`."""
    from clipkit import index as faiss_index

    path = Path(path)
    needed = ("image.index", "metadata.jsonl", "model.json")
    if not path.is_dir() or any(not (path / n).is_file() for n in needed):
        raise ConfigError(
            f"{path} is not a clipkit index directory (expected {', '.join(needed)}; build one "
            "with `clipkit retrieve index`)"
        )
    model_info = check_model_info(read_json(path / "model.json"), path / "model.json")
    metadata = _read_metadata(path / "metadata.jsonl")
    try:
        index = faiss_index.load_index(path / "image.index")
    except faiss_index.IndexFileError as e:
        reason = str(e).partition(" is ")[2]  # the message starts with the file's path
        raise _damaged(path / "image.index", f"is {reason}") from None
    if index.ntotal != len(metadata):
        raise _damaged(
            path / "metadata.jsonl", f"has {len(metadata)} rows but the index holds {index.ntotal}"
        )
    if index.d != model_info["embed_dim"]:
        raise _damaged(
            path / "image.index",
            f"holds {index.d}-dim vectors but model.json says {model_info['embed_dim']}",
        )
    report = {}
    if (path / "report.json").is_file():  # informative only: a damaged one does not block search
        try:
            report = read_json(path / "report.json")
        except IndexDirError as e:
            log.warning("%s", e)
    return IndexDir(path, index, metadata, model_info, report)


def search_index_dir(idx: IndexDir, query: np.ndarray, k: int) -> list[dict[str, Any]]:
    """Top-k rows for one (1, D) query: rank, score, key, caption, source."""
    from clipkit import index as faiss_index

    scores, ids = faiss_index.search(idx.index, query, k)
    hits = []
    for rank, (score, row) in enumerate(zip(scores[0], ids[0], strict=True), start=1):
        if row < 0:
            continue
        meta = idx.metadata[int(row)]
        hits.append(
            {
                "rank": rank,
                "score": float(score),
                "row": int(row),
                "key": meta["key"],
                "caption": meta.get("caption", ""),
                "source": meta.get("source", ""),
            }
        )
    return hits
