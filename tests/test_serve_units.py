"""The serve package's parts without a server: request parsing, the batching worker (batches,
bounded queue, draining on close) with a stand-in encoder, and clip-retrieval's deduplication."""

from __future__ import annotations

import base64
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from clipkit.serve.collection import _unique_rows
from clipkit.serve.query import BadRequest, parse_knn, parse_metadata
from clipkit.serve.worker import BatchWorker, Job, QueueFull


def knn(**body):
    return parse_knn(body, default_index="main", max_results=100, max_image_bytes=1000)


def test_parse_clip_client_body():
    """The body ClipClient sends (every field, the ignored ones included)."""
    body = {
        "text": "a cat", "image": None, "image_url": None, "embedding_input": None,
        "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
        "indice_name": "laion5B", "use_mclip": False, "aesthetic_score": 9,
        "aesthetic_weight": 0.5, "modality": "image", "num_images": 40, "num_result_ids": 40,
        "verbose": False,
    }  # fmt: skip
    q = knn(**body)
    assert (q.text, q.kind, q.indice_name, q.num_images, q.num_result_ids, q.deduplicate) == (
        "a cat", "text", "laion5B", 40, 40, True,
    )  # fmt: skip


def test_parse_defaults_and_kinds():
    q = knn(embedding_input=[[1, 2.5]])
    assert (q.kind, q.embedding, q.indice_name, q.num_images, q.modality) == (
        "embedding", [1.0, 2.5], "main", 40, "image",
    )  # fmt: skip
    image = knn(image="data:image/png;base64," + base64.b64encode(b"\x89PNG").decode())
    assert (image.kind, image.image_bytes) == ("image", b"\x89PNG")
    assert knn(image_url="http://x/y.jpg").kind == "image"
    # num_result_ids below num_images is raised to it (ids past num_images carry no metadata)
    assert knn(text="x", num_images=7, num_result_ids=3).num_result_ids == 7


@pytest.mark.parametrize(
    ("body", "needle", "status"),
    [
        ({}, "exactly one of", 400),
        ({"text": "x", "embedding_input": [1]}, "exactly one of", 400),
        ({"text": ""}, "text is empty", 400),
        ({"text": 3}, "text must be a string", 400),
        ({"text": "x", "num_images": 101}, "between 1 and 100", 400),
        ({"text": "x", "num_images": True}, "must be an integer", 400),
        ({"text": "x", "modality": "video"}, "modality", 400),
        ({"text": "x", "indice_name": 4}, "indice_name", 400),
        ({"embedding_input": [1, float("nan")]}, "finite", 400),
        ({"image": "@@@@"}, "base64", 400),
        ({"image": "A" * 2000}, "larger than 1,000 bytes", 413),
    ],
)
def test_parse_refuses(body, needle, status):
    with pytest.raises(BadRequest, match=needle) as caught:
        knn(**body)
    assert caught.value.status == status


def test_parse_metadata():
    assert parse_metadata({"ids": [4, 1]}, "main", 10) == ("main", [4, 1])
    with pytest.raises(BadRequest, match="at most 10 ids"):
        parse_metadata({"ids": list(range(11))}, "main", 10)
    with pytest.raises(BadRequest, match="list of integers"):
        parse_metadata({"ids": [1.5]}, "main", 10)


class GatedEncoder:
    """Encodes a text as a one-hot of its length; the first call waits for `gate`, so the
    queries submitted meanwhile pile up in the queue."""

    def __init__(self):
        self.entered, self.gate, self.calls = threading.Event(), threading.Event(), []

    def texts(self, texts):
        self.entered.set()
        self.gate.wait(60)
        self.calls.append(list(texts))
        out = np.zeros((len(texts), 8), np.float32)
        out[np.arange(len(texts)), [len(t) % 8 for t in texts]] = 1
        return out


class FlatCollection:
    """An exact inner-product search over 8 one-hot rows, as Collection.search answers."""

    def __init__(self, encoder):
        self.encoder, self.vectors, self.searches = encoder, np.eye(8, dtype=np.float32), []

    def search(self, queries, k):
        self.searches.append(len(queries))
        scores = queries @ self.vectors.T
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, ids, 1), ids


def _jobs(collection, texts, k=2):
    return [Job(collection, "text", t, k) for t in texts]


def test_waiting_queries_are_encoded_and_searched_in_one_batch():
    encoder = GatedEncoder()
    coll = FlatCollection(encoder)
    worker = BatchWorker(workers=1, max_batch=32, queue_size=64)
    worker.start()
    first = worker.submit(_jobs(coll, ["abc"])[0])
    encoder.entered.wait(60)  # the worker holds the first query, blocked in the encoder
    texts = [f"{'x' * n}" for n in range(1, 11)]
    futures = [worker.submit(job) for job in _jobs(coll, texts, k=3)]
    encoder.gate.set()
    assert first.result(60)[1].tolist() == [3, 0]
    for text, future in zip(texts, futures, strict=True):
        scores, ids = future.result(60)
        assert ids[0] == len(text) % 8 and scores[0] == 1.0 and len(ids) == 3
    assert encoder.calls == [["abc"], texts]  # 10 concurrent queries: one encoder batch
    assert coll.searches == [1, 10]
    assert (worker.stats.batches, worker.stats.queries, worker.stats.largest_batch) == (2, 11, 10)
    worker.close()


def test_full_queue_is_refused_and_close_drains_the_rest():
    encoder = GatedEncoder()
    coll = FlatCollection(encoder)
    worker = BatchWorker(workers=1, max_batch=2, queue_size=3)
    worker.start()
    held = worker.submit(_jobs(coll, ["a"])[0])
    encoder.entered.wait(60)
    queued = [worker.submit(job) for job in _jobs(coll, ["bb", "ccc", "dddd"])]
    with pytest.raises(QueueFull, match="3 queries waiting"):
        worker.submit(_jobs(coll, ["eeeee"])[0])
    encoder.gate.set()
    worker.close()  # returns once everything queued before it is answered
    assert all(f.done() for f in [held, *queued])
    assert [f.result()[1][0] for f in queued] == [2, 3, 4]
    assert encoder.calls == [["a"], ["bb", "ccc"], ["dddd"]]  # --max-batch 2


def test_a_failing_encoder_fails_its_batch_not_the_worker():
    calls = []

    def texts(batch):
        calls.append(batch)
        if "boom" in batch:
            raise RuntimeError("encoder failed")
        return np.eye(8, dtype=np.float32)[: len(batch)]

    coll = FlatCollection(SimpleNamespace(texts=texts))
    worker = BatchWorker(workers=1)
    worker.start()
    with pytest.raises(RuntimeError, match="encoder failed"):
        worker.submit(_jobs(coll, ["boom"])[0]).result(60)
    assert worker.submit(_jobs(coll, ["fine"])[0]).result(60)[1][0] == 0
    worker.close()


def test_embedding_jobs_skip_the_encoder():
    coll = FlatCollection(SimpleNamespace())  # no encoder methods at all
    worker = BatchWorker(workers=2)
    worker.start()
    vector = np.eye(8, dtype=np.float32)[5]
    assert worker.submit(Job(coll, "embedding", vector.tolist(), 1)).result(60)[1].tolist() == [5]
    worker.close()


def test_dedup_keeps_the_best_of_each_near_duplicate_group():
    """clip-retrieval's rule: cosine >= 0.94 links two results, groups are transitive, the
    best-ranked member of a group stays."""
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.97, 0.243, 0.0])  # cos(a, b) = 0.97
    c = np.array([0.88, 0.475, 0.0])  # cos(a, c) = 0.88 < 0.94 but cos(b, c) = 0.97
    d = np.array([0.0, 0.0, 1.0])
    rows = np.stack([d, a, b, c, 2 * a])  # best first; 2a duplicates a (scale does not matter)
    assert _unique_rows(rows).tolist() == [True, True, False, False, False]
    assert _unique_rows(np.stack([a, d])).tolist() == [True, True]


def test_bound_socket_is_tcp_and_a_taken_port_is_a_user_error():
    """asyncio sets TCP_NODELAY only on sockets that say they are TCP: without it every answer
    waited ~40 ms (Nagle vs delayed ACK)."""
    import socket

    from clipkit.config import ConfigError
    from clipkit.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
