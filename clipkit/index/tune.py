"""Tune an index's search-time knob (nprobe, efSearch) to a recall measured against brute force."""

from __future__ import annotations

import math
import time
from typing import Any

import faiss
import numpy as np

from clipkit.index.build import _as_matrix, _inner, _on_gpu, search
from clipkit.index.errors import IndexMismatchError


def _param_space() -> faiss.ParameterSpace:
    # GpuParameterSpace also sets CPU indexes and GPU replicas; CPU-only faiss builds lack it.
    if hasattr(faiss, "GpuParameterSpace"):
        return faiss.GpuParameterSpace()
    return faiss.ParameterSpace()


def _search_knob(index: faiss.Index, k: int) -> tuple[str | None, list[int | None]]:
    """The search-time parameter of `index` and the values to sweep, cheapest first."""
    inner = _inner(index)
    if hasattr(inner, "nlist") and hasattr(inner, "nprobe"):
        cap = int(inner.nlist) if not _on_gpu(index) else min(int(inner.nlist), 2048)
        return "nprobe", [2**i for i in range(17) if 2**i < cap] + [cap]
    if hasattr(inner, "hnsw"):
        return "efSearch", sorted({max(k, v) for v in (16, 32, 64, 128, 256, 512, 1024, 2048)})
    return None, [None]


def make_queries(vectors: np.ndarray, n_queries: int, seed: int, noise: float) -> np.ndarray:
    """Tuning queries: random database rows moved by Gaussian noise of L2 norm ~`noise`.

    With noise 0.1 a query keeps cosine ~0.995 to its source row, so the source is usually its
    top hit and the other k-1 neighbours come from a real search. Pass real queries (e.g. text
    embeddings for an image index) to `tune_index` when they exist: they are the truer test.
    """
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)
    q = vectors[np.sort(rows)]
    q = q + rng.standard_normal(q.shape).astype(np.float32) * (noise / math.sqrt(q.shape[1]))
    return np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """k-recall@k: mean fraction of the exact top-k found among the returned top-k."""
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2)  # (Q, k)
    return float(hits.mean())


def _median_single_query_ms(index: faiss.Index, q: np.ndarray, k: int, n: int = 100) -> float:
    times = []
    for row in q[:n]:
        start = time.perf_counter()
        index.search(row[None], k)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def _bisect(measure, low: int, high: int, target: float) -> list[dict[str, Any]]:
    """Narrow [low fails, high reaches `target`] to within 1/16 of low: a doubling sweep
    overshoots by up to 2x, and at 1M HNSW vectors efSearch 1024 cost 2.6x the time of 512
    where 576 already reached the target."""
    steps = []
    while high - low > max(1, low // 16):
        mid = (low + high) // 2
        steps.append(measure(mid))
        low, high = (low, mid) if steps[-1]["recall"] >= target else (mid, high)
    return steps


def _tuning_queries(
    x: np.ndarray, queries: Any, n_queries: int, seed: int, noise: float
) -> np.ndarray:
    """The queries to tune on: a seeded sample of `queries` if given, else perturbed rows."""
    if queries is None:
        return make_queries(x, n_queries, seed, noise)
    # a seeded sample: exact ground truth for every caption of a big set costs minutes
    q = _as_matrix(queries)
    if len(q) > n_queries:
        rows = np.random.default_rng(seed).choice(len(q), n_queries, replace=False)
        q = q[np.sort(rows)]
    return q


def _sweep(
    measure, values: list[int | None], target: float, max_latency_ms: float | None
) -> list[dict[str, Any]]:
    """Measure `values` cheapest first until one reaches `target` (or the next is too slow),
    then bisect between the last two for the smallest value that reaches it."""
    sweep: list[dict[str, Any]] = []
    for value in values:
        step = measure(value)
        if max_latency_ms is not None and sweep and step["ms"] > max_latency_ms:
            break
        sweep.append(step)
        if step["recall"] >= target:
            break
    if len(sweep) > 1 and sweep[-1]["recall"] >= target:
        sweep += _bisect(measure, sweep[-2]["value"], sweep[-1]["value"], target)
    return sweep


def _held_vectors(index: faiss.Index, vectors: Any) -> np.ndarray:
    """`vectors` as a matrix, checked to be the rows `index` holds (ground truth needs them)."""
    x = _as_matrix(vectors)
    if len(x) != index.ntotal or x.shape[1] != index.d:
        raise IndexMismatchError(
            f"tune_index needs the {index.ntotal} x {index.d} vectors the index holds, "
            f"got {x.shape[0]} x {x.shape[1]}"
        )
    return x


def tune_index(
    index: faiss.Index,
    vectors: Any,
    target_recall: float = 0.95,
    k: int = 10,
    n_queries: int = 1000,
    seed: int = 0,
    *,
    queries: Any = None,
    query_noise: float = 0.1,
    max_latency_ms: float | None = None,
    truth: np.ndarray | None = None,
) -> dict[str, Any]:
    """Raise nprobe (IVF) or efSearch (HNSW) until k-recall@k against brute force >= target.

    `vectors` are the rows the index holds (ids = row numbers). Queries are `queries` if given
    (a seeded sample of `n_queries` of them when there are more), else `make_queries`
    (perturbed database rows). Ground truth is exact inner-product search.
    The sweep doubles the value until it reaches `target_recall`, then bisects between the last
    two values for the smallest one that does; if none does (or the next value's batched
    per-query time exceeds `max_latency_ms`), the best recall seen is chosen.
    With `truth` (the exact top-k ids of `queries`, e.g. from `ondisk.exact_neighbours` for a
    collection that is never in memory at once) `vectors` may be None.
    The index is left set to the chosen value. Latencies: batched search time / queries, and
    the median of single-query searches over up to 100 queries.
    """
    k = min(k, int(index.ntotal))
    if truth is None:
        x = _held_vectors(index, vectors)
        q = _tuning_queries(x, queries, n_queries, seed, query_noise)
    else:
        q, truth = _as_matrix(queries), truth[:, :k]
    if q.shape[1] != index.d:
        raise IndexMismatchError(f"queries have dimension {q.shape[1]}, the index {index.d}")
    if truth is None:
        _, truth = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)  # (Q, k) exact
    name, values = _search_knob(index, k)
    space = _param_space()

    def measure(value: int | None) -> dict[str, Any]:
        if name is not None:
            space.set_index_parameter(index, name, value)
        start = time.perf_counter()
        _, found = search(index, q, k)
        per_query_ms = (time.perf_counter() - start) * 1000 / len(q)
        return {"value": value, "recall": _recall(found, truth), "ms": per_query_ms}

    sweep = _sweep(measure, values, target_recall, max_latency_ms)
    reached = sorted((s for s in sweep if s["recall"] >= target_recall), key=lambda s: s["value"])
    chosen = reached[0] if reached else max(sweep, key=lambda s: s["recall"])
    if name is not None:
        space.set_index_parameter(index, name, chosen["value"])
    return {
        "param": name,
        "value": chosen["value"],
        "k": k,
        "recall": chosen["recall"],
        "target_recall": target_recall,
        "reached": bool(reached),
        "batch_ms_per_query": chosen["ms"],
        "median_query_ms": _median_single_query_ms(index, q, k),
        "n_queries": len(q),
        "queries": "given" if queries is not None else f"perturbed rows, noise {query_noise}",
        "sweep": sweep,
    }
