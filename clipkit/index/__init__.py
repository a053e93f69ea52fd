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

The steps live in submodules (`choose`, `build`, `tune`, `io`); this package re-exports their
public names, so callers write `from clipkit.index import build_index`.
"""

from clipkit.index.build import build_index, search, to_cpu
from clipkit.index.choose import (
    DEFAULT_MEMORY_BYTES,
    FLAT_MAX_VECTORS,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    HNSW_MAX_VECTORS,
    KINDS,
    PQ_M_CHOICES,
    SQ_BITS,
    IndexChoice,
    choose_index,
    shortfall_message,
)
from clipkit.index.errors import IndexBudgetError, IndexFileError, IndexMismatchError
from clipkit.index.io import index_report, load_index, save_index
from clipkit.index.tune import _median_single_query_ms, make_queries, tune_index

__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "FLAT_MAX_VECTORS",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "HNSW_MAX_VECTORS",
    "KINDS",
    "PQ_M_CHOICES",
    "SQ_BITS",
    "IndexBudgetError",
    "IndexChoice",
    "IndexFileError",
    "IndexMismatchError",
    "_median_single_query_ms",
    "build_index",
    "choose_index",
    "index_report",
    "load_index",
    "make_queries",
    "save_index",
    "search",
    "shortfall_message",
    "to_cpu",
    "tune_index",
]
