"""Which faiss index to build for n vectors of a dimension under a memory budget.

The rule is autofaiss's (Criteo, github.com/criteo/autofaiss), restated in `choose_index`;
see the package docstring for why IVF-SQ comes before product quantisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from clipkit.index.errors import IndexBudgetError

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
SQ_BITS = (8, 6, 4)  # faiss ScalarQuantizer widths per dimension, most accurate first


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
