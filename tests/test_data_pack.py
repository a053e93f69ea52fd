"""`clipkit data pack` (issue 18): each source kind round trips and trains; bad inputs are
counted; shards are whole, resumable and the same bytes twice; the eval layout evaluates."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from clipkit.data import pack as pack_module
from clipkit.data.pack import PackOptions, pack
from clipkit.data.tarscan import shard_samples
from clipkit.fileio import OutputError
from tests.cli_util import invoke, user_error

CLASSES = ("red", "green", "blue")
RGB = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _image(i: int, cls: str) -> Image.Image:
    """A distinct image per i (noise over the class colour), of varying aspect ratio."""
    rng = np.random.default_rng(i)
    w, h = 40 + 4 * (i % 5), 30 + 3 * (i % 4)
    base = np.array(RGB[cls], dtype=np.int16)
    pixels = base + rng.integers(-25, 25, (h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _inputs(n: int = 12) -> list[tuple[str, str, Image.Image]]:
    return [
        (f"img{i:02d}", f"a {CLASSES[i % 3]} picture number {i}", _image(i, CLASSES[i % 3]))
        for i in range(n)
    ]


def _write_table(folder, n=12, sep=","):
    (folder / "images").mkdir(parents=True)
    rows = []
    for stem, caption, image in _inputs(n):
        image.save(folder / "images" / f"{stem}.png")
        rows.append({"file": f"images/{stem}.png", "text": caption, "label": caption.split()[1]})
    table = folder / ("pairs.tsv" if sep == "\t" else "pairs.csv")
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "text", "label"], delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)
    return table


def _write_sidecar(folder):
    folder.mkdir()
    for stem, caption, image in _inputs():
        image.save(folder / f"{stem}.jpg", quality=98)
        (folder / f"{stem}.txt").write_text(caption + "\n")
    return folder


def _write_classes(folder):
    for i, (stem, _, image) in enumerate(_inputs()):
        (folder / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        image.save(folder / CLASSES[i % 3] / f"{stem}.png")
    return folder


def _write_hf(folder):
    datasets = pytest.importorskip("datasets")
    items = _inputs()
    ds = datasets.Dataset.from_dict(
        {
            "image": [image for _, _, image in items],
            "text": [caption for _, caption, _ in items],
            "idx": list(range(len(items))),
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "text": datasets.Value("string"),
                "idx": datasets.Value("int64"),
            }
        ),
    )
    ds.save_to_disk(str(folder))
    return folder


def _read_back(folder) -> dict[str, dict]:
    samples = {}
    for shard in sorted(folder.glob("*.tar")):
        for s in shard_samples(str(shard), lambda e: False):
            meta = json.loads(s["json"])
            samples[meta["source"]] = {**s, "meta": meta}
    return samples


def _expected_pixels(image: Image.Image, size: int, source_jpeg: bool) -> np.ndarray:
    """The reference: the input as the pack reads it, shorter side to `size` (bicubic), through
    JPEG at quality 95, written here with PIL alone."""
    if source_jpeg:  # the sidecar inputs were saved as JPEGs: what the pack reads
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=98)
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.int16)


SOURCES = {
    "table": lambda tmp: (_write_table(tmp / "t"), {"image_col": "file", "caption_col": "text"}),
    "sidecar": lambda tmp: (_write_sidecar(tmp / "s"), {}),
    "classes": lambda tmp: (_write_classes(tmp / "c"), {"template": "a photo of a {c}."}),
    "hf": lambda tmp: (_write_hf(tmp / "h"), {"caption_col": "text"}),
}


def _source_name(kind: str, i: int, stem: str) -> str:
    return {
        "table": f"row {i + 1} (images/{stem}.png)",
        "sidecar": f"{stem}.jpg",
        "classes": f"{CLASSES[i % 3]}/{stem}.png",
        "hf": f"row {i}",
    }[kind]


@pytest.mark.parametrize("kind", list(SOURCES))
def test_round_trip_and_train(kind, tmp_path):
    source, cols = SOURCES[kind](tmp_path)
    out = tmp_path / "out"
    report = pack(PackOptions(str(source), str(out), image_size=24, shard_size=5, **cols))
    assert report["kind"] == kind and report["samples"] == report["inputs"] == 12
    assert json.loads((out / "sizes.json").read_text()) == {
        "00000.tar": 5, "00001.tar": 5, "00002.tar": 2
    }  # fmt: skip
    back = _read_back(out)
    for i, (stem, caption, image) in enumerate(_inputs()):
        got = back[_source_name(kind, i, stem)]
        want = f"a photo of a {CLASSES[i % 3]}." if kind == "classes" else caption
        assert got["txt"].decode() == got["meta"]["caption"] == want
        pixels = np.asarray(Image.open(io.BytesIO(got["jpg"])), np.int16)
        expected = _expected_pixels(image, 24, source_jpeg=kind == "sidecar")
        assert pixels.shape == expected.shape and min(pixels.shape[:2]) == 24
        assert np.abs(pixels - expected).max() <= 1
    if kind == "table":
        assert back[_source_name(kind, 0, "img00")]["meta"]["label"] == "red"
    res = invoke(
        "pretrain", "--data", out, "--out", tmp_path / "run", "--model", "test",
        "--batch-size", 4, "--workers", 1, "--threads", 1, "--steps", 2,
    )  # fmt: skip
    assert res.exit_code == 0, res.output


def test_tsv_and_parquet_tables(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    tsv = _write_table(tmp_path / "t", n=6, sep="\t")
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    parquet = tsv.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for table, out in ((tsv, "a"), (parquet, "b")):
        opts = PackOptions(str(table), str(tmp_path / out), image_col="file", caption_col="text")
        assert pack(opts)["samples"] == 6
    a, b = (tmp_path / "a" / "00000.tar").read_bytes(), (tmp_path / "b" / "00000.tar").read_bytes()
    assert a == b  # same rows, same bytes, whatever the table format


def test_bad_inputs_are_skipped_counted_and_named(tmp_path):
    table = _write_table(tmp_path / "t", n=6)
    images = tmp_path / "t" / "images"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (400, 300)).save(images / "huge.png")
    (images / "dupe.png").write_bytes((images / "img00.png").read_bytes())
    lines = table.read_bytes() + b"".join(
        [
            b"images/missing.png,a missing file,x\n",
            b"images/broken.png,a broken file,x\n",
            b"images/huge.png,too many pixels,x\n",
            b"images/img01.png,   ,x\n",  # blank caption
            b"images/img02.png,caf\xe9 latin-1,x\n",  # not UTF-8
            b"images/dupe.png,a red picture number 0,x\n",  # same bytes and caption as row 1
        ]
    )
    table.write_bytes(lines)
    opts = PackOptions(str(table), str(tmp_path / "out"), image_col="file", caption_col="text")
    opts.max_pixels, opts.shard_size = 100_000, 4
    report = pack(opts)
    assert report["samples"] == 6 and report["inputs"] == 12
    assert report["skipped"] == {
        "caption_not_utf8": 1, "empty_caption": 1, "missing_image": 1,
        "too_many_pixels": 1, "undecodable_image": 1,
    }  # fmt: skip
    assert report["skipped_names"]["missing_image"] == ["row 7 (images/missing.png)"]
    assert report["duplicates"] == 1
    assert report["duplicate_names"] == [
        "row 12 (images/dupe.png) (same as row 1 (images/img00.png))"
    ]
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == 6 == len(_read_back(tmp_path / "out"))


def _tars(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_interrupted_pack_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    source = _write_sidecar(tmp_path / "s")
    whole = tmp_path / "whole"
    pack(PackOptions(str(source), str(whole), image_size=16, shard_size=3))
    out = tmp_path / "out"
    real, calls = pack_module.write_shard, []

    def interrupted(path, *args):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(pack_module, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(PackOptions(str(source), str(out), image_size=16, shard_size=3))
    monkeypatch.setattr(pack_module, "write_shard", real)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no half shard left
    kept = {n: (out / n).stat().st_mtime_ns for n in ("00000.tar", "00001.tar")}
    (out / "00002.tar").write_bytes(b"half a shard from a crash")  # no stats: rewritten
    report = pack(PackOptions(str(source), str(out), image_size=16, shard_size=3))
    assert report["resumed_shards"] == 2 and report["samples"] == 12
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert _tars(out) == _tars(whole)


def test_same_bytes_twice_whatever_the_processes(tmp_path):
    source = _write_classes(tmp_path / "c")
    a, b = tmp_path / "a", tmp_path / "b"
    pack(PackOptions(str(source), str(a), image_size=16, shard_size=5, seed=3))
    pack(PackOptions(str(source), str(b), image_size=16, shard_size=5, seed=3, processes=2))
    assert _tars(a) == _tars(b) and len(_tars(a)) == 3
    assert (a / "sizes.json").read_bytes() == (b / "sizes.json").read_bytes()
    other = tmp_path / "other"
    pack(PackOptions(str(source), str(other), image_size=16, shard_size=5, seed=4))
    assert _tars(other) != _tars(a)  # the seed shuffles


def test_eval_layout_is_read_by_zero_shot(tmp_path, tiny_checkpoint):
    from clipkit.data.eval_sets import classification_set

    source = _write_classes(tmp_path / "c")
    out = tmp_path / "zs"
    report = pack(PackOptions(str(source), str(out), image_size=32, eval_layout=True))
    assert report["samples"] == 12
    assert (out / "classnames.txt").read_text().split("\n")[:3] == sorted(CLASSES)
    assert (out / "test" / "nshards.txt").read_text() == "1\n"
    data = classification_set("wds", out, "test", lambda im: np.asarray(im))
    items = list(data.dataset)
    assert all(image is not None and min(image.shape[:2]) == 32 for image, _, _ in items)
    labels = sorted(label for _, label, _ in items)
    assert labels == sorted(sorted(CLASSES).index(CLASSES[i % 3]) for i in range(12))
    assert data.classnames == sorted(CLASSES)
    res = invoke(
        "zero-shot", "wds", "--data-root", out, "--checkpoint", tiny_checkpoint,
        "--workers", 0, "-o", tmp_path / "r.json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert 0.0 <= result["metrics"]["acc1"] <= 1.0


def test_user_errors(tmp_path):
    table = _write_table(tmp_path / "t", n=3)
    out = tmp_path / "out"
    assert "no column 'url'" in user_error(
        "data", "pack", table, "--out", out, "--image-col", "url"
    )
    assert "source not found" in user_error("data", "pack", tmp_path / "nope", "--out", out)
    args = ["data", "pack", table, "--image-col", "file", "--caption-col", "text"]
    needs = user_error(*args, "--out", out, "--eval-layout")
    assert "--eval-layout needs class labels" in needs
    assert not out.exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    assert "clipkit did not write" in user_error(*args, "--out", theirs)
    assert invoke(*args, "--out", out).exit_code == 0
    assert "other inputs or settings" in user_error(*args, "--out", out, "--seed", 1)
    assert invoke(*args, "--out", out, "--seed", 1, "--overwrite").exit_code == 0


def test_eval_layout_from_a_table_with_label_column(tmp_path):
    table = _write_table(tmp_path / "t", n=9)
    out = tmp_path / "zs"
    opts = PackOptions(str(table), str(out), image_col="file", label_col="label", eval_layout=True)
    opts.split, opts.template = "train", "a {c} photo."
    assert pack(opts)["samples"] == 9
    assert (out / "classnames.txt").read_text() == "blue\ngreen\nred\n"
    assert (out / "zeroshot_classification_templates.txt").read_text() == "a {c} photo.\n"
    for sample in shard_samples(str(out / "train" / "0.tar"), lambda e: False):
        meta = json.loads(sample["json"])
        assert sorted(CLASSES)[int(sample["cls"])] == meta["label"]
        assert Image.open(io.BytesIO(sample["png"])).format == "PNG"


@pytest.mark.parametrize(
    "mode, size, expected",
    [("keep_ratio", 20, (40, 20)), ("center_crop", 20, (20, 20)), ("border", 20, (20, 20)),
     ("no", 20, (60, 30))],
)  # fmt: skip
def test_resize_modes(mode, size, expected):
    from clipkit.data.pack_write import resize

    image = Image.new("RGB", (60, 30), (255, 0, 0))
    out = resize(image, mode, size)
    assert out.size == expected
    if mode == "border":  # the 20x10 picture sits in the middle of a black square
        pixels = np.asarray(out)
        assert (pixels[:5] == 0).all() and (pixels[15:] == 0).all()
        assert (pixels[5:15, :, 0] > 200).all()
    if mode == "center_crop":
        assert (np.asarray(out)[..., 0] > 200).all()


def test_hf_source_same_bytes_with_two_processes(tmp_path):
    source = _write_hf(tmp_path / "h")
    a, b = tmp_path / "a", tmp_path / "b"
    pack(PackOptions(str(source), str(a), caption_col="text", image_size=16, shard_size=5))
    opts = PackOptions(str(source), str(b), caption_col="text", image_size=16, shard_size=5)
    opts.processes = 2
    assert pack(opts)["samples"] == 12
    assert _tars(a) == _tars(b) and len(_tars(a)) == 3
    meta = json.loads(next(iter(_read_back(a).values()))["json"])
    assert "idx" in meta  # the extra column rides along


def test_eval_layout_train_and_test_splits_share_one_folder(tmp_path):
    train, test = _write_classes(tmp_path / "train"), _write_classes(tmp_path / "test")
    (test / "red" / "img00.png").unlink()  # the two sources differ
    out = tmp_path / "zs"

    def opts(source, split, **more):
        return PackOptions(str(source), str(out), image_size=16, eval_layout=True, split=split,
                           **more)  # fmt: skip

    assert pack(opts(train, "train"))["samples"] == 12
    assert pack(opts(test, "test"))["samples"] == 11
    before = _tars(out / "train")
    with pytest.raises(OutputError, match="other inputs or settings"):
        pack(opts(test, "test", seed=1))
    assert pack(opts(test, "test", seed=1, overwrite=True))["samples"] == 11
    assert _tars(out / "train") == before and (out / "train" / "nshards.txt").is_file()
    (tmp_path / "other" / "cat").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "other" / "cat" / "a.png")
    with pytest.raises(OutputError, match="splits with other class names"):
        pack(opts(tmp_path / "other", "val"))
