"""Shard folders without sizes.json: counts from tar headers, img2dataset stats, the cache, and a
bare folder that trains (issue 18, item 1)."""

import io
import json
import logging
import shutil
import tarfile

import pytest

from clipkit.config import ConfigError
from clipkit.data import counting
from clipkit.data.counting import CACHE_NAME, count_shards, count_tar
from clipkit.data.decode import pick
from clipkit.data.tarscan import shard_samples
from tests.cli_util import invoke

KEYS = ("jpg;jpeg;png;webp", "txt")


def _true_count(path) -> int:
    """The reference: samples the training stream groups that have an image and a caption."""
    return sum(
        1
        for s in shard_samples(str(path), lambda e: True)
        if pick(s, KEYS[0]) is not None and pick(s, KEYS[1]) is not None
    )


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def bare(tmp_path, demo_root):
    """The demo train split without its sizes.json."""
    folder = tmp_path / "shards"
    shutil.copytree(demo_root / "train", folder)
    (folder / "sizes.json").unlink()
    return folder


def test_header_count_equals_true_count_on_mixed_members(tmp_path):
    shard = tmp_path / "mixed.tar"
    _tar(
        shard,
        [
            ("a.jpg", b"x"), ("a.txt", b"cap"), ("a.json", b"{}"),  # complete
            ("b.png", b"x"),  # no caption
            ("c.txt", b"cap"),  # no image
            ("sub/d.webp", b"x"), ("sub/d.txt", b"cap"),  # complete, in a folder
            ("e.JPG", b"x"), ("e.txt", b"cap"),  # upper-case extension
            ("README", b"no key"),
            ("f.seg.jpg", b"x"), ("f.txt", b"cap"),  # image under 'seg.jpg': not an image key
            ("g.jpg", b"x"), ("g.txt", b"cap"),
        ],
    )  # fmt: skip
    assert count_tar(shard, *KEYS) == _true_count(shard) == 4


def test_bare_folder_counts_cache_and_reuse(bare, caplog):
    expected = sum(_true_count(p) for p in sorted(bare.glob("*.tar")))
    urls = sorted(str(p) for p in bare.glob("*.tar"))
    with caplog.at_level(logging.INFO, logger="clipkit.data.counting"):
        assert count_shards(urls, *KEYS) == expected == 512
    assert "4 shard(s) from counting tar headers" in caplog.text
    cache = json.loads((bare / CACHE_NAME).read_text())
    assert sorted(cache["counts"]["|".join(KEYS)]) == sorted(p.name for p in bare.glob("*.tar"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipkit.data.counting"):
        assert count_shards(urls, *KEYS) == 512
    assert "4 shard(s) from the count cache" in caplog.text
    # a changed shard is counted again: the cache entry no longer matches its size
    _tar(bare / "shard-000000.tar", [("a.jpg", b"x"), ("a.txt", b"c")])
    assert count_shards(urls, *KEYS) == 512 - 128 + 1


def test_img2dataset_stats_are_used(bare, caplog):
    urls = sorted(str(p) for p in bare.glob("*.tar"))
    # img2dataset's stats name `successes`; a number unlike the true count shows it was read
    (bare / "shard-000001_stats.json").write_text(json.dumps({"count": 130, "successes": 100}))
    with caplog.at_level(logging.INFO, logger="clipkit.data.counting"):
        assert count_shards(urls, *KEYS) == 512 - 128 + 100
    assert "1 shard(s) from img2dataset stats" in caplog.text


def test_unwritable_folder_caches_in_clipkit_cache(bare, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPKIT_CACHE", str(tmp_path / "cache"))
    real = counting.atomic_write_bytes

    def refuse_beside(path, data):
        if path.parent == bare:
            raise PermissionError(13, "Permission denied")
        real(path, data)

    monkeypatch.setattr(counting, "atomic_write_bytes", refuse_beside)
    urls = sorted(str(p) for p in bare.glob("*.tar"))
    assert count_shards(urls, *KEYS) == 512
    assert not (bare / CACHE_NAME).exists()
    [cached] = (tmp_path / "cache" / "counts").glob("*.json")
    assert json.loads(cached.read_text())["folder"] == str(bare.resolve())
    monkeypatch.setattr(counting, "count_tar", lambda *a: pytest.fail("counted again"))
    assert count_shards(urls, *KEYS) == 512


def test_remote_shards_need_sizes_or_a_flag():
    with pytest.raises(ConfigError, match="--train-num-samples N or put a sizes.json"):
        count_shards(["pipe:cat /x/000.tar"], *KEYS)


def test_bare_folder_trains(bare, tmp_path):
    res = invoke(
        "pretrain", "--data", bare, "--out", tmp_path / "run", "--model", "test",
        "--batch-size", 16, "--workers", 1, "--threads", 1, "--steps", 2,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (bare / CACHE_NAME).is_file()
