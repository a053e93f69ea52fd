"""The training stream: round trip, rank/worker splitting, bad samples, exact resume."""

import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from clipkit.config import ConfigError, DataConfig
from clipkit.data.pipeline import Collate, DataPosition, build_loader
from clipkit.data.shards import ShardStream, StreamSpec
from clipkit.data.sources import expand_sources, preflight
from clipkit.data.tokenize import build_tokenizer
from clipkit.data.views import ViewSpec
from clipkit.distributed import DistInfo
from clipkit.models import factory

PREPROCESS = factory.preprocess(factory.resolve_arch(factory.ModelConfig(name="test")))


def _jpeg(colour, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder, n_shards, per_shard, extra=None):
    """Shards of solid-colour images; sample i's caption is `caption i`."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes, i = {}, 0
    for s in range(n_shards):
        name = f"shard-{s:04d}.tar"
        with wds.TarWriter(str(folder / name)) as tw:
            for _ in range(per_shard):
                tw.write(
                    {
                        "__key__": f"{i:06d}",
                        "jpg": _jpeg((i % 256, 0, 0)),
                        "txt": f"caption {i}".encode(),
                    }
                )
                i += 1
            for sample in (extra or {}).get(s, []):
                tw.write(sample)
        sizes[name] = per_shard + len((extra or {}).get(s, []))
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


def _loader(folder, *, rank=0, world=1, workers=0, batch=4, buffer=0, position=None, seed=0):
    cfg = DataConfig(data=str(folder), batch_size=batch, workers=workers, shuffle_buffer=buffer)
    tok = build_tokenizer(PREPROCESS)
    return build_loader(
        cfg, PREPROCESS, ViewSpec(), tok, DistInfo(rank, rank, world), seed, position
    )


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def test_round_trip(tmp_path):
    folder = write_shards(tmp_path / "s", 2, 6)
    loader, info = _loader(folder, batch=4)
    assert info.num_samples == 12 and info.batches_per_epoch == 3
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    assert sorted(_keys(batches)) == [f"{i:06d}" for i in range(12)]
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["text"].shape == (4, 16)
    tok = build_tokenizer(PREPROCESS)
    i = int(b["key"][0])
    assert torch.equal(b["text"][0], tok([f"caption {i}"])[0])


def test_ranks_and_workers_cover_every_sample_once(tmp_path):
    folder = write_shards(tmp_path / "s", 8, 5)
    seen = []
    for rank in range(2):
        loader, info = _loader(folder, rank=rank, world=2, workers=2, batch=5)
        it = iter(loader)
        seen += _keys(next(it) for _ in range(info.batches_per_epoch))
    assert len(seen) == 40 and len(set(seen)) == 40


def test_shard_assignment_is_a_partition_and_changes_with_epoch(tmp_path):
    urls = [f"u{i}" for i in range(10)]
    spec = StreamSpec(urls=urls, data=DataConfig(batch_size=1), batches_per_worker=1)
    stream = ShardStream(spec, None, None)
    for epoch in range(3):
        parts = [stream._shards(epoch, sid, 4, 0) for sid in range(4)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(urls)
    assert stream._shards(0, 0, 4, 0) != stream._shards(1, 0, 4, 0) or stream._shards(
        0, 1, 4, 0
    ) != stream._shards(1, 1, 4, 0)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    bad = {
        0: [
            {"__key__": "bad1", "jpg": b"not an image", "txt": b"x"},
            {"__key__": "bad2", "jpg": _jpeg((1, 2, 3))},  # no caption
            {"__key__": "bad3", "jpg": _jpeg((1, 2, 3)), "txt": b"   "},
            {"__key__": "bad4", "jpg": _jpeg((1, 2, 3)), "txt": b"\xff\xfe\xfa"},
            {"__key__": "bad5", "jpg": b"", "txt": b"empty image"},
            {"__key__": "bad6", "txt": b"no image at all"},
        ]
    }
    folder = write_shards(tmp_path / "s", 1, 6, extra=bad)
    loader, _ = _loader(folder, batch=3)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]  # the 6 bad ones sit between pass 1 and pass 2
    assert set(_keys(batches)) == {f"{i:06d}" for i in range(6)}
    counts = {}
    for b in batches:
        for reason, n in b["_bad"].items():
            counts[reason] = counts.get(reason, 0) + n
    assert counts == {
        "undecodable_image": 1,
        "no_caption": 1,
        "empty_caption": 1,
        "caption_not_utf8": 1,
        "empty_image": 1,
        "no_image": 1,
    }


def test_image_modes_are_converted(tmp_path):
    samples = []
    for i, mode in enumerate(["L", "RGBA", "CMYK", "I;16", "P"]):
        img = Image.new(mode, (20, 20))
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
        samples.append({"__key__": f"m{i}", "png": buf.getvalue(), "txt": b"a mode"})
    folder = write_shards(tmp_path / "s", 1, 0, extra={0: samples})
    loader, _ = _loader(folder, batch=5)
    batch = next(iter(loader))
    assert sorted(batch["key"]) == [f"m{i}" for i in range(5)] and not batch["_bad"]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly(tmp_path, workers):
    """Batches after a resume from a saved position equal the uninterrupted stream's."""
    folder = write_shards(tmp_path / "s", 4, 7)
    loader, _ = _loader(folder, workers=workers, batch=3, buffer=5, seed=3)
    it = iter(loader)
    reference = [next(it) for _ in range(14)]  # crosses an epoch boundary
    position = DataPosition()
    for b in reference[:5]:
        position.update(b)
    state = json.loads(json.dumps(position.state()))  # as stored in a checkpoint
    resumed_loader, _ = _loader(
        folder, workers=workers, batch=3, buffer=5, seed=3, position=DataPosition.from_state(state)
    )
    it2 = iter(resumed_loader)
    for want in reference[5:]:
        got = next(it2)
        assert got["key"] == want["key"]
        assert torch.equal(got["image"], want["image"])  # same augmentations too
        assert torch.equal(got["text"], want["text"])


def test_sources_and_preflight_errors(tmp_path):
    folder = write_shards(tmp_path / "s", 3, 2)
    assert len(expand_sources(str(folder))) == 3
    assert len(expand_sources(f"{folder}/shard-{{0000..0001}}.tar::{folder}/shard-0002.tar")) == 3
    with pytest.raises(ConfigError, match="no shard matches"):
        expand_sources(str(tmp_path / "nothing-{00..03}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no \\*.tar"):
        expand_sources(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="at least one shard"):
        preflight(expand_sources(str(folder)), ranks=2, workers=2, resampled=False)
    preflight(expand_sources(str(folder)), ranks=2, workers=2, resampled=True)
    (tmp_path / "bad.tar").write_bytes(b"definitely not a tar")
    with pytest.raises(ConfigError, match="not a readable tar"):
        preflight([str(tmp_path / "bad.tar")], ranks=1, workers=1, resampled=False)


def test_collate_stacks_views_first():
    tok = build_tokenizer(PREPROCESS)
    samples = [
        {
            "caption": "a",
            "key": "k",
            "views": torch.zeros(2, 3, 8, 8),
            "teacher_image": torch.zeros(3, 8, 8),
            "boxes": torch.zeros(2, 4),
        }
    ] * 3
    batch = Collate(tok)(samples)
    assert batch["views"].shape == (2, 3, 3, 8, 8) and batch["boxes"].shape == (3, 2, 4)


def test_data_layer_imports_no_model_or_method_code():
    """The data layer sits below models and methods: not even a lazy import reaches up."""
    import ast
    from pathlib import Path

    import clipkit.data

    upward = ("clipkit.models", "clipkit.methods")
    for path in sorted(Path(clipkit.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not [n for n in names if n.startswith(upward)], f"{path.name} imports {names}"
