"""Run inside .venv-autofaiss: build the index autofaiss picks for the same vectors and memory
budget and write it to OUT, so that index_bench.py tunes and times it in the same process as
clipkit's (same queries, alternating rounds). Prints one JSON line.
Usage: autofaiss_index.py VECTORS.npy BUDGET_MB OUT.index"""

import json
import sys
import time

import faiss
import numpy as np
from autofaiss import build_index

x = np.load(sys.argv[1])
budget_mb = int(float(sys.argv[2]))
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
faiss.write_index(index, sys.argv[3])
print(
    json.dumps(
        {
            "index_key": infos["index_key"],
            "build_seconds": build_s,
            "faiss": faiss.__version__,
            "autofaiss_search_params": infos.get("index_param"),
        }
    )
)
