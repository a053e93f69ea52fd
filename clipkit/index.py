"""FAISS nearest-neighbour indexes for L2-normalised embeddings (inner product = cosine).

The choice follows autofaiss's rule (Criteo, github.com/criteo/autofaiss), restated in
`choose_index`: exact search while it is cheap, a graph or inverted-file index while the raw
vectors fit the memory budget, compressed codes beyond. Under a tight budget the codes are
scalar-quantised residuals of the inverted lists (IVF-SQ, 8/6/4 bits a dimension) before
product quantisation: a residual only has to cover the spread inside one list, so each bit buys
more precision than in a global code (measured on clustered vectors: IVF-SQ6 recall@10 0.91
where OPQ+IVF-PQ64 reached 0.46 and IVF-PQ + a global SQ4 re-ranking stage 0.42, same budget).
Every built index can be tuned against brute force (`tune_index`) so its recall is measured,
never assumed, and `shortfall_message` says plainly when the budget cannot reach the target.
Indexes are saved atomically so a failed write never replaces a good index.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipkit.fileio import make_temp_file

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf-flat", "ivf-sq", "ivf-pq")
DEFAULT_MEMORY_BYTES = 8 * 2**30
FLAT_MAX_VECTORS = 10_000  # below this, exact search is fast enough and needs no training
HNSW_M = 32
# Candidates kept while linking a new node. faiss's default 40 leaves clustered data poorly
# connected: on 1M x 256 clustered vectors, recall@10 0.95 needed efSearch 576 (1.19 ms a query)
# at 40, 52 (0.21 ms) at 80 and 27 (0.16 ms) at 128, for builds of 87, 117 and 205 s on 2 cores.
# 80 is the knee: 5.6x faster queries for 1.34x the build time.
HNSW_EF_CONSTRUCTION = 80
HNSW_MAX_VECTORS = 5_000_000  # beyond this, HNSW build time dominates; IVF scales better
# Bytes per PQ code that faiss' GPU IVF-PQ accepts, largest (most accurate) first.
PQ_M_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4)
_PQ_SUB_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)  # dims per sub-quantiser on GPU
_MAX_TRAIN = 500_000
_ADD_BATCH = 262_144
SQ_BITS = (8, 6, 4)  # faiss ScalarQuantizer widths per dimension, most accurate first
_GPU_KINDS = ("flat", "ivf-flat", "ivf-sq", "ivf-pq")  # faiss has no GPU HNSW


class IndexMismatchError(ValueError):
    """Queries don't fit the index: wrong dimension, or more neighbours asked than stored."""


class IndexBudgetError(ValueError):
    """No index kind fits the memory budget."""


class IndexFileError(ValueError):
    """An index file faiss cannot read: truncated, corrupt, or not a faiss index."""


@dataclass(frozen=True)
class IndexChoice:
    kind: str  # one of KINDS
    factory: str  # faiss.index_factory string
    params: dict[str, Any] = field(default_factory=dict)
    estimated_bytes: int = 0
    reason: str = ""


def _nlist(n: int) -> int:
    """~4 sqrt(n) inverted lists, as a power of two in [16, 65536], with >= 39 points each."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    nlist = min(max(nlist, 16), 65536)
    return max(1, min(nlist, n // 39))


def _hnsw_choice(n: int, d: int) -> IndexChoice:
    # vector + level-0 links (2M int32) + levels/offsets + upper levels (~1/M of the nodes)
    est = n * (4 * d + 8 * HNSW_M + 16)
    params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
    return IndexChoice("hnsw", f"HNSW{HNSW_M},Flat", params, est)


def _ivf_flat_choice(n: int, d: int) -> IndexChoice:
    nlist = _nlist(n)
    est = n * (4 * d + 8) + nlist * 4 * d  # vectors + int64 ids, plus the centroids
    return IndexChoice("ivf-flat", f"IVF{nlist},Flat", {"nlist": nlist}, est)


def _ivf_sq_choice(n: int, d: int, bits: int) -> IndexChoice:
    nlist = _nlist(n)
    code = (d * bits + 7) // 8
    est = (
        n * (code + 8)  # residual codes + int64 ids
        + nlist * (4 * d + 8)  # coarse centroids + list sizes
        + 2 * 4 * d  # the quantiser's per-dimension range (min, width)
        + 1024  # headers
    )
    params = {"nlist": nlist, "bits": bits}
    return IndexChoice("ivf-sq", f"IVF{nlist},SQ{bits}", params, est)


def _sq_candidates(n: int, d: int) -> list[IndexChoice]:
    return [_ivf_sq_choice(n, d, bits) for bits in SQ_BITS]


def _ivf_pq_choice(n: int, d: int, m: int) -> IndexChoice:
    nlist = _nlist(n)
    # 8-bit codes need 39 * 256 training points; fewer points get coarser codes.
    nbits = 8 if n >= 39 * 256 else max(4, int(math.log2(max(n, 1) / 39)))
    # OPQ rotates into m sub-spaces of a width faiss' GPU IVF-PQ supports, dropping the rest.
    d_out = m * max(w for w in _PQ_SUB_DIMS if w <= d // m)
    est = (
        n * ((m * nbits + 7) // 8 + 8)  # codes + ids
        + nlist * 4 * d_out  # coarse centroids
        + d_out * 2**nbits * 4  # PQ centroids
        + d * d_out * 4  # OPQ rotation
    )
    params = {"nlist": nlist, "m": m, "nbits": nbits, "opq_dim": d_out}
    return IndexChoice("ivf-pq", f"OPQ{m}_{d_out},IVF{nlist},PQ{m}x{nbits}", params, est)


def _pq_candidates(n: int, d: int) -> list[IndexChoice]:
    # >= 4 dims per sub-quantiser: narrower ones cost far more k-means time for little recall.
    return [_ivf_pq_choice(n, d, m) for m in PQ_M_CHOICES if 4 * m <= d]


def choose_index(n: int, dim: int, max_memory_bytes: int, kind: str = "auto") -> IndexChoice:
    """Pick an index for `n` vectors of `dim` floats under a memory budget.

    Rule (`kind="auto"`), first match wins:
      1. n < 10k and the raw vectors fit: exact `Flat` (inner product). No training, recall 1.
      2. HNSW32 if its graph fits (and n <= 5M): best recall per millisecond, no training.
      3. IVF-Flat (nlist ~ 4 sqrt(n), power of two, 16..65536, >= 39 points per list) if it fits.
      4. IVF-SQ: the same lists holding residuals scalar-quantised to 8, 6 or 4 bits a dimension
         over each dimension's 0.1-99.9% quantiles, the widest that fits.
      5. OPQ + IVF-PQ with the largest code size m (bytes/vector, >= 4 dims per sub-quantiser)
         that fits, 8-bit codes (fewer bits when n < 39 * 256 training points).
    Estimates count codes, ids, centroids and trained tables, so the saved file stays under
    them. Raises `IndexBudgetError` when even the smallest IVF-PQ does not fit. A forced `kind`
    skips the budget checks (ivf-sq / ivf-pq still take the largest code that fits, else the
    smallest).
    """
    if n < 1 or dim < 1:
        raise ValueError(f"need at least one vector of dimension >= 1, got n={n}, dim={dim}")
    flat = IndexChoice("flat", "Flat", {}, n * dim * 4)
    sqs, pqs = _sq_candidates(n, dim), _pq_candidates(n, dim)
    fitting_sq = [c for c in sqs if c.estimated_bytes <= max_memory_bytes]
    fitting_pq = [c for c in pqs if c.estimated_bytes <= max_memory_bytes]
    forced = {
        "flat": lambda: flat,
        "hnsw": lambda: _hnsw_choice(n, dim),
        "ivf-flat": lambda: _ivf_flat_choice(n, dim),
        "ivf-sq": lambda: (fitting_sq or sqs[-1:])[0],
    }
    if kind in forced:
        return forced[kind]()
    if kind == "ivf-pq":
        if not pqs:
            raise ValueError(f"ivf-pq needs dim >= {4 * PQ_M_CHOICES[-1]}, got {dim}")
        return (fitting_pq or pqs[-1:])[0]
    if kind != "auto":
        raise ValueError(f"unknown index kind {kind!r}; known: auto, {', '.join(KINDS)}")
    budget = f"budget {max_memory_bytes:,} B"
    if n < FLAT_MAX_VECTORS and flat.estimated_bytes <= max_memory_bytes:
        return replace(flat, reason=f"n={n} < {FLAT_MAX_VECTORS}: exact search")
    hnsw = _hnsw_choice(n, dim)
    if n <= HNSW_MAX_VECTORS and hnsw.estimated_bytes <= max_memory_bytes:
        return replace(hnsw, reason=f"HNSW fits the {budget}")
    ivf = _ivf_flat_choice(n, dim)
    if ivf.estimated_bytes <= max_memory_bytes:
        return replace(
            ivf, reason=f"HNSW does not fit or n is too large; IVF-Flat fits the {budget}"
        )
    if fitting_sq:
        return replace(
            fitting_sq[0], reason=f"raw vectors exceed the {budget}; widest IVF-SQ that fits"
        )
    if fitting_pq:
        return replace(fitting_pq[0], reason=f"IVF-SQ4 exceeds the {budget}; largest PQ that fits")
    smallest = pqs[-1].estimated_bytes if pqs else sqs[-1].estimated_bytes
    raise IndexBudgetError(
        f"max_memory_bytes={max_memory_bytes:,} is too small for {n:,} vectors of dim {dim}: "
        f"the smallest index needs ~{smallest:,} bytes; raise the budget"
    )


def _ladder(n: int, dim: int) -> list[IndexChoice]:
    """The compressed tiers of `choose_index`, most accurate (and largest) first."""
    return [_ivf_flat_choice(n, dim), *_sq_candidates(n, dim), *_pq_candidates(n, dim)]


def shortfall_message(report: dict[str, Any], max_memory_bytes: int) -> str | None:
    """One line saying that tuning missed the target and what budget the next more accurate
    index needs (an estimate: it may still miss), or None when the target was reached.

    `report` is `index_report(..., tuning=...)` (factory, ntotal, dim, recall@k, reached).
    """
    if report.get("reached", True):
        return None
    k = next(key for key in report if key.startswith("recall@"))
    line = (
        f"warning: {report['factory']} reached {k} {report[k]:.3f} < target "
        f"{report['target_recall']} under the {max_memory_bytes:,} B budget"
    )
    ladder = _ladder(report["ntotal"], report["dim"])
    factories = [c.factory for c in ladder]
    if report["factory"] not in factories[1:]:  # exact vectors already: the sweep ran out
        return line + f"; {report['factory']} holds the raw vectors, so no budget helps"
    better = ladder[factories.index(report["factory"]) - 1]
    return line + (
        f"; the next more accurate index ({better.factory}) needs ~{better.estimated_bytes:,} B "
        "(raise --max-memory)"
    )


def _as_matrix(x: Any) -> np.ndarray:
    """Any array-like (numpy, torch) -> C-contiguous float32 (N, D)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (N, D) array, got shape {x.shape}")
    return x


def _inner(index: faiss.Index) -> faiss.Index:
    """The index doing the search, under pre-transforms and GPU replicas."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _inner(index.index)
    if type(index).__name__ in ("IndexReplicas", "IndexShards") and index.count() > 0:
        return _inner(index.at(0))
    return index


def _on_gpu(index: faiss.Index) -> bool:
    if faiss.get_num_gpus() == 0:
        return False
    names = (type(faiss.downcast_index(index)).__name__, type(_inner(index)).__name__)
    return names[0] in ("IndexReplicas", "IndexShards") or names[1].startswith("Gpu")


def _to_gpu(index: faiss.Index, kind: str, strict: bool) -> faiss.Index:
    co = faiss.GpuMultipleClonerOptions()
    co.shard = False  # replicate: every GPU holds the whole index and serves part of the queries
    co.useFloat16 = kind == "ivf-pq"  # fp16 lookup tables let GPU IVF-PQ take larger m
    try:
        return faiss.index_cpu_to_all_gpus(index, co=co)
    except RuntimeError as e:
        if strict:
            raise
        log.warning("faiss could not move the %s index to GPU (%s); using the CPU", kind, e)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (what `write_index` needs); CPU indexes are returned as is."""
    return faiss.index_gpu_to_cpu(index) if _on_gpu(index) else index


def _seed_training(index: faiss.Index, seed: int) -> None:
    with contextlib.suppress(RuntimeError):  # not an IVF index: nothing to seed
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        if hasattr(ivf, "pq"):
            ivf.pq.cp.seed = seed


def _robust_sq_ranges(index: faiss.Index) -> None:
    """Quantise each dimension over its [0.1%, 99.9%] quantiles instead of faiss's min..max: a
    few extreme training residuals no longer stretch the steps of every code. Recall@10 on 200k
    clustered vectors (IVF2048,SQ6): 0.898 with min..max, 0.919 with quantiles."""
    sq = faiss.downcast_index(faiss.extract_index_ivf(index)).sq
    sq.rangestat = faiss.ScalarQuantizer.RS_quantiles
    sq.rangestat_arg = 0.001


def _train_size(n: int, choice: IndexChoice) -> int:
    need = 64 * choice.params.get("nlist", 1)
    if choice.kind == "ivf-pq":
        need = max(need, 64 * 2 ** choice.params["nbits"])
    return min(n, max(need, 10_000), _MAX_TRAIN)


def build_index(
    vectors: Any,
    kind: str = "auto",
    max_memory_bytes: int = DEFAULT_MEMORY_BYTES,
    use_gpu: bool | str = "auto",
    seed: int = 0,
) -> faiss.Index:
    """Build an inner-product index over L2-normalised `vectors` (N, D); ids are row numbers.

    `use_gpu="auto"` builds and searches on all GPUs when faiss sees any and the kind has a GPU
    implementation (not HNSW); `True` requires it. Save with `save_index` (copies back to CPU).
    IVF kinds train on a seeded random subset of at most 500k vectors.
    """
    if use_gpu not in (True, False, "auto"):
        raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
    x = _as_matrix(vectors)
    n, d = x.shape
    choice = choose_index(n, d, max_memory_bytes, kind=kind)
    index = faiss.index_factory(d, choice.factory, faiss.METRIC_INNER_PRODUCT)
    _seed_training(index, seed)
    if choice.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = choice.params["efConstruction"]
    if choice.kind == "ivf-sq":
        _robust_sq_ranges(index)
    gpu_ok = faiss.get_num_gpus() > 0 and choice.kind in _GPU_KINDS
    if use_gpu is True and not gpu_ok:
        raise ValueError(f"use_gpu=True but faiss sees no GPU or has no GPU {choice.kind} index")
    if use_gpu in (True, "auto") and gpu_ok:
        index = _to_gpu(index, choice.kind, strict=use_gpu is True)
    if not index.is_trained:
        rows = np.random.default_rng(seed).choice(n, _train_size(n, choice), replace=False)
        index.train(x[np.sort(rows)])
    # HNSW gets every vector in one call: faiss inserts each `add` batch level by level, and
    # splitting 1M vectors into 4 batches cost recall (300k x 256: 0.929 vs 0.954 at efSearch
    # 128). The vectors are in memory already, so one call costs nothing extra.
    step = n if choice.kind == "hnsw" else _ADD_BATCH
    for start in range(0, n, step):
        index.add(x[start : start + step])
    return index


def search(index: faiss.Index, queries: Any, k: int, batch_size: int = 16_384):
    """Top-k by inner product: (scores float32 (Q, k), ids int64 (Q, k)), best first."""
    q = _as_matrix(queries)
    if q.shape[1] != index.d:
        raise IndexMismatchError(
            f"queries have dimension {q.shape[1]} but the index holds {index.d}-dim vectors"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > index.ntotal:
        raise IndexMismatchError(f"k={k} exceeds the {index.ntotal} vectors in the index")
    scores, ids = [], []
    for start in range(0, len(q), batch_size):
        s, i = index.search(q[start : start + batch_size], k)
        scores.append(s)
        ids.append(i)
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(ids)


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
    if mmap:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError as e:  # an index type faiss cannot map: read it into memory
            log.debug("faiss cannot memory-map %s (%s); reading it into memory", path, e)
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as e:  # MemoryError: a corrupt size field
        raise IndexFileError(f"{path} is not a readable faiss index ({_faiss_reason(e)})") from None


def _faiss_reason(e: Exception) -> str:
    """The useful tail of a faiss error ('Error in <C++ signature> at file:line: reason')."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "read error" in text:  # faiss read fewer bytes than a size field promised
        return "truncated"
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", text)[:160]


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
) -> dict[str, Any]:
    """Raise nprobe (IVF) or efSearch (HNSW) until k-recall@k against brute force >= target.

    `vectors` are the rows the index holds (ids = row numbers). Queries are `queries` if given
    (a seeded sample of `n_queries` of them when there are more), else `make_queries`
    (perturbed database rows). Ground truth is exact inner-product search.
    The sweep doubles the value until it reaches `target_recall`, then bisects between the last
    two values for the smallest one that does; if none does (or the next value's batched
    per-query time exceeds `max_latency_ms`), the best recall seen is chosen.
    The index is left set to the chosen value. Latencies: batched search time / queries, and
    the median of single-query searches over up to 100 queries.
    """
    x = _as_matrix(vectors)
    if len(x) != index.ntotal or x.shape[1] != index.d:
        raise IndexMismatchError(
            f"tune_index needs the {index.ntotal} x {index.d} vectors the index holds, "
            f"got {x.shape[0]} x {x.shape[1]}"
        )
    k = min(k, int(index.ntotal))
    if queries is None:
        q = make_queries(x, n_queries, seed, query_noise)
    else:  # a seeded sample: exact ground truth for every caption of a big set costs minutes
        q = _as_matrix(queries)
        if len(q) > n_queries:
            rows = np.random.default_rng(seed).choice(len(q), n_queries, replace=False)
            q = q[np.sort(rows)]
    if q.shape[1] != index.d:
        raise IndexMismatchError(f"queries have dimension {q.shape[1]}, the index {index.d}")
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

    sweep: list[dict[str, Any]] = []
    for value in values:
        step = measure(value)
        if max_latency_ms is not None and sweep and step["ms"] > max_latency_ms:
            break
        sweep.append(step)
        if step["recall"] >= target_recall:
            break
    if len(sweep) > 1 and sweep[-1]["recall"] >= target_recall:
        sweep += _bisect(measure, sweep[-2]["value"], sweep[-1]["value"], target_recall)
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
