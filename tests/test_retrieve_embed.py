"""`clipkit retrieve embed`: clip-retrieval's layout, the same parts from 1 and 2 torchrun ranks,
and a resume after SIGKILL that keeps finished parts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipkit.index.parts import EmbeddingParts, find_parts, part_label

ROOT = Path(__file__).resolve().parents[1]


def _embed_cmd(checkpoint, data, out, nproc: int = 1, batch: int = 32) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    return launcher + [
        "-m", "clipkit", "retrieve", "embed", "--checkpoint", str(checkpoint),
        "--data", str(data), "--out", str(out), "--dtype", "float32",
        "--batch-size", str(batch), "--workers", "0", "--device", "cpu",
    ]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=_env(), stdin=subprocess.DEVNULL
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("embed") / "one"
    _run(_embed_cmd(tiny_checkpoint, demo_root / "train", out))
    return out


def _contents(root: Path) -> tuple[list, list, list]:
    parts = find_parts(root)
    images = [np.load(p.image) for p in parts]
    texts = [np.load(p.text) for p in parts]
    return images, texts, [pq.read_table(p.metadata).to_pylist() for p in parts]


def _assert_same(a: Path, b: Path) -> None:
    ia, ta, ma = _contents(a)
    ib, tb, mb = _contents(b)
    assert len(ia) == len(ib) == 4
    for x, y in zip(ia + ta, ib + tb, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    assert ma == mb


def test_layout_and_metadata(one_process, demo_root):
    """clip-retrieval's file names and columns; one row per image, one caption row per image."""
    shards = sorted((demo_root / "train").glob("*.tar"))
    assert [p.image.name for p in find_parts(one_process)] == [
        f"img_emb_{part_label(i, len(shards))}.npy" for i in range(len(shards))
    ]
    images, texts, metadata = _contents(one_process)
    sizes = json.loads((demo_root / "train" / "sizes.json").read_text())
    for i, shard in enumerate(shards):
        assert images[i].shape == texts[i].shape == (sizes[shard.name], 32)
        assert images[i].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(images[i], axis=1), 1, atol=1e-5)
        rows = metadata[i]
        assert list(rows[0])[:4] == ["image_path", "caption", "key", "shard"]
        assert {r["shard"] for r in rows} == {str(shard)}
        assert rows[0]["image_path"] == rows[0]["key"]
        assert all(r["caption"] for r in rows)  # every demo sample has a txt caption
    model = json.loads((one_process / "model.json").read_text())
    assert model["embed_dim"] == 32 and model["sha256"]
    parts = EmbeddingParts.open(one_process)
    assert parts.total == sum(sizes.values()) and parts.dim == 32


def test_two_ranks_write_what_one_process_writes(one_process, tiny_checkpoint, demo_root, tmp_path):
    out = tmp_path / "two"
    res = _run(_embed_cmd(tiny_checkpoint, demo_root / "train", out, nproc=2))
    assert "4 written" in res.stdout
    _assert_same(one_process, out)


def test_resume_after_sigkill(one_process, tiny_checkpoint, demo_root, tmp_path):
    """Kill the job once a part is complete; the rerun keeps that part's files untouched."""
    out = tmp_path / "killed"
    cmd = _embed_cmd(tiny_checkpoint, demo_root / "train", out, batch=4)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not find_parts(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = find_parts(out)
    assert 1 <= len(done) < 4, "the job must be killed between its parts"
    stamps = {p.image: (p.image.stat().st_mtime_ns, p.metadata.stat().st_mtime_ns) for p in done}
    res = _run(_embed_cmd(tiny_checkpoint, demo_root / "train", out, batch=4))
    assert f"{len(done)} already complete" in res.stdout
    for p in done:
        assert (p.image.stat().st_mtime_ns, p.metadata.stat().st_mtime_ns) == stamps[p.image]
    assert not list(out.rglob("*.tmp"))
    _assert_same(one_process, out)


def test_refuses_other_model_on_resume(one_process, demo_root, tmp_path):
    """A rerun into a folder embedded by other weights is refused (exit 2), nothing written."""
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(one_process), str(out)], check=True)
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())
    cmd = _embed_cmd("x", demo_root / "train", out)
    cmd[cmd.index("--checkpoint") : cmd.index("--checkpoint") + 2] = ["--model", "test"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 2
    assert "random weights cannot resume" in res.stderr
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()) == before


def test_empty_shard_gives_empty_part_and_indexes(tiny_checkpoint, demo_root, tmp_path):
    """A shard with no samples (img2dataset writes them when every download failed) becomes an
    empty part; `retrieve index --embeddings` indexes the others (in-process CLI)."""
    import shutil
    import tarfile

    from click.testing import CliRunner

    from clipkit.cli.main import cli

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sorted((demo_root / "train").glob("*.tar"))[0], data / "a.tar")
    tarfile.open(data / "b.tar", "w").close()
    out, idx = tmp_path / "emb", tmp_path / "idx"
    runner = CliRunner()
    res = runner.invoke(cli, _embed_cmd(tiny_checkpoint, data, out)[3:])
    assert res.exit_code == 0, res.output
    images, texts, metadata = _contents(out)
    assert [len(m) for m in metadata] == [128, 0] and images[1].shape == (0, 32)
    res = runner.invoke(cli, ["retrieve", "index", "--embeddings", str(out), "--out", str(idx)])
    assert res.exit_code == 0, res.output
    lines = (idx / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [m["key"] for m in metadata[0]]
