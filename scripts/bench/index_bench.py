"""Index row: `auto` index vs exact flat search on N synthetic clustered unit vectors (dim 256).
Queries are held-out perturbed points; autofaiss's pick for the same budget is tuned and timed
alongside. Prints one JSON line. Usage: index_bench.py N [BUDGET_MB]"""

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

tmp = tempfile.TemporaryDirectory()  # the saved indexes, memory-mapped until the end
t0 = time.perf_counter()
choice = ix.choose_index(n, dim, budget)
ix.save_index(ix.build_index(x, kind="auto", max_memory_bytes=budget), f"{tmp.name}/ck.index")
build_s = time.perf_counter() - t0
# Both indexes are timed as `clipkit retrieve search` serves them: written, then read back
# through `load_index`. Timed straight after building, the same 100k graph answered 7% slower
# than after a round trip through the file (memory layout, not the graph).
index = ix.load_index(f"{tmp.name}/ck.index")
tuning = ix.tune_index(index, x, target_recall=0.95, k=10, queries=queries)
report = ix.index_report(
    index, factory=choice.factory, build_seconds=build_s, tuning=tuning, path=f"{tmp.name}/ck.index"
)

flat = faiss.IndexFlatIP(dim)
flat.add(x)


AUTOFAISS_TIMEOUT_S = 3600  # its OPQ training took 500 s for 20k vectors on 2 cores


def autofaiss_pick(tmp: str) -> tuple[dict, faiss.Index | None]:
    """autofaiss's index for the same vectors and budget, built in its own venv (it pins
    faiss-cpu) and read back here, so both indexes are tuned and timed in this one process."""
    ref_py = Path(__file__).resolve().parents[2] / ".venv-autofaiss" / "bin" / "python"
    if not ref_py.exists():
        return {"error": "no .venv-autofaiss (scripts/setup_autofaiss.sh makes it)"}, None
    np.save(f"{tmp}/x.npy", x)
    script = str(Path(__file__).parent / "autofaiss_index.py")
    args = [str(ref_py), script, f"{tmp}/x.npy", str(budget // 2**20), f"{tmp}/af.index"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=AUTOFAISS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"autofaiss did not finish within {AUTOFAISS_TIMEOUT_S} s"}, None
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:300]}, None
    info = json.loads(out.stdout.strip().splitlines()[-1])
    index = ix.load_index(f"{tmp}/af.index")
    # The same tuner and queries as clipkit's index: equal recall target, equal method.
    tuning = ix.tune_index(index, x, target_recall=0.95, k=10, queries=queries)
    info.update(
        {
            "search_param": {tuning["param"]: tuning["value"]},
            "recall@10": tuning["recall"],
            "reached": tuning["reached"],
            "size_bytes": Path(f"{tmp}/af.index").stat().st_size,
        }
    )
    return info, index


autofaiss, af_index = autofaiss_pick(tmp.name)

# Single-query latency on one OpenMP thread for every index: a one-query search gains nothing
# from a thread team, and on shared cores the idle team's waits inflated exact search ~20x (16
# vs 0.75 ms at 20k x 256) and made the ratio depend on other jobs. Rounds alternate between the
# indexes in this one process: timed in separate processes, two copies of the same 1M HNSW graph
# differed by 11%, which an in-process A/B showed was not the graphs (2.21-2.30 vs 2.24-2.35 ms).
faiss.omp_set_num_threads(1)
timed = {"clipkit": index, "flat": flat} | ({"autofaiss": af_index} if af_index is not None else {})
rounds: dict[str, list[float]] = {name: [] for name in timed}
for _ in range(3):
    for name, idx in timed.items():
        rounds[name].append(ix._median_single_query_ms(idx, queries, 10))
ms = {name: float(np.median(times)) for name, times in rounds.items()}
if af_index is not None:
    autofaiss["median_query_ms"] = ms["autofaiss"]
    autofaiss["speedup_vs_autofaiss"] = ms["autofaiss"] / ms["clipkit"]
print(
    json.dumps(
        {
            "row": f"index: auto ({choice.factory}, budget {budget / 2**20:.0f} MB) vs flat, "
            f"{n} x {dim}, "
            f"recall@10 {tuning['recall']:.3f}",
            "clipkit": ms["clipkit"],
            "reference": ms["flat"],
            "ratio": ms["flat"] / ms["clipkit"],
            "unit": "median single-query ms, 1 OpenMP thread, median of 3 alternating rounds "
            "(ratio = speed-up)",
            "rounds_ms": rounds,
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
