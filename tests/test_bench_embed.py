"""The arithmetic of scripts/bench_embed.py: how each tool's own timing becomes images/s."""

import pytest

from tests.script_loader import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_embed")


def test_clipkit_rate_reads_the_closing_line(bench):
    log = (
        "07:46:19 INFO part metadata_3.parquet: 250 images written\n"
        "embeddings: out  (4 parts: 4 written, 0 already complete; "
        "1000 images embedded in 102.7s)\n"
    )
    assert bench.clipkit_rate(log) == (1000, 102.7)


def test_clipkit_rate_without_the_line_fails(bench):
    with pytest.raises(RuntimeError, match="images embedded in"):
        bench.clipkit_rate("Traceback ...")


def test_clip_retrieval_rate_sums_partitions(bench):
    stats = [
        {"sample_count": 300, "total_duration": 12.5, "start_time": 5e9},
        {"sample_count": 200, "total_duration": 7.5, "start_time": 5e9},
    ]
    images, seconds = bench.clip_retrieval_rate(stats)
    assert (images, seconds) == (500, 20.0)
    assert images / seconds == 25.0


def test_clip_retrieval_rate_without_samples_fails(bench):
    with pytest.raises(RuntimeError, match="no stats"):
        bench.clip_retrieval_rate([{"sample_count": 0, "total_duration": 0.0}])


def test_matched_cosines_pairs_rows_by_key(bench):
    import numpy as np

    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[0.0, 5.0], [3.0, 4.0]])
    cos = bench.matched_cosines(a, ["x", "y"], b, ["y", "x"])
    np.testing.assert_allclose(cos, [0.6, 1.0])
