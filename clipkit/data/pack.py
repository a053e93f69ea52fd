"""`clipkit data pack`: a user's own images and captions -> sized, shuffled WebDataset shards.

Output (img2dataset's layout, what `clipkit pretrain --data OUT` reads):

    OUT/00000.tar ...        KEY.jpg + KEY.txt + KEY.json (source, extra columns, sizes)
    OUT/00000_stats.json ... per shard: count, successes, failures by reason (and their names)
    OUT/sizes.json           samples per shard
    OUT/pack_report.json     what `format_report` prints

With `eval_layout`, CLIP_benchmark's classification layout instead (what `clipkit zero-shot wds`
and `clipkit probe wds` read): OUT/{split}/0.tar ... (KEY.png + KEY.cls + KEY.json),
OUT/{split}/nshards.txt, OUT/classnames.txt, OUT/zeroshot_classification_templates.txt.

How: (1) list the source (`pack_sources`); (2) read every record once, in parallel, to drop the
unusable (missing image, bad caption) and exact duplicates (same image bytes, caption and label;
the first in listing order is kept); (3) shuffle the rest by `seed` and cut it into shards of
`shard_size`; (4) encode the records in parallel (`pack_write`) and write each shard, atomically,
as soon as its records are done, then its stats.

The plan (settings + the ordered record hashes of every shard) has a digest that every stats
file carries. A pack run again on the same inputs finds the shards whose stats carry the same
plan and keeps them: an interrupted pack resumes, and the rest is rewritten. The same inputs and
settings give the same bytes whatever `processes` is.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from clipkit.config import ConfigError
from clipkit.data.pack_sources import KINDS, Record, list_source
from clipkit.data.pack_workers import worker_map
from clipkit.data.pack_write import (
    RESIZE_MODES,
    ShardSettings,
    encode_record,
    fingerprint,
    stats_path,
    write_shard,
)
from clipkit.fileio import (
    OutputError,
    atomic_write_bytes,
    guard_output_dir,
    output_kind,
    write_marker,
    writing,
)

PACK_KIND = "pack"  # the marker kind of folders `clipkit data pack` wrote (clipkit.fileio)
PLAN_NAME = ".clipkit-pack.json"
_NAMES_SHOWN = 10  # skipped / duplicate inputs named per reason in the report

Progress = Callable[[str, int, int], None]  # (phase, items just done, phase total)


@dataclass
class PackOptions:
    source: str
    out: str
    kind: str | None = None  # table | sidecar | classes | hf; None: detected
    image_col: str = "image"
    caption_col: str = "caption"
    label_col: str | None = None  # a table's class column (eval layout)
    template: str = "a photo of a {c}."  # class captions, and the eval layout's template
    resize_mode: str = "keep_ratio"
    image_size: int = 256
    quality: int = 95
    shard_size: int = 10_000
    processes: int = 1
    seed: int = 0
    max_pixels: int = 89_478_485
    eval_layout: bool = False
    split: str = "test"  # the eval layout's split folder
    overwrite: bool = False


def validate(o: PackOptions) -> None:
    checks = [
        (bool(o.source.strip()), "SOURCE is empty: give a table, a folder or a saved dataset"),
        (o.kind is None or o.kind in KINDS, f"--kind must be one of {', '.join(KINDS)}"),
        (o.resize_mode in RESIZE_MODES, f"--resize-mode must be one of {', '.join(RESIZE_MODES)}"),
        (o.image_size >= 8, "--image-size must be >= 8"),
        (1 <= o.quality <= 100, "--quality must be in 1..100"),
        (o.shard_size >= 1, "--shard-size must be >= 1"),
        (o.processes >= 1, "--processes must be >= 1"),
        ("{c}" in o.template or "{class}" in o.template, "--template needs a {c} placeholder"),
        (bool(o.split) and "/" not in o.split, "--split must be a plain folder name"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _settings(o: PackOptions, kind: str) -> ShardSettings:
    return ShardSettings(
        kind=kind,
        source=str(Path(o.source).absolute()),
        image_col=o.image_col,
        resize_mode=o.resize_mode,
        image_size=o.image_size,
        quality=o.quality,
        max_pixels=o.max_pixels,
        eval_layout=o.eval_layout,
        key_digits=max(4, len(str(o.shard_size - 1))),
    )


@dataclass
class _Selection:
    kept: list[tuple[Record, str]]  # (record, hash) in listing order
    skipped: dict[str, list[str]]  # reason -> input names
    duplicates: list[str]  # "name (same as name)"


def _select(records: list[Record], prints: list[tuple[str | None, str | None]]) -> _Selection:
    sel = _Selection([], {}, [])
    first: dict[str, str] = {}
    for record, (digest, reason) in zip(records, prints, strict=True):
        if reason is not None:
            sel.skipped.setdefault(reason, []).append(record.name)
        elif digest in first:
            sel.duplicates.append(f"{record.name} (same as {first[digest]})")
        else:
            first[digest] = record.name
            sel.kept.append((record, digest))
    return sel


def _plan_digest(o: PackOptions, s: ShardSettings, shards: list[list[tuple[Record, str]]]) -> str:
    h = hashlib.sha256()
    fixed = {k: v for k, v in asdict(s).items() if k != "source"}
    h.update(json.dumps([fixed, o.template, o.split], sort_keys=True).encode())
    for shard in shards:
        h.update(("|".join(digest for _, digest in shard) + "\n").encode())
    return h.hexdigest()[:32]


def _earlier_plan(folder: Path) -> str | None:
    try:
        return json.loads((folder / PLAN_NAME).read_text()).get("plan")
    except (OSError, ValueError, AttributeError):
        return None


def _other_classes(out: Path, classnames: list[str]) -> bool:
    """An eval-layout `out` whose other splits name other classes than this pack."""
    names = out / "classnames.txt"
    return names.is_file() and names.read_text().splitlines() != classnames


def _prepare_out(out: Path, folder: Path, plan: str, o: PackOptions, classnames) -> bool:
    """Make `folder` (`out`, or its split folder) ready for `plan`; True when it holds an
    earlier (maybe unfinished) run of it. Another pack there is replaced only with --overwrite;
    in the eval layout, a new split joins the others when their class names agree."""
    if output_kind(out) == PACK_KIND:
        if folder.exists() and _earlier_plan(folder) == plan:
            return True
        other = "a pack of other inputs or settings" if folder.exists() else None
        if o.eval_layout and _other_classes(out, classnames):
            other = "splits with other class names"
        if other and not o.overwrite:
            raise OutputError(
                f"--out {out} holds {other}; pass --overwrite to replace it, or choose another "
                "--out"
            )
        if other:
            shutil.rmtree(out if other.startswith("splits") else folder)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, PACK_KIND)  # first: an interrupted pack is recognised and resumed
    folder.mkdir(exist_ok=True)
    atomic_write_bytes(folder / PLAN_NAME, (json.dumps({"plan": plan}) + "\n").encode())
    return False


def _finished(path: Path, plan: str, n: int) -> dict | None:
    """The stats of a shard an earlier run of this plan completed, else None."""
    try:
        stats = json.loads(stats_path(path).read_text())
    except (OSError, ValueError):
        return None
    complete = path.is_file() and path.stat().st_size == stats.get("bytes")
    return stats if complete and stats.get("plan") == plan and stats.get("count") == n else None


def _write_eval_files(out: Path, folder: Path, classnames: list[str], o: PackOptions, n: int):
    (out / "classnames.txt").write_text("\n".join(classnames) + "\n")
    template = o.template.replace("{class}", "{c}")
    (out / "zeroshot_classification_templates.txt").write_text(template + "\n")
    (folder / "nshards.txt").write_text(f"{n}\n")


def _list(o: PackOptions):
    listing = list_source(o.source, o.kind, o)
    if o.eval_layout and not listing.classnames:
        raise ConfigError(
            "--eval-layout needs class labels: a class folder (class/a.jpg), or a table with "
            "--label-col"
        )
    if not listing.records:
        raise ConfigError(f"{o.source}: no images found")
    return listing


def pack(o: PackOptions, progress: Progress | None = None) -> dict:
    """Pack `o.source` into `o.out` (see the module docstring); returns the report."""
    start = time.perf_counter()
    validate(o)
    out = guard_output_dir(
        o.out, PACK_KIND, inputs=[o.source], overwrite=True, command="data pack", renamed=False
    )
    listing = _list(o)
    s = _settings(o, listing.kind)
    tick = progress or (lambda phase, n, total: None)
    with worker_map(o.processes) as run:
        prints = []
        for p in run(partial(fingerprint, s=s), listing.records, ordered=True):
            prints.append(p)
            tick("read", 1, len(listing.records))
        sel = _select(listing.records, prints)
        if not sel.kept:
            reasons = ", ".join(f"{len(v)} {k}" for k, v in sel.skipped.items())
            raise ConfigError(f"{o.source}: no usable images ({reasons})")
        random.Random(o.seed).shuffle(sel.kept)
        shards = [sel.kept[i : i + o.shard_size] for i in range(0, len(sel.kept), o.shard_size)]
        plan = _plan_digest(o, s, shards)
        with writing(out):
            report = _write(o, out, listing.classnames, s, shards, plan, run, tick)
    return _finish(report, sel, len(listing.records), listing.kind, out, start)


def _write(o, out: Path, classnames, s, shards, plan, run, tick) -> dict:
    folder = out / o.split if o.eval_layout else out
    resumed = _prepare_out(out, folder, plan, o, classnames)
    for junk in folder.glob(".*.tmp-*"):  # left by a worker killed mid-shard (never renamed)
        junk.unlink()
    name = "{}.tar" if o.eval_layout else "{:05d}.tar"
    paths = [folder / name.format(i) for i in range(len(shards))]
    stats = {
        p.name: _finished(p, plan, len(sh)) if resumed else None
        for p, sh in zip(paths, shards, strict=True)
    }
    kept = sum(v is not None for v in stats.values())
    tasks = [
        (p, i, [r for r, _ in shard])
        for i, (p, shard) in enumerate(zip(paths, shards, strict=True))
        if stats[p.name] is None
    ]
    # One ordered stream of records over all shards still to write: workers encode, this
    # process cuts the results into shards and writes each as soon as it is complete.
    records = [r for _, _, shard in tasks for r in shard]
    encoded = iter(run(partial(encode_record, s=s), records, ordered=True))
    for path, index, shard in tasks:
        done = []
        for _ in shard:
            done.append(next(encoded))
            tick("write", 1, len(records))
        stats[path.name] = write_shard(path, index, shard, done, s, plan)
    sizes = {n: st["successes"] for n, st in stats.items()}
    atomic_write_bytes(folder / "sizes.json", (json.dumps(sizes, indent=1) + "\n").encode())
    if o.eval_layout:
        _write_eval_files(out, folder, classnames, o, len(paths))
    return {"stats": stats, "resumed_shards": kept, "folder": folder}


def _finish(written: dict, sel: _Selection, n_inputs: int, kind: str, out: Path, start) -> dict:
    skipped = {k: list(v) for k, v in sel.skipped.items()}
    for st in written["stats"].values():
        for reason, names in st["failed_names"].items():
            skipped.setdefault(reason, []).extend(names)
    samples = sum(st["successes"] for st in written["stats"].values())
    seconds = time.perf_counter() - start
    report = {
        "out": str(written["folder"]),
        "kind": kind,
        "inputs": n_inputs,
        "samples": samples,
        "shards": len(written["stats"]),
        "resumed_shards": written["resumed_shards"],
        "skipped": dict(sorted(Counter({k: len(v) for k, v in skipped.items()}).items())),
        "skipped_names": {k: sorted(v)[:_NAMES_SHOWN] for k, v in sorted(skipped.items())},
        "duplicates": len(sel.duplicates),
        "duplicate_names": sel.duplicates[:_NAMES_SHOWN],
        "bytes": sum(st["bytes"] for st in written["stats"].values()),
        "seconds": round(seconds, 3),
        "images_per_second": round(n_inputs / seconds, 1) if seconds > 0 else None,
    }
    atomic_write_bytes(out / "pack_report.json", (json.dumps(report, indent=1) + "\n").encode())
    return report


def format_report(r: dict) -> str:
    lines = [
        f"packed {r['samples']:,} of {r['inputs']:,} inputs ({r['kind']}) into {r['shards']} "
        f"shard(s) in {r['out']}"
        + (f" ({r['resumed_shards']} kept from an earlier run)" if r["resumed_shards"] else ""),
        f"  {r['bytes'] / 1e6:,.1f} MB in {r['seconds']:.1f} s ({r['images_per_second']} images/s)",
        f"  duplicates removed: {r['duplicates']}",
    ]
    lines += [f"    {name}" for name in r["duplicate_names"]]
    for reason, n in r["skipped"].items():
        lines.append(f"  skipped, {reason}: {n}")
        lines += [f"    {name}" for name in r["skipped_names"][reason]]
    return "\n".join(lines)
