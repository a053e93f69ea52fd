"""The built-in synthetic dataset: determinism, held-out combinations, captions, layouts."""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from clipkit.data import demo
from clipkit.data.demo import (
    COLOURS,
    PLURALS,
    SHAPES,
    caption,
    draw_scene,
    held_out_combos,
    sample_attrs,
    train_combos,
    write_demo,
)

SMALL = dict(
    train_samples=60, eval_samples=20, probe_train_samples=24, image_size=32, shard_size=25
)
ALL_COMBOS = {(s, c) for s in SHAPES for c in COLOURS}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo(out, seed=0, **SMALL)


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} read with plain tarfile (independent of the writer)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _split_samples(folder: Path) -> list[dict[str, bytes]]:
    return [s for tar in sorted(folder.glob("*.tar")) for s in _tar_samples(tar).values()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, written):
    out, _ = written
    write_demo(tmp_path / "again", seed=0, **SMALL)
    write_demo(tmp_path / "other", seed=1, **SMALL)
    first, again = _tree_bytes(out), _tree_bytes(tmp_path / "again")
    assert first.keys() == again.keys() and first == again
    other = _tree_bytes(tmp_path / "other")
    assert other.keys() == first.keys()
    assert other["train/shard-000000.tar"] != first["train/shard-000000.tar"]
    assert other["demo.json"] != first["demo.json"]  # different held-out combinations


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_held_out_combos_are_a_spread_fifth(seed):
    held = held_out_combos(seed)
    seen = train_combos(seed)
    assert len(held) == len(set(held)) == round(0.2 * 48) == 10
    assert set(held) | set(seen) == ALL_COMBOS and not set(held) & set(seen)
    # Every shape and colour is held out 1-2 times, and so still has training pairs.
    assert sorted(Counter(s for s, _ in held).values()) == [1, 1, 2, 2, 2, 2]
    assert sorted(Counter(c for _, c in held).values()) == [1] * 6 + [2] * 2
    assert {s for s, _ in seen} == set(SHAPES) and {c for _, c in seen} == set(COLOURS)
    assert held == held_out_combos(seed)
    assert held_out_combos(seed) != held_out_combos(seed + 100)


def test_train_never_shows_held_out_pairs_and_eval_only_does(written):
    out, summary = written
    held = {tuple(c) for c in summary["held_out_combos"]}
    assert held == set(held_out_combos(0))
    train = [json.loads(s["json"]) for s in _split_samples(out / "train")]
    evals = [json.loads(s["json"]) for s in _split_samples(out / "eval")]
    assert len(train) == 60 and len(evals) == 20
    assert not {(a["shape"], a["colour"]) for a in train} & held
    assert {(a["shape"], a["colour"]) for a in evals} <= held
    assert {a["shape"] for a in train} == set(SHAPES)
    assert {a["colour"] for a in train} == set(COLOURS)


_POSITION_WORDS = {
    "left": {"left"},
    "right": {"right"},
    "top": {"top", "upper", "high"},
    "bottom": {"bottom", "lower", "low"},
    "center": {"center", "centre", "middle", "centered"},
}
_SIZE_WORDS = {"small": {"small", "little", "tiny"}, "large": {"large", "big", "huge"}}
_COUNT_WORDS = {1: {"a", "an", "one", "single"}, 2: {"two", "pair"}, 3: {"three"}}


def _check_caption(text: str, attrs: dict) -> None:
    words = set(re.findall(r"[a-z]+", text.lower()))
    shape_word = attrs["shape"] if attrs["count"] == 1 else PLURALS[attrs["shape"]]
    assert shape_word in words and attrs["colour"] in words, text
    other_shapes = set(SHAPES) - {attrs["shape"]}
    assert not words & (other_shapes | {PLURALS[s] for s in other_shapes}), text
    assert not words & (set(COLOURS) - {attrs["colour"]}), text
    assert words & _COUNT_WORDS[attrs["count"]], text
    for kind, table in (("position", _POSITION_WORDS), ("size", _SIZE_WORDS)):
        wrong = set().union(*(v for k, v in table.items() if k != attrs[kind]))
        assert not words & wrong, text
    if "there" in words:
        assert ("is" in words) == (attrs["count"] == 1), text


def test_captions_in_shards_match_their_attributes(written):
    out, _ = written
    for split in ("train", "eval"):
        for sample in _split_samples(out / split):
            attrs = json.loads(sample["json"])
            text = sample["txt"].decode("utf-8")
            assert attrs["caption"] == text
            assert set(attrs) >= {"shape", "colour", "count", "size", "position", "background"}
            _check_caption(text, attrs)


def test_caption_is_varied_and_always_correct():
    rng = np.random.default_rng(0)
    attrs = {"shape": "cross", "colour": "orange", "count": 2, "size": "large",
             "position": "top", "background": "striped"}  # fmt: skip
    texts = [caption(rng, attrs) for _ in range(400)]
    for text in texts:
        _check_caption(text, attrs)
    # Templates: the words before the noun phrase ("two" / "a pair of") vary widely.
    openings = {re.split(r"\b(two|a pair of)\b", t)[0] for t in texts}
    assert len(openings) >= 15
    assert any("large" in t or "big" in t or "huge" in t for t in texts)
    assert any("stripe" in t for t in texts) and any("top" in t or "upper" in t for t in texts)
    single = {**attrs, "count": 1}
    singles = [caption(rng, single) for _ in range(300)]
    assert any(re.search(r"\ban orange\b", t) for t in singles)  # article follows the next word
    assert not any(re.search(r"\ba (orange|ring)\b", t) for t in singles)


_COLOUR_WORDS = set(COLOURS) | {"colour", "coloured", "color", "colored"}


def test_no_colour_captions_drop_only_the_colour(tmp_path, written):
    out, summary = written
    plain = write_demo(tmp_path / "nc", seed=0, captions="no-colour", **SMALL)
    assert summary["captions"] == "all" and plain["captions"] == "no-colour"
    assert json.loads((tmp_path / "nc" / "demo.json").read_text())["captions"] == "no-colour"
    for split in ("train", "eval"):
        with_colour = _split_samples(out / split)
        without = _split_samples(tmp_path / "nc" / split)
        assert len(without) == len(with_colour) == SMALL[f"{split}_samples"]
        for a, b in zip(with_colour, without, strict=True):
            attrs = json.loads(b["json"])
            text = b["txt"].decode("utf-8")
            words = set(re.findall(r"[a-z]+", text.lower()))
            assert not words & _COLOUR_WORDS, text
            shape_word = attrs["shape"] if attrs["count"] == 1 else PLURALS[attrs["shape"]]
            assert shape_word in words and words & _COUNT_WORDS[attrs["count"]], text
            # the same scene and pixels; the attributes still record the colour
            assert b["jpg"] == a["jpg"]
            assert {**attrs, "caption": ""} == {**json.loads(a["json"]), "caption": ""}
            assert attrs["colour"] in COLOURS
    # the zero-shot and probe sets do not depend on the captions
    zeroshot = {k: v for k, v in _tree_bytes(out).items() if k.startswith("zeroshot/")}
    assert zeroshot == {
        k: v for k, v in _tree_bytes(tmp_path / "nc").items() if k.startswith("zeroshot/")
    }


def test_no_colour_caption_names_the_rest():
    rng = np.random.default_rng(1)
    attrs = {"shape": "ring", "colour": "orange", "count": 1, "size": "small",
             "position": "left", "background": "gradient"}  # fmt: skip
    texts = [caption(rng, attrs, name_colour=False) for _ in range(300)]
    words = set().union(*(re.findall(r"[a-z]+", t.lower()) for t in texts))
    assert not words & _COLOUR_WORDS
    assert {"ring", "left", "small", "gradient", "fade"} <= words
    assert not any(re.search(r"\ba [aeiou]", t) for t in texts)  # the article still agrees
    with pytest.raises(ValueError, match="captions must be one of all, no-colour"):
        write_demo("unused", captions="grey", **SMALL)


def test_sizes_json_counts_the_real_samples(written):
    out, summary = written
    for split, total, per_shard in (("train", 60, [25, 25, 10]), ("eval", 20, [20])):
        sizes = json.loads((out / split / "sizes.json").read_text())
        tars = sorted(p.name for p in (out / split).glob("*.tar"))
        assert sorted(sizes) == tars == [f"shard-{i:06d}.tar" for i in range(len(per_shard))]
        assert [sizes[t] for t in tars] == per_shard
        assert [len(_tar_samples(out / split / t)) for t in tars] == per_shard
        assert summary[split]["samples"] == total
        keys = [k for t in tars for k in _tar_samples(out / split / t)]
        assert keys == [f"{i:09d}" for i in range(total)]


def test_images_decode_with_the_requested_size(written):
    out, _ = written
    for sample in _split_samples(out / "train")[:10] + _split_samples(out / "eval")[:5]:
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"


@pytest.mark.parametrize("task, classes", [("shape", SHAPES), ("colour", tuple(COLOURS))])
def test_zeroshot_layout_is_clip_benchmark_wds(written, task, classes):
    root = written[0] / "zeroshot" / task
    assert (root / "classnames.txt").read_text().splitlines() == list(classes)
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 5 and all("{c}" in t for t in templates)
    held = set(held_out_combos(0))
    for split, total in (("train", 24), ("test", 20)):
        nshards = int((root / split / "nshards.txt").read_text())
        assert sorted(p.name for p in (root / split).glob("*.tar")) == [
            f"{i}.tar" for i in range(nshards)
        ]
        urls = str(root / split / f"{{0..{nshards - 1}}}.tar")
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
        assert len(samples) == total
        labels = Counter()
        for s in samples:
            assert set(s) >= {"png", "cls"} and isinstance(s["cls"], int)
            assert 0 <= s["cls"] < len(classes) and s["png"].size == (32, 32)
            attrs = s["json"]
            assert attrs["shape" if task == "shape" else "colour"] == classes[s["cls"]]
            if split == "test":  # held-out pairs only; the probe's train split draws from all
                assert (attrs["shape"], attrs["colour"]) in held
            labels[s["cls"]] += 1
        # Class balance: counts differ by at most one.
        expected = [total // len(classes) + (i < total % len(classes)) for i in range(len(classes))]
        assert sorted(labels.values(), reverse=True) == expected


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")
def test_clip_benchmark_builder_reads_the_zeroshot_sets(written, monkeypatch):
    # builder.py imports `requests` (for downloads we never do); stub it only if it is missing.
    try:
        import requests  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "requests", types.ModuleType("requests"))
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    root = written[0] / "zeroshot" / "colour"
    dataset = builder.build_dataset("wds/demo_colour", root=str(root), split="test", transform=None)
    assert dataset.classes == list(COLOURS)
    assert dataset.templates[0] == demo.ZEROSHOT_TEMPLATES["colour"][0]
    pairs = list(dataset)
    assert len(pairs) == 20
    assert all(img.size == (32, 32) and 0 <= label < 8 for img, label in pairs)


def test_no_tmp_leftovers_and_rewrite_replaces(written, tmp_path):
    out, _ = written
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    target = tmp_path / "out"
    write_demo(target, seed=3, **{**SMALL, "train_samples": 30})
    write_demo(target, seed=3, **SMALL)
    assert json.loads((target / "train" / "sizes.json").read_text()) == {
        "shard-000000.tar": 25, "shard-000001.tar": 25, "shard-000002.tar": 10,
    }  # fmt: skip
    names = sorted(p.name for p in target.iterdir())
    assert names == [".clipkit-output", "demo.json", "eval", "train", "zeroshot"]


def test_failure_leaves_previous_output_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_demo(out, seed=0, **SMALL)
    before = _tree_bytes(out)
    calls = {"n": 0}

    def broken_caption(rng, attrs, **options):
        calls["n"] += 1
        if calls["n"] > 40:  # fail inside the second train shard
            raise RuntimeError("boom")
        return caption(rng, attrs, **options)

    monkeypatch.setattr(demo, "caption", broken_caption)
    with pytest.raises(RuntimeError, match="boom"):
        write_demo(out, seed=1, **SMALL)
    assert _tree_bytes(out) == before
    names = sorted(p.name for p in out.iterdir())
    assert names == [".clipkit-output", "demo.json", "eval", "train", "zeroshot"]


@pytest.mark.parametrize("bad", [{"train_samples": 0}, {"shard_size": 0}, {"image_size": 8}])
def test_bad_arguments_raise(tmp_path, bad):
    with pytest.raises(ValueError):
        write_demo(tmp_path, **{**SMALL, **bad})


def _object_mask(image: Image.Image, colour: str) -> np.ndarray:
    """(H, W) pixels nearer the object colour than the (plain) background, i.e. coverage > ~0.5."""
    pixels = np.asarray(image, np.float32)
    values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    background = values[counts.argmax()]
    to_object = np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=-1)
    return to_object < np.linalg.norm(pixels - background, axis=-1)


@pytest.mark.parametrize("shape", SHAPES)
def test_draw_scene_matches_count_position_size_and_colour(shape):
    rng = np.random.default_rng(1)
    for colour in ("red", "white", "black"):
        for count in (1, 2, 3):
            for position in demo.POSITIONS:
                areas = {}
                for size in ("small", "large"):
                    attrs = {"shape": shape, "colour": colour, "count": count, "size": size,
                             "position": position, "background": "plain"}  # fmt: skip
                    mask = _object_mask(draw_scene(rng, attrs, 64), colour)
                    assert ndimage.label(mask, np.ones((3, 3)))[1] == count, attrs
                    ys, xs = np.nonzero(mask)
                    cx, cy = xs.mean() / 64, ys.mean() / 64
                    expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4,
                                "bottom": cy > 0.6,
                                "center": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1}  # fmt: skip
                    assert expected[position], (attrs, cx, cy)
                    areas[size] = mask.sum() / count
                assert areas["large"] > 1.3 * areas["small"], (shape, count, position, areas)


def _describe(mask: np.ndarray) -> tuple[float, float, float]:
    """(hole fraction, convexity, fill of the circumscribed circle) of one object's mask."""
    filled = ndimage.binary_fill_holes(mask)
    ys, xs = np.nonzero(filled)
    points = np.stack([xs, ys], 1).astype(np.float64)
    hull = ConvexHull(points)
    hull_pixels = hull.volume + hull.area / 2 + 1  # hull of pixel centres -> pixel count (Pick)
    radius = np.linalg.norm(points - points.mean(0), axis=1).max() + 0.5
    area = filled.sum()
    return (area - mask.sum()) / area, area / hull_pixels, area / (np.pi * radius**2)


# Ideal values, loosened for 64 px pixelation: fill (area / circumscribed disc) circle 1, square
# 2/pi = 0.64, triangle 3 sqrt(3) / (4 pi) = 0.41; convexity (area / hull) star with inner radius
# 0.45 r 0.56, cross 0.71; ring hole (0.5 / 0.9)^2 = 0.31.
_SHAPE_CHECKS = {
    "circle": lambda hole, convex, fill: hole == 0 and convex > 0.9 and fill > 0.8,
    "square": lambda hole, convex, fill: hole == 0 and convex > 0.85 and 0.55 < fill < 0.72,
    "triangle": lambda hole, convex, fill: hole == 0 and convex > 0.85 and fill < 0.52,
    "star": lambda hole, convex, fill: hole == 0 and convex < 0.67,
    "cross": lambda hole, convex, fill: hole == 0 and 0.67 < convex < 0.82 and fill > 0.55,
    "ring": lambda hole, convex, fill: 0.2 < hole < 0.45 and convex > 0.9,
}


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_is_recognisable_from_its_pixels(shape):
    rng = np.random.default_rng(2)
    for colour in ("red", "white", "black", "blue"):
        for position in ("left", "center", "bottom"):
            attrs = {"shape": shape, "colour": colour, "count": 1, "size": "large",
                     "position": position, "background": "plain"}  # fmt: skip
            stats = _describe(_object_mask(draw_scene(rng, attrs, 64), colour))
            assert _SHAPE_CHECKS[shape](*stats), (attrs, stats)


def test_tar_members_carry_no_time_or_owner(written):
    for tar_path in written[0].rglob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_sample_attrs_respects_allowed_combos():
    rng = np.random.default_rng(0)
    allowed = [("star", "blue"), ("ring", "white")]
    drawn = [sample_attrs(rng, allowed) for _ in range(200)]
    assert {(a["shape"], a["colour"]) for a in drawn} == set(allowed)
    assert {a["count"] for a in drawn} == {1, 2, 3}
    assert {a["position"] for a in drawn} == set(demo.POSITIONS)
    assert {a["background"] for a in drawn} == set(demo.BACKGROUNDS)
