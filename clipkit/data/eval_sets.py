"""Evaluation datasets: labelled image sets for zero-shot / linear probes, captioned sets for
retrieval. Layouts follow what users already have:

- `imagenet`: ImageNet-1k validation as 1000 synset folders (in DIR or DIR/val); classes are the
  sorted synsets (torchvision ImageFolder's order), named by open_clip's `IMAGENET_CLASSNAMES`,
  prompted with the 80 OpenAI templates (`open_clip.zero_shot_metadata`).
- `folder`: an ImageFolder tree (DIR/{split}/CLASS/*.jpg, or DIR/CLASS/*.jpg); class names from
  `classnames.txt` if present, else folder names; templates from a file or a default set.
- `wds`: CLIP_benchmark's WebDataset layout: DIR/{split}/*.tar holding `cls` + `webp|png|jpg`,
  DIR/classnames.txt, DIR/zeroshot_classification_templates.txt.
- `demo`: the built-in demo (`clipkit data demo`): DIR/zeroshot/{task} in the `wds` layout.

Captioned sets for retrieval live in `clipkit.data.eval_pairs`. Images that cannot be decoded
(and `cls` labels that are not integers) are skipped and counted (the loaders' collate drops
them and reports their names), never silently: callers surface the count and the first names,
and stop past a set fraction. A tar shard that cannot be read to its end stops the evaluation
with `DataReadError`. Class-name and template files are UTF-8, non-empty, and templates have no
field but `{c}`. Results name the sets as CLIP_benchmark does (`clipkit.eval.results`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.data

from clipkit.data.eval_io import DatasetLayoutError, TarShards, image_member, open_image
from clipkit.data.names import folder_dataset_name, wds_dataset_name

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DATASETS = ("imagenet", "folder", "wds", "demo")
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a bad photo of a {c}.",
    "a photo of the {c}.",
    "a close-up photo of a {c}.",
    "a bright photo of a {c}.",
    "a cropped photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a large {c}.",
    "an image of a {c}.",
    "a drawing of a {c}.",
)
_SYNSET = re.compile(r"^n\d{8}$")


@dataclass
class ClassificationSet:
    """A labelled split: `dataset` yields (image tensor | None, label, name) via the loader."""

    name: str
    root: str
    split: str
    dataset: object  # torch Dataset (map-style FolderImages or iterable TarImages)
    classnames: list[str]
    templates: list[str]
    num_samples: int | None
    fingerprint: list = field(default_factory=list)  # file names + sizes + mtimes, for caching


class FolderImages(torch.utils.data.Dataset):
    """Map-style dataset over (path, label) pairs; item = (image | None, label, path)."""

    def __init__(self, items: list[tuple[str, int]], transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return open_image(path, self.transform), label, path


class TarImages(TarShards):
    """Iterable dataset over CLIP_benchmark-style tars; item = (image | None, label, key)."""

    def item(self, shard: str, key: str, fields: dict[str, bytes]):
        if "cls" not in fields:
            return None
        name = f"{Path(shard).name}/{key}"
        label = _label(fields["cls"])
        if label is None:  # skipped and counted like an unreadable image
            return None, -1, f"{name} (its cls is not an integer)"
        image = image_member(fields)
        decoded = open_image(image, self.transform) if image is not None else None
        return decoded, label, name


def _label(cls: bytes) -> int | None:
    """A `cls` member's class index (ASCII digits), None when it holds anything else."""
    text = cls.decode("ascii", errors="replace").strip()
    return int(text) if text.isdecimal() and text.isascii() else None


def collate_labelled(samples: list) -> dict:
    """Stack the decodable samples; keep the names of those that were not."""
    good = [s for s in samples if s[0] is not None]
    return {
        "image": torch.stack([s[0] for s in good]) if good else None,
        "label": torch.tensor([s[1] for s in good], dtype=torch.long),
        "name": [s[2] for s in good],
        "bad": [s[2] for s in samples if s[0] is None],
    }


def fingerprint_files(paths: list[Path]) -> list:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p), st.st_size, int(st.st_mtime)])
    return out


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file of `what` (e.g. "class names"); at least one."""
    if not path.is_file():
        raise DatasetLayoutError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetLayoutError(
            f"{what} file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetLayoutError(f"{what} file {path} is empty; put one entry per line")
    return lines


def _normalise_templates(templates) -> list[str]:
    """Format strings with `{c}`; open_clip's callables are turned into format strings."""
    return [t("{c}") if callable(t) else str(t) for t in templates]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_items(root: Path, dirs: list[Path]) -> list[tuple[str, int]]:
    items = []
    for label, d in enumerate(dirs):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        items += [(str(p), label) for p in files]
    if not items:
        raise DatasetLayoutError(
            f"{root}: no images ({', '.join(IMAGE_EXTS)}) in its class folders; expected "
            "ROOT/CLASS_NAME/IMAGE files"
        )
    return items


def _imagenet(root: Path, split: str, transform) -> ClassificationSet:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    base = None
    for candidate in (root / split, root / "val", root):
        if (
            candidate.is_dir()
            and sum(_SYNSET.match(p.name) is not None for p in _class_dirs(candidate)) == 1000
        ):
            base = candidate
            break
    if base is None:
        raise DatasetLayoutError(
            f"{root}: expected ImageNet-1k validation as 1000 synset folders (n01440764 ...) in "
            f"{root} or {root / 'val'}"
        )
    dirs = [p for p in _class_dirs(base) if _SYNSET.match(p.name)]
    items = _folder_items(base, dirs)
    return ClassificationSet(
        "imagenet1k",  # CLIP_benchmark's name
        str(base),
        split,
        FolderImages(items, transform),
        list(IMAGENET_CLASSNAMES),
        _normalise_templates(OPENAI_IMAGENET_TEMPLATES),
        len(items),
        fingerprint_files([base]) + [len(items)],
    )


def _folder(root: Path, split: str, transform, templates_file, classnames_file, strict_split):
    base = root / split
    if not base.is_dir():
        if strict_split:
            raise DatasetLayoutError(
                f"{root}: no '{split}' folder; expected {root}/{split}/CLASS_NAME/IMAGE files"
            )
        base = root
    dirs = _class_dirs(base)
    if not dirs:
        raise DatasetLayoutError(
            f"{base}: no class folders; expected {base}/CLASS_NAME/IMAGE files (ImageFolder)"
        )
    items = _folder_items(base, dirs)
    names_file = Path(classnames_file) if classnames_file else root / "classnames.txt"
    if classnames_file or names_file.is_file():
        classnames = read_lines(names_file, "class names")
        if len(classnames) != len(dirs):
            raise DatasetLayoutError(
                f"{names_file} has {len(classnames)} names but {base} has {len(dirs)} class folders"
            )
    else:
        classnames = [d.name.replace("_", " ") for d in dirs]
    templates = _templates(root, templates_file, DEFAULT_TEMPLATES)
    fp = fingerprint_files([Path(p) for p, _ in items[:: max(1, len(items) // 64)]]) + [len(items)]
    return ClassificationSet(
        folder_dataset_name(root),
        str(base),
        split,
        FolderImages(items, transform),
        classnames,
        templates,
        len(items),
        fp,
    )


def _templates(root: Path, templates_file, default) -> list[str]:
    if templates_file:
        templates = read_lines(Path(templates_file), "templates")
    elif (root / "zeroshot_classification_templates.txt").is_file():
        templates = read_lines(root / "zeroshot_classification_templates.txt", "templates")
    else:
        templates = list(default)
    for template in templates:
        check_template(template)
    return templates


def check_template(template: str) -> None:
    """A prompt template formats with the class name alone: its one kind of field is `{c}`
    (literal braces are doubled). Anything else would fail, or leak, at `str.format` time."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DatasetLayoutError(
            f"template {template!r} is not a format string ({e}); write literal braces as {{{{ }}}}"
        ) from None
    other = [f for f in fields if f != "c"]
    if other:
        raise DatasetLayoutError(
            f"template {template!r} has the field {{{other[0]}}}; the only field is {{c}}, the "
            "class name"
        )
    if not fields:
        raise DatasetLayoutError(f"template {template!r} has no '{{c}}' placeholder for the class")


def _wds(root: Path, split: str, transform, templates_file, classnames_file, name=None):
    shards = sorted((root / split).glob("*.tar")) if (root / split).is_dir() else []
    names_file = Path(classnames_file) if classnames_file else root / "classnames.txt"
    if not shards or not (classnames_file or names_file.is_file()):
        names = "" if classnames_file else f" and {names_file}"
        raise DatasetLayoutError(
            f"{root}: expected CLIP_benchmark's WebDataset layout: {root}/{split}/*.tar (cls + "
            f"webp|png|jpg members){names}"
        )
    classnames = read_lines(names_file, "class names")  # a missing --classnames file named as is
    templates = _templates(root, templates_file, DEFAULT_TEMPLATES)
    return ClassificationSet(
        name or wds_dataset_name(root),
        str(root),
        split,
        TarImages([str(s) for s in shards], transform),
        classnames,
        templates,
        None,
        fingerprint_files(shards),
    )


def classification_set(
    name: str,
    root: str | Path,
    split: str,
    transform: Callable,
    *,
    task: str = "shape",
    templates_file: str | None = None,
    classnames_file: str | None = None,
    strict_split: bool = False,
) -> ClassificationSet:
    """Open one split of a labelled dataset (see the module docstring for the layouts).

    `strict_split` (linear probes) requires DIR/{split} for `folder` instead of falling back to
    DIR itself.
    """
    root = Path(root)
    if name not in DATASETS:
        raise DatasetLayoutError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    if not root.is_dir():
        raise DatasetLayoutError(f"data root not found: {root}")
    if name == "imagenet":
        return _imagenet(root, split, transform)
    if name == "folder":
        return _folder(root, split, transform, templates_file, classnames_file, strict_split)
    if name == "wds":
        return _wds(root, split, transform, templates_file, classnames_file)
    tasks = sorted(p.name for p in (root / "zeroshot").glob("*") if p.is_dir())
    if task not in tasks:
        raise DatasetLayoutError(
            f"{root}: expected a demo root (`clipkit data demo --out DIR`) with "
            f"zeroshot/{task}/; found tasks: {', '.join(tasks) or 'none'}"
        )
    return _wds(
        root / "zeroshot" / task,
        split,
        transform,
        templates_file,
        classnames_file,
        name=f"demo-{task}",
    )
