"""What `clipkit data pack` reads: a user's own images and captions, listed as `Record`s.

Four kinds of source, told apart by `detect_kind` (or named with `--kind`):

- `table`: a CSV / TSV / Parquet file with an image-path column and a caption column (names as
  options, as img2dataset's `--url_col` / `--caption_col`); relative paths are resolved against
  the table's folder; every other column rides along into KEY.json.
- `sidecar`: a folder of images, each with its caption in a text file of the same stem
  (`a.jpg` + `a.txt`), subfolders included.
- `classes`: a folder with one subfolder of images per class (`dog/a.jpg`); the caption comes
  from a template (`a photo of a {c}.`), the class name from the folder (`_` read as a space).
- `hf`: a Hugging Face `datasets` dataset saved with `save_to_disk`, with image and text columns.

Listing reads no image: records name where the bytes are (a path, or a row of the dataset), and
`read_image_bytes` fetches them in whichever process packs the record.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from clipkit.config import ConfigError

KINDS = ("table", "sidecar", "classes", "hf")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


@dataclass
class Record:
    """One input pair: `name` says where it came from in reports; `image` is a path or a row."""

    name: str
    image: str | int | None  # an absolute path, a row of an hf dataset, None: none given
    caption: str | bytes | None  # bytes when read from a file (checked for UTF-8 later)
    meta: dict = field(default_factory=dict)  # kept in KEY.json
    label: int | None = None  # class index (classes, or a table's --label-col)


@dataclass
class Listing:
    kind: str
    records: list[Record]
    classnames: list[str] = field(default_factory=list)  # class sources and --label-col tables


def detect_kind(source: Path) -> str:
    """The kind of `source` from what it holds (see the module docstring)."""
    if source.is_file():
        if source.suffix.lower() in TABLE_SUFFIXES:
            return "table"
        raise ConfigError(f"{source}: not a table (expected {', '.join(TABLE_SUFFIXES)})")
    if not source.is_dir():
        raise ConfigError(f"source not found: {source}")
    if any((source / f).is_file() for f in ("state.json", "dataset_dict.json")):
        return "hf"
    images = _images(source)
    if any(p.with_suffix(".txt").is_file() for p in images):
        return "sidecar"
    if any(p.parent != source for p in images):
        return "classes"
    raise ConfigError(
        f"{source}: found no captions beside images (a.jpg + a.txt) and no class folders "
        "(class/a.jpg); pass --kind to say what it is"
    )


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def class_caption(template: str, classname: str) -> str:
    return template.replace("{class}", "{c}").replace("{c}", classname)


def list_sidecar(source: Path) -> Listing:
    records = []
    for path in _images(source):
        text = path.with_suffix(".txt")
        caption = text.read_bytes() if text.is_file() else None
        rel = str(path.relative_to(source))
        records.append(Record(rel, str(path), caption, {"path": rel}))
    return Listing("sidecar", records)


def list_classes(source: Path, template: str) -> Listing:
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    classnames = [p.name.replace("_", " ") for p in folders]
    records = []
    for label, (folder, classname) in enumerate(zip(folders, classnames, strict=True)):
        for path in _images(folder):
            rel = str(path.relative_to(source))
            caption = class_caption(template, classname)
            meta = {"path": rel, "class": classname}
            records.append(Record(rel, str(path), caption, meta, label))
    if not records:
        raise ConfigError(f"{source}: no images in class folders (class/a.jpg)")
    return Listing("classes", records, classnames)


def _read_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("reading Parquet needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # surrogateescape: a caption that is not UTF-8 is skipped and counted, not the whole table
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _need_columns(rows: list[dict], path: Path, columns: dict[str, str | None]) -> None:
    have = list(rows[0]) if rows else []
    for flag, column in columns.items():
        if column is not None and column not in have:
            raise ConfigError(
                f"{path}: no column '{column}' ({flag}); columns: {', '.join(have) or 'none'}"
            )


def _plain(value):
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def list_table(path: Path, image_col: str, caption_col: str, label_col: str | None) -> Listing:
    rows = _read_rows(path)
    if not rows:
        raise ConfigError(f"{path}: the table has no rows")
    need_caption = caption_col if label_col is None or caption_col in rows[0] else None
    _need_columns(
        rows,
        path,
        {"--image-col": image_col, "--caption-col": need_caption, "--label-col": label_col},
    )
    labels = sorted({str(r[label_col]) for r in rows}) if label_col else []
    index = {name: i for i, name in enumerate(labels)}
    records = []
    for i, row in enumerate(rows):
        image = row[image_col]
        full = str((path.parent / str(image)).absolute()) if image not in (None, "") else None
        caption = row.get(caption_col)
        meta = {k: _plain(v) for k, v in row.items() if k not in (image_col, caption_col)}
        label = index[str(row[label_col])] if label_col else None
        name = f"row {i + 1} ({image})" if image else f"row {i + 1}"
        records.append(Record(name, full, None if caption is None else str(caption), meta, label))
    return Listing("table", records, labels)


def open_hf(path: str):
    """A saved `datasets.Dataset` (a DatasetDict gives its `train` split, or its only one)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "reading a saved dataset needs `datasets`: pip install datasets"
        ) from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" not in ds and len(splits) != 1:
            raise ConfigError(f"{path}: a DatasetDict with splits {', '.join(splits)}; save one")
        ds = ds["train" if "train" in ds else splits[0]]
    return ds


def list_hf(path: Path, image_col: str, caption_col: str) -> Listing:
    ds = open_hf(str(path))
    have = list(ds.column_names)
    for flag, column in (("--image-col", image_col), ("--caption-col", caption_col)):
        if column not in have:
            raise ConfigError(f"{path}: no column '{column}' ({flag}); columns: {', '.join(have)}")
    captions = ds[caption_col]
    extra = [c for c in have if c not in (image_col, caption_col)]
    metas = ds.select_columns(extra).to_list() if extra else [{} for _ in captions]
    records = [
        Record(f"row {i}", i, None if c is None else str(c), {k: _plain(v) for k, v in m.items()})
        for i, (c, m) in enumerate(zip(captions, metas, strict=True))
    ]
    return Listing("hf", records)


_HF_OPEN: dict = {}  # per process: (path, column) -> the dataset with undecoded images


def read_image_bytes(record: Record, kind: str, source: str, image_col: str) -> bytes:
    """The encoded image of a record; OSError when it cannot be read."""
    if kind != "hf":
        if record.image is None:
            raise FileNotFoundError("no image path")
        return Path(record.image).read_bytes()
    if (source, image_col) not in _HF_OPEN:
        from datasets import Image

        ds = open_hf(source)
        if isinstance(ds.features[image_col], Image):
            ds = ds.cast_column(image_col, Image(decode=False))
        _HF_OPEN[(source, image_col)] = ds
    value = _HF_OPEN[(source, image_col)][record.image][image_col]
    if isinstance(value, dict):  # an Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):  # a path, relative to the saved dataset
        return (Path(source) / value).read_bytes()
    if not isinstance(value, bytes):
        raise FileNotFoundError(f"no image bytes in column '{image_col}'")
    return value


def list_source(source: str, kind: str | None, opts) -> Listing:
    """Records of `source` (options: image_col, caption_col, label_col, template)."""
    path = Path(source)
    kind = kind or detect_kind(path)
    if not path.exists():
        raise ConfigError(f"source not found: {source}")
    if kind == "table":
        return list_table(path, opts.image_col, opts.caption_col, opts.label_col)
    if kind == "sidecar":
        return list_sidecar(path)
    if kind == "classes":
        return list_classes(path, opts.template)
    return list_hf(path, opts.image_col, opts.caption_col)
