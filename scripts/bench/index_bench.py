"""Index row: `auto` index vs exact flat search on N synthetic clustered unit vectors (dim 256).
Queries are held-out perturbed points. Prints one JSON line. Usage: index_bench.py N [BUDGET_MB]"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from clipkit import index as ix

n = int(sys.argv[1])
budget = int(float(sys.argv[2]) * 2**20) if len(sys.argv) > 2 else 8 * 2**30
dim = 256
rng = np.random.default_rng(0)
centers = rng.standard_normal((max(16, n // 500), dim)).astype("float32")
x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, dim)).astype(
    "float32"
)
x /= np.linalg.norm(x, axis=1, keepdims=True)
queries = ix.make_queries(x, 1000, seed=1, noise=0.2)

t0 = time.perf_counter()
choice = ix.choose_index(n, dim, budget)
index = ix.build_index(x, kind="auto", max_memory_bytes=budget)
build_s = time.perf_counter() - t0
tuning = ix.tune_index(index, x, target_recall=0.95, k=10, queries=queries)
report = ix.index_report(index, factory=choice.factory, build_seconds=build_s, tuning=tuning)

flat = faiss.IndexFlatIP(dim)
flat.add(x)
# Single-query latency on one OpenMP thread for both sides: a one-query search gains nothing from
# a thread team, and on shared cores the idle team's waits inflated exact search ~20x (16 vs
# 0.75 ms at 20k x 256) and made the ratio depend on other jobs.
faiss.omp_set_num_threads(1)
clipkit_ms = ix._median_single_query_ms(index, queries, 10)
flat_ms = ix._median_single_query_ms(flat, queries, 10)

# autofaiss's pick for the same vectors, budget and queries (its own venv: it pins faiss-cpu).
autofaiss = None
ref_py = Path(__file__).resolve().parents[2] / ".venv-autofaiss" / "bin" / "python"
if ref_py.exists():
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/x.npy", x)
        np.save(f"{tmp}/q.npy", queries)
        out = subprocess.run(
            [
                str(ref_py),
                str(Path(__file__).parent / "autofaiss_index.py"),
                f"{tmp}/x.npy",
                f"{tmp}/q.npy",
                str(budget // 2**20),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0:
            autofaiss = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            autofaiss = {"error": out.stderr.strip().splitlines()[-1][:300]}
print(
    json.dumps(
        {
            "row": f"index: auto ({choice.factory}, budget {budget / 2**20:.0f} MB) vs flat, "
            f"{n} x {dim}, "
            f"recall@10 {tuning['recall']:.3f}",
            "clipkit": clipkit_ms,
            "reference": flat_ms,
            "ratio": flat_ms / clipkit_ms,
            "unit": "median single-query ms, 1 OpenMP thread (ratio = speed-up)",
            "recall@10": tuning["recall"],
            "reached": tuning["reached"],
            "shortfall": ix.shortfall_message(report, budget),
            "build_seconds": build_s,
            "size_bytes": report["size_bytes"],
            "factory": choice.factory,
            "search_param": {tuning["param"]: tuning["value"]},
            "autofaiss": autofaiss,
        }
    )
)
