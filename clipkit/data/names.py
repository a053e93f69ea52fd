"""What results call a dataset: CLIP_benchmark's names, never a path (so `clip_benchmark build`
tells runs apart). The data layer names the sets it reads; results only record the name."""

from __future__ import annotations

from pathlib import Path

_BENCHMARK_GROUPS = ("vtab", "tfds")


def _folder_name(root: str | Path) -> str:
    return Path(root).resolve().name or str(root)


def wds_dataset_name(root: str | Path) -> str:
    """CLIP_benchmark's name for a webdataset folder, so `clip_benchmark build` tells runs apart.

    CLIP_benchmark evaluates `--dataset wds/NAME` from a folder `wds_` + NAME with every '/'
    turned into '-' (`wds/vtab/cifar10` -> `wds_vtab-cifar10`, `wds/cifar10` -> `wds_cifar10`)
    and records `"dataset": "wds/NAME"`. This inverts that: the `wds_` prefix is dropped and
    the dash after a group prefix (vtab, tfds) becomes '/' again; other dashes are part of the
    name (`wds_imagenet-a` -> `wds/imagenet-a`). A folder without the prefix keeps its name.
    """
    name = _folder_name(root)
    name = name.removeprefix("wds_")
    group, dash, rest = name.partition("-")
    if dash and rest and group in _BENCHMARK_GROUPS:
        name = f"{group}/{rest}"
    return f"wds/{name}"


def folder_dataset_name(root: str | Path) -> str:
    """The name results give a plain folder of data: the folder's own name, not its path
    (`/data/pets` -> `pets`); CLIP_benchmark-style `wds_*` folders get `wds_dataset_name`."""
    name = _folder_name(root)
    if Path(root).suffix == ".tar":
        return Path(name).stem
    return wds_dataset_name(root) if name.startswith("wds_") else name
