#!/usr/bin/env python
"""Load test of `clipkit retrieve serve` on loopback (issue 19): text queries against an index
of --vectors random unit vectors (an index directory written by clipkit's own index code; the
encoder is the `test` model preset), at 1, 8 and 32 concurrent clients.

    python scripts/bench_serve.py                          # 1M vectors, docs/bench-serve.json
    python scripts/bench_serve.py --quick --out /tmp/s.json  # 20k vectors, a few seconds a level

Each level sends at most --queries requests or runs --seconds, whichever comes first; every
--malformed-every-th request is a bad one (broken JSON, empty text, unknown index, num_images
past the limit) that clipkit must answer with a 4xx. A 5xx to a good request or a dropped
connection is a server error (there must be none). Latencies are of the good requests only:
p50 / p99 and queries/s, each client on one keep-alive connection.

Side by side, on the same index file and vectors: `clip-retrieval back` (its own venv,
scripts/setup_reference_retrieval.sh; started by scripts/bench/clip_back_ref.py) asked by
`embedding_input`, and clipkit asked the same way. clip-retrieval cannot embed the text queries:
its back loads CLIP models through all_clip (downloaded weights, none here) and has no 32-dim
text encoder; it gets a random-weight ViT-B-32 only because it must load one. And the same
encoder + index search in this process, no HTTP (one query at a time; batches of 8 and 32):
what serving adds on top.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MALFORMED = [
    b"{not json",
    json.dumps({"text": "", "indice_name": "bench"}).encode(),
    json.dumps({"text": "a red star", "indice_name": "no-such-index"}).encode(),
    json.dumps({"text": "a red star", "indice_name": "bench", "num_images": 10**9}).encode(),
]
WORDS = "red green blue white black star circle square triangle cross small big two three".split()


def build_index(out: Path, n: int, seed: int, index_type: str) -> dict:
    """An index directory over n random unit vectors, through clipkit.eval.retrieval."""
    import torch

    from clipkit.eval.embed import SkipCounter
    from clipkit.eval.loading import load_model
    from clipkit.eval.retrieval import PairEmbeddings, build_index_dir
    from clipkit.serve import Encoder

    loaded = load_model(model="test")
    dim = Encoder(loaded, "cpu").texts(["the embedding width"]).shape[1]
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = PairEmbeddings(
        torch.from_numpy(vectors),
        torch.zeros(0, dim),
        torch.zeros(0, dtype=torch.long),
        [f"{i:09d}" for i in range(n)],
        [[f"random vector {i}"] for i in range(n)],
        [""] * n,
        SkipCounter(),
    )
    return build_index_dir(loaded, emb, out, index_type=index_type, seed=seed, overwrite=True)


def start_server(index: Path, args) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "clipkit", "retrieve", "serve", "--index", f"bench={index}"]
    cmd += ["--port", "0", "--no-inline-images", "--workers", str(args.workers)]
    cmd += ["--max-batch", str(args.max_batch), "--queue-size", str(args.queue_size)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        match = re.search(r"^serving .* on http://\S+:(\d+)/", line)
        if match:
            threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
            return proc, int(match.group(1))
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def query_text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 4))


class Level:
    """One load level: `clients` threads sharing a request budget and a deadline."""

    def __init__(self, port, clients, queries, seconds, every, make_body):
        self.port, self.clients, self.every, self.make_body = port, clients, every, make_body
        self.budget, self.deadline = queries, time.perf_counter() + seconds
        self.lock = threading.Lock()
        self.sent = 0
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}

    def _next(self) -> int | None:
        with self.lock:
            if self.sent >= self.budget or time.perf_counter() > self.deadline:
                return None
            self.sent += 1
            return self.sent

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while (i := self._next()) is not None:
            bad = self.every > 0 and i % self.every == 0
            body = MALFORMED[(i // self.every) % len(MALFORMED)] if bad else self.make_body(i)
            start = time.perf_counter()
            try:
                conn.request("POST", "/knn-service", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                status = "dropped"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            took = time.perf_counter() - start
            kind = _classify(status, bad)
            with self.lock:
                self.statuses[kind] = self.statuses.get(kind, 0) + 1
                if kind == "ok":
                    self.latencies.append(took)
        conn.close()

    def run(self) -> dict:
        start = time.perf_counter()
        threads = [threading.Thread(target=self._client) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        return summarize(self.latencies, wall) | {"clients": self.clients, **self.statuses}


def _classify(status, bad: bool) -> str:
    if status == "dropped":
        return "server_errors"
    if bad:  # clip-retrieval back answers most bad requests with a 500 and its traceback
        return {4: "malformed_4xx", 5: "malformed_5xx"}.get(status // 100, "malformed_accepted")
    if status >= 500:
        return "server_errors"
    return "ok" if status == 200 else f"good_got_{status}"


def summarize(latencies: list[float], wall: float) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    if not ms:
        return {"queries": 0}
    return {
        "queries": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "qps": round(len(ms) / wall, 1),
        "seconds": round(wall, 2),
    }


def in_process_reference(index: Path, clients: list[int], queries: int) -> list[dict]:
    """Encoder + index search in this process: one query at a time, and as one batch."""
    from clipkit.eval.loading import load_from_source
    from clipkit.eval.retrieval import open_index_dir
    from clipkit.serve import Collection, Encoder

    idx = open_index_dir(index)
    coll = Collection.open("bench", idx, Encoder(load_from_source(idx.model_info), "cpu"))
    rows = []
    n = min(queries, 400)
    times = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        coll.search(coll.encoder.texts([query_text(i)]), 10)
        times.append(time.perf_counter() - t)
    rows.append(summarize(times, time.perf_counter() - start) | {"mode": "one at a time"})
    for batch in sorted({c for c in clients if c > 1}):
        times, start = [], time.perf_counter()
        for b in range(max(1, n // batch)):
            t = time.perf_counter()
            coll.search(coll.encoder.texts([query_text(b * batch + j) for j in range(batch)]), 10)
            times += [time.perf_counter() - t] * batch
        rows.append(summarize(times, time.perf_counter() - start) | {"mode": f"batches of {batch}"})
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_clip_back(index: Path) -> tuple[subprocess.Popen, int] | None:
    """`clip-retrieval back` on the same index (scripts/bench/clip_back_ref.py), or None when
    its venv is absent (scripts/setup_reference_retrieval.sh)."""
    python = ROOT / ".venv-clipretrieval" / "bin" / "python"
    if not python.is_file():
        return None
    port, work = free_port(), ROOT / ".bench" / f"clip-back-{index.name}"
    cmd = [str(python), str(ROOT / "scripts" / "bench" / "clip_back_ref.py"), str(index)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(ROOT / ".bench" / "clip-back.log", "w")  # noqa: SIM115 (lives with the process)
    proc = subprocess.Popen([*cmd, str(work), str(port)], stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/indices-list")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(2)
    proc.kill()
    print(f"clip-retrieval back did not start: see {log.name}", file=sys.stderr)
    return None


def text_body(i: int) -> bytes:
    return json.dumps({"text": query_text(i), "indice_name": "bench", "num_images": 10}).encode()


def embedding_bodies(dim: int, n: int = 256):
    """clip-retrieval's required fields + a random unit vector as the query."""
    vectors = np.random.default_rng(1).standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    bodies = [
        json.dumps(
            {"embedding_input": v.tolist(), "indice_name": "bench", "modality": "image",
             "num_images": 10, "num_result_ids": 10, "deduplicate": False}
        ).encode()
        for v in vectors
    ]  # fmt: skip
    return lambda i: bodies[i % n]


def run_levels(port: int, clients: list[int], args, make_body, query: str) -> list[dict]:
    rows = []
    for c in clients:
        row = Level(port, c, args.queries, args.seconds, args.malformed_every, make_body).run()
        rows.append(row | {"query": query})
    return rows


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main() -> None:
    args = parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    index = ROOT / ".bench" / f"serve-index-{args.vectors}-{args.index_type}"
    build = None
    if not (index / "image.index").is_file():
        start = time.perf_counter()
        build = build_index(index, args.vectors, 0, args.index_type)
        build["seconds_total"] = round(time.perf_counter() - start, 1)
    report = json.loads((index / "report.json").read_text())
    by_vector = embedding_bodies(report["dim"])
    proc, port = start_server(index, args)
    try:
        levels = run_levels(port, clients, args, text_body, "text")
        levels += run_levels(port, clients, args, by_vector, "embedding")
    finally:
        exit_code = stop(proc)
    reference = in_process_reference(index, clients, args.queries)
    clip_back, started = [], None if args.no_clip_back else start_clip_back(index)
    if started:
        try:
            clip_back = run_levels(started[1], clients, args, by_vector, "embedding")
        finally:
            stop(started[0])
    result = {
        "vectors": args.vectors,
        "index": {k: report.get(k) for k in ("index_type", "dim", "ntotal", "recall@10")},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "server_exit_code_after_sigterm": exit_code,
        "levels": levels,
        "clip_retrieval_back": clip_back,
        "in_process_reference": reference,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "built_now": build,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--queries", type=int, default=1500, help="Most requests per level.")
    parser.add_argument("--seconds", type=float, default=30, help="Longest time per level.")
    parser.add_argument("--malformed-every", type=int, default=10)
    parser.add_argument("--index-type", default="ivf-flat")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of the server.")
    parser.add_argument("--no-clip-back", action="store_true", help="Skip clip-retrieval back.")
    parser.add_argument("--quick", action="store_true", help="20k vectors, 200 queries, 10 s.")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench-serve.json"))
    args = parser.parse_args()
    if args.quick:
        args.vectors, args.queries, args.seconds = 20_000, 200, 10
    return args


def print_table(result: dict) -> None:
    head = ["server, query, clients", "queries", "p50 ms", "p99 ms", "queries/s"]
    print("| " + " | ".join(head + ["malformed -> 4xx / 5xx", "server errors"]) + " |")
    print("|---" * 7 + "|")
    for who, rows in (
        ("clipkit", result["levels"]),
        ("clip-retrieval back", result["clip_retrieval_back"]),
    ):
        for row in rows:
            cells = [f"{who}, {row['query']}, {row['clients']}", row["queries"], row.get("p50_ms")]
            bad = f"{row.get('malformed_4xx', 0)} / {row.get('malformed_5xx', 0)}"
            cells += [row.get("p99_ms"), row.get("qps"), bad]
            print("| " + " | ".join(str(c) for c in [*cells, row.get("server_errors", 0)]) + " |")
    for row in result["in_process_reference"]:
        cells = [f"in-process, {row['mode']}", row["queries"], row.get("p50_ms")]
        print(
            "| "
            + " | ".join(str(c) for c in [*cells, row.get("p99_ms"), row.get("qps")])
            + " | - | - |"
        )


if __name__ == "__main__":
    main()
