"""Images/s of `clipkit data pack` against img2dataset on the same local files (issue 18).

Writes N JPEG photos-like images (smooth noise, WIDTHxHEIGHT) and one CSV naming each twice: a
relative path (for clipkit) and a file:// URL (for img2dataset). Both tools run as commands with
the same settings (resize mode, image size, JPEG quality, shard size, processes), one after the
other, alternating over --repeats rounds (medians reported); wall time includes start-up. A
plain PIL loop (open, resize, encode, one process) is timed too, as the floor of the work.
img2dataset runs from its own venv (--i2d); where it is missing or fails, its row says why.

    python scripts/bench_pack.py --images 2000 --processes 2 --json docs/bench-pack.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour noise: compresses like a photo, unlike white noise or flat colour."""
    small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    grain = rng.integers(-12, 12, (height, width, 3))
    return Image.fromarray((np.asarray(image, np.int16) + grain).clip(0, 255).astype(np.uint8))


def write_inputs(folder: Path, n: int, width: int, height: int) -> Path:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = folder / "images" / f"{i:06d}.jpg"
        _photo(rng, width, height).save(path, quality=90)
        rows.append({"path": f"images/{i:06d}.jpg", "url": path.absolute().as_uri(),
                     "caption": f"a synthetic photo number {i}"})  # fmt: skip
    table = folder / "pairs.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "url", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def _timed(cmd: list[str], env=None) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return {"seconds": round(seconds, 3), "returncode": proc.returncode, "output_tail": tail}


def _count_jpgs(folder: Path) -> int:
    import tarfile

    n = 0
    for shard in folder.glob("*.tar"):
        with tarfile.open(shard) as tar:
            n += sum(1 for m in tar.getmembers() if m.name.endswith(".jpg"))
    return n


def run_clipkit(table: Path, out: Path, a) -> dict:
    cmd = [sys.executable, "-m", "clipkit", "data", "pack", str(table), "--out", str(out),
           "--image-col", "path", "--image-size", str(a.size), "--resize-mode", "keep_ratio",
           "--quality", str(a.quality), "--shard-size", str(a.shard_size),
           "--processes", str(a.processes)]  # fmt: skip
    row = _timed(cmd)
    row["samples"] = _count_jpgs(out) if row["returncode"] == 0 else 0
    return row


def run_img2dataset(table: Path, out: Path, a) -> dict:
    if not Path(a.i2d).is_file():
        return {"skipped": f"no img2dataset at {a.i2d}"}
    cmd = [a.i2d, "--url_list", str(table),
           "--input_format", "csv", "--url_col", "url", "--caption_col", "caption",
           "--output_format", "webdataset", "--output_folder", str(out),
           "--processes_count", str(a.processes), "--thread_count", "4",
           "--image_size", str(a.size), "--resize_mode", "keep_ratio",
           "--encode_quality", str(a.quality), "--number_sample_per_shard", str(a.shard_size),
           "--disable_all_reencoding", "False", "--enable_wandb", "False"]  # fmt: skip
    row = _timed(cmd, env={**os.environ, "no_proxy": "*"})
    row["samples"] = _count_jpgs(out) if out.is_dir() else 0
    if row["returncode"] != 0 or row["samples"] == 0:
        row["skipped"] = "img2dataset failed or wrote nothing: " + " | ".join(row["output_tail"])
    return row


def run_pil_loop(table: Path, a) -> dict:
    with open(table, newline="") as f:
        paths = [table.parent / r["path"] for r in csv.DictReader(f)]
    start = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB")
        scale = a.size / min(image.size)
        new = (round(image.width * scale), round(image.height * scale))
        image.resize(new, Image.BICUBIC, reducing_gap=3.0).save(io.BytesIO(), "JPEG", quality=95)
    return {"seconds": round(time.perf_counter() - start, 3), "samples": len(paths)}


TOOLS = {
    "clipkit data pack": run_clipkit,
    "img2dataset": run_img2dataset,
    "PIL loop (1 process)": lambda table, out, a: run_pil_loop(table, a),
}


def _summary(runs: list[dict]) -> dict:
    """Median images/s over the rounds that ran; a tool that never ran says why."""
    ran = [r for r in runs if "skipped" not in r and r.get("samples")]
    if not ran:
        return {"skipped": runs[0].get("skipped", "no round ran")}
    rates = [round(r["samples"] / r["seconds"], 1) for r in ran]
    return {
        "images_per_second": float(np.median(rates)),
        "rounds_images_per_second": rates,
        "samples": ran[0]["samples"],
        "median_seconds": float(np.median([r["seconds"] for r in ran])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--i2d", default="/work/refvenv-i2d/bin/img2dataset", help="its command")
    p.add_argument("--repeats", type=int, default=3, help="Rounds; medians are reported.")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    rounds: dict[str, list[dict]] = {name: [] for name in TOOLS}
    try:
        table = write_inputs(work / "in", a.images, a.width, a.height)
        for r in range(a.repeats):  # the tools alternate, so load changes hit each alike
            for name, run in TOOLS.items():
                row = run(table, work / f"{r}-{name.split()[0]}", a)
                row["load_average"] = os.getloadavg()[0]
                rounds[name].append(row)
                shutil.rmtree(work / f"{r}-{name.split()[0]}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {name: _summary(runs) for name, runs in rounds.items()}
    for name, row in rows.items():
        rates = " / ".join(str(x) for x in row.get("rounds_images_per_second", []))
        print(f"{name:24s} {row.get('images_per_second', '-'):>8} images/s (median; rounds "
              f"{rates}) {row.get('skipped', '')}")  # fmt: skip
    settings = {k: v for k, v in vars(a).items() if k != "json"}
    result = {"settings": settings, "cpus": os.cpu_count(), "machine": platform.machine(),
              "python": platform.python_version(), "results": rows, "rounds": rounds}  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
