"""The query pipeline behind the HTTP handlers: a bounded queue of searches and worker threads
that take everything waiting (up to --max-batch), encode the texts of it in one batch and the
images in another, then search each index once for all its queries.

Batching is what keeps N concurrent clients from serialising on the encoder: a text encoder
costs about the same for 1 and for 32 captions on the CPU, and FAISS scans an index once per
batch of queries. A full queue is refused at once (`QueueFull`, HTTP 503) rather than letting
latency grow without bound."""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clipkit.data.eval_io import open_image
from clipkit.eval.embed import encode_images, encode_texts
from clipkit.serve.query import BadRequest

log = logging.getLogger(__name__)
_STOP = object()


class QueueFull(RuntimeError):
    """The service has --queue-size searches waiting already."""


class Encoder:
    """A loaded model (clipkit.eval.loading.LoadedModel) on its device: the query embeddings
    `clipkit retrieve search` makes, for many queries at once."""

    def __init__(self, loaded, device: torch.device):
        self.loaded, self.device = loaded, device

    def pixels(self, data: bytes) -> torch.Tensor:
        """Decoded and preprocessed as the index's images were; `BadRequest` if undecodable."""
        pixels = open_image(data, self.loaded.preprocess)
        if pixels is None:
            raise BadRequest("image cannot be decoded as an image file")
        return pixels

    def texts(self, texts: list[str]) -> np.ndarray:
        return encode_texts(self.loaded.model, self.loaded.tokenizer, texts, self.device).numpy()

    def images(self, pixels: list[torch.Tensor]) -> np.ndarray:
        return encode_images(self.loaded.model, torch.stack(pixels), self.device).numpy()


@dataclass
class Job:
    """One search: `payload` is the text, the preprocessed image tensor or the (D,) vector."""

    collection: Any  # clipkit.serve.collection.Collection
    kind: str  # "text" | "image" | "embedding"
    payload: Any
    k: int
    future: Future = field(default_factory=Future)


@dataclass
class WorkerStats:
    batches: int = 0
    queries: int = 0
    largest_batch: int = 0


class BatchWorker:
    """`workers` threads over one queue of at most `queue_size` jobs, batches of `max_batch`."""

    def __init__(self, workers: int = 1, max_batch: int = 32, queue_size: int = 256):
        self.max_batch = max_batch
        self.stats = WorkerStats()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._threads = [
            threading.Thread(target=self._loop, name=f"clipkit-serve-{i}", daemon=True)
            for i in range(workers)
        ]
        self._stats_lock = threading.Lock()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> Future:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is busy ({self._queue.maxsize} queries waiting)") from None
        return job.future

    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Finish every job already queued, then stop the threads (graceful shutdown)."""
        for _ in self._threads:
            self._queue.put(_STOP, timeout=timeout)
        for thread in self._threads:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[Job]) -> None:
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.queries += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        vectors = self._encode(batch)
        by_index: dict[int, list[int]] = defaultdict(list)
        for i, job in enumerate(batch):
            if vectors[i] is not None:
                by_index[id(job.collection)].append(i)
        for rows in by_index.values():
            jobs = [batch[i] for i in rows]
            _settle(jobs, lambda jobs=jobs, rows=rows: _search(jobs, [vectors[i] for i in rows]))

    def _encode(self, batch: list[Job]) -> list[np.ndarray | None]:
        """Query vectors in batch order (None where encoding failed: that job has its error)."""
        vectors: list[np.ndarray | None] = [None] * len(batch)
        groups: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i, job in enumerate(batch):
            if job.kind == "embedding":
                vectors[i] = np.asarray(job.payload, dtype=np.float32)
            else:
                groups[(id(job.collection.encoder), job.kind)].append(i)
        for (_, kind), rows in groups.items():
            encoder = batch[rows[0]].collection.encoder
            payloads = [batch[i].payload for i in rows]
            encode = encoder.texts if kind == "text" else encoder.images
            try:
                out = encode(payloads)
            except Exception as e:  # a failure is that batch's answer, not the worker's end
                log.exception("encoding %d %s queries failed", len(rows), kind)
                for i in rows:
                    _resolve(batch[i].future, error=e)
                continue
            for row, i in enumerate(rows):
                vectors[i] = out[row]
        return vectors


def _search(jobs: list[Job], vectors: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One index search for all `jobs` (same collection) with the largest k they ask for."""
    k = max(job.k for job in jobs)
    scores, ids = jobs[0].collection.search(np.stack(vectors), k)
    return [(scores[i, : job.k], ids[i, : job.k]) for i, job in enumerate(jobs)]


def _settle(jobs: list[Job], compute) -> None:
    try:
        results = compute()
    except Exception as e:
        log.exception("searching %d queries failed", len(jobs))
        for job in jobs:
            _resolve(job.future, error=e)
        return
    for job, result in zip(jobs, results, strict=True):
        _resolve(job.future, result)


def _resolve(future: Future, result: Any = None, error: Exception | None = None) -> None:
    """Answer a job unless its client has gone (a cancelled future takes no result)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
