"""Run inside .venv-autofaiss: the index autofaiss builds for the same vectors and memory budget,
its search parameter then raised until recall@10 vs exact >= 0.95 on the same queries, and its
median single-query latency. Prints one JSON line. Usage: autofaiss_index.py VECTORS.npy
QUERIES.npy BUDGET_MB"""

import json
import sys
import time

import faiss
import numpy as np
from autofaiss import build_index

x = np.load(sys.argv[1])
q = np.load(sys.argv[2])
budget_mb = int(float(sys.argv[3]))
t0 = time.perf_counter()
index, infos = build_index(
    embeddings=x,
    save_on_disk=False,
    metric_type="ip",
    max_index_memory_usage=f"{budget_mb}MB",
    current_memory_available="16GB",
    verbose=40,
)
build_s = time.perf_counter() - t0
flat = faiss.IndexFlatIP(x.shape[1])
flat.add(x)
truth = flat.search(q, 10)[1]
space = faiss.ParameterSpace()
knob = "efSearch" if "HNSW" in infos["index_key"] else "nprobe"
recall, value = 0.0, None
for value in [2**i for i in range(1, 15)]:
    space.set_index_parameter(index, knob, value)
    found = index.search(q, 10)[1]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))
    if recall >= 0.95:
        break
lat = []
for row in q[:100]:
    t = time.perf_counter()
    index.search(row[None], 10)
    lat.append((time.perf_counter() - t) * 1000)
print(
    json.dumps(
        {
            "index_key": infos["index_key"],
            "build_seconds": build_s,
            knob: value,
            "recall@10": recall,
            "median_query_ms": float(np.median(lat)),
        }
    )
)
