"""FAISS index choice, build, tuning and I/O against brute-force numpy search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from clipkit import index as ix


def clustered(n: int, d: int, clusters: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ x.T  # (Q, N)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


@pytest.fixture(scope="module")
def x20k() -> np.ndarray:
    return clustered(20_000, 32)


def test_flat_search_equals_brute_force():
    x, q = clustered(2000, 32, seed=1), clustered(300, 32, seed=2)
    index = ix.build_index(x)  # 2k vectors: exact
    assert isinstance(faiss.downcast_index(index), faiss.IndexFlat)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    scores, ids = ix.search(index, q, 10, batch_size=64)
    ref_scores, ref_ids = brute_force(x, q, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("budget", "kind", "factory"),
    [(4_000_000, "ivf-flat", "IVF512,Flat"), (10_000_000, "hnsw", "HNSW32,Flat")],
)
def test_auto_index_tunes_to_target_recall(x20k, budget, kind, factory):
    choice = ix.choose_index(len(x20k), 32, budget)
    assert (choice.kind, choice.factory) == (kind, factory)
    index = ix.build_index(x20k, max_memory_bytes=budget)
    tuning = ix.tune_index(index, x20k, target_recall=0.95, k=10, n_queries=500, seed=3)
    assert tuning["reached"] and tuning["recall"] >= 0.95
    assert tuning["param"] == ("nprobe" if kind == "ivf-flat" else "efSearch")
    # The reported recall is real: recompute it with numpy on the same queries.
    q = ix.make_queries(x20k, 500, 3, 0.1)
    _, truth = brute_force(x20k, q, 10)
    _, found = ix.search(index, q, 10)
    mine = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert mine == pytest.approx(tuning["recall"], abs=1e-9)
    if kind == "ivf-flat":  # the cheapest setting was not enough, so the sweep really searched
        assert tuning["sweep"][0]["recall"] < 0.95 and tuning["value"] > 1
    report = ix.index_report(index, factory=choice.factory, build_seconds=1.0, tuning=tuning)
    assert report["recall@10"] == tuning["recall"]
    assert report["size_bytes"] == faiss.serialize_index(index).size
    assert report[tuning["param"]] == tuning["value"]


def test_choose_index_rules():
    assert ix.choose_index(9_999, 32, 10**9).kind == "flat"
    assert ix.choose_index(10_000, 32, 10**9).kind == "hnsw"
    # n=20k, d=32: flat 2.56 MB, HNSW 20k*(128+256+16) = 8.0 MB,
    # IVF-Flat 20k*136 + 512*128 = 2,785,536 B, OPQ8_32,IVF512,PQ8x8 = 422,400 B.
    hnsw = ix.choose_index(20_000, 32, 8_000_000)
    assert hnsw.kind == "hnsw" and hnsw.estimated_bytes == 8_000_000
    ivf = ix.choose_index(20_000, 32, 7_999_999)
    assert (ivf.factory, ivf.estimated_bytes) == ("IVF512,Flat", 2_785_536)
    pq = ix.choose_index(20_000, 32, 2_785_535)
    assert (pq.kind, pq.factory, pq.estimated_bytes) == ("ivf-pq", "OPQ8_32,IVF512,PQ8x8", 422_400)
    assert ix.choose_index(20_000, 32, 400_000).factory == "OPQ4_32,IVF512,PQ4x8"
    with pytest.raises(ix.IndexBudgetError):
        ix.choose_index(20_000, 32, 100_000)
    # n below 10k but over budget still gets a compressed index; huge n skips HNSW.
    assert ix.choose_index(9_000, 32, 200_000).kind == "ivf-pq"
    assert ix.choose_index(6_000_000, 32, 10**12).kind == "ivf-flat"
    assert ix.choose_index(10**6, 64, 10**12, kind="ivf-flat").params["nlist"] == 4096
    assert ix.choose_index(10**9, 64, 10**13, kind="ivf-flat").params["nlist"] == 65536
    with pytest.raises(ValueError, match="unknown index kind"):
        ix.choose_index(100, 8, 10**9, kind="lsh")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat", "ivf-pq"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, kind, mmap):
    x, q = clustered(2000, 16, seed=4), clustered(50, 16, seed=5)
    index = ix.build_index(x, kind=kind)
    if kind in ("ivf-flat", "ivf-pq"):
        faiss.extract_index_ivf(index).nprobe = 4
    path = tmp_path / "sub" / "images.faiss"
    ix.save_index(index, path)
    loaded = ix.load_index(path, mmap=mmap)
    if kind in ("ivf-flat", "ivf-pq"):
        faiss.extract_index_ivf(loaded).nprobe = 4
    for a, b in zip(ix.search(index, q, 5), ix.search(loaded, q, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in path.parent.iterdir()) == ["images.faiss"]
    assert ix.index_report(loaded, path=path)["size_bytes"] == path.stat().st_size


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "index.faiss"
    ix.save_index(ix.build_index(clustered(100, 8)), path)
    before = path.read_bytes()

    def broken_write(index, filename):
        with open(filename, "wb") as f:
            f.write(b"half an index")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        ix.save_index(ix.build_index(clustered(200, 8, seed=1)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]


def test_query_errors():
    index = ix.build_index(clustered(50, 8))
    with pytest.raises(ix.IndexMismatchError, match="dimension 9"):
        ix.search(index, np.zeros((2, 9), np.float32), 5)
    with pytest.raises(ix.IndexMismatchError, match="k=51"):
        ix.search(index, np.zeros((2, 8), np.float32), 51)
    assert issubclass(ix.IndexMismatchError, ValueError)
    with pytest.raises(FileNotFoundError):
        ix.load_index("/nonexistent/index.faiss")


def test_tune_flat_is_exact():
    x = clustered(500, 16)
    tuning = ix.tune_index(ix.build_index(x), x, n_queries=100)
    assert tuning["param"] is None and tuning["recall"] == 1.0 and tuning["reached"]
    assert tuning["median_query_ms"] > 0
