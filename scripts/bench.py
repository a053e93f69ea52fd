#!/usr/bin/env python
"""Side-by-side benchmarks: clipkit against the tool a user would otherwise pick, on the same
inputs, alternating, several repeats, medians and the ratio. Prints a table and writes JSON.

    .venv/bin/python scripts/bench.py --quick            # a few minutes on 2 cores
    .venv/bin/python scripts/bench.py --rows train,data  # choose rows; full mode without --quick

Rows: train (clipkit pretrain vs open_clip_train.main on the data-bound `tiny` model),
train-vit-s-32 and train-vit-b-32 (the same on compute-bound open_clip models at a small batch),
profile (both trainers' step split into phases: forward, loss, backward, clipping, optimizer,
data wait, the loop's own rest; scripts/bench/step_profile.py), data (clipkit loader vs open_clip's
get_wds_dataset), mfu (model FLOPs x samples/s over measured fp32 matmul rate; mfu-compile the
same under torch.compile; mfu-gpu ViT-B/16 in bf16 at batch 256 on CUDA), index (auto index
vs exact flat search on synthetic clustered vectors, and vs autofaiss's pick where
.venv-autofaiss exists; index-tight the same under a quarter of the raw size), zeroshot
(clipkit zero-shot vs CLIP_benchmark's evaluate), memory (peak
RSS of `retrieve eval` against the N x N matrix a non-chunked evaluation builds). Every row
records the CPU model (lscpu); a partial re-run keeps earlier rows of the same CPU only. The
open_clip reference runs in its own venv (.venv-openclip, made by scripts/setup_reference.sh)
because open_clip_torch[training] pins an old webdataset.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv" / "bin" / "python"
REF_PY = ROOT / ".venv-openclip" / "bin" / "python"
BENCH_DIR = ROOT / ".bench"
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import train_rows  # noqa: E402

TINY = train_rows.TINY  # the reference architecture (scripts/bench_accum.py uses it too)


def write_demo(out: Path, train: int, eval_: int, probe: int, size: int, shard: int) -> Path:
    """The built-in demo data, written once and reused by later runs."""
    if not (out / "demo.json").is_file():
        cmd = [
            str(PY),
            "-m",
            "clipkit",
            "data",
            "demo",
            "--out",
            str(out),
            "--train-samples",
            str(train),
            "--eval-samples",
            str(eval_),
            "--probe-train-samples",
            str(probe),
            "--image-size",
            str(size),
            "--shard-size",
            str(shard),
        ]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def demo_data() -> Path:
    return write_demo(BENCH_DIR / "data", 5000, 1000, 500, 64, 1000) / "train"


def shard_pattern(folder: Path) -> str:
    names = sorted(p.name for p in folder.glob("shard-*.tar"))
    first, last = names[0][6:12], names[-1][6:12]
    return str(folder / f"shard-{{{first}..{last}}}.tar")


def last_line(cmd: list[str]) -> str:
    """Run a benchmark helper script; its result is the last line it prints."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory (MB) of the largest process of `cmd`'s tree, measured in a fresh
    wrapper process (RUSAGE_CHILDREN here would also count earlier rows' processes)."""
    return float(last_line([str(PY), str(ROOT / "scripts/bench/peak_rss.py"), *cmd]))


def row_train(quick: bool, repeats: int, model: str = "tiny") -> dict:
    shards = demo_data()
    return train_rows.row_train(model, shards, shard_pattern(shards), quick, repeats, peak_rss_mb)


def row_profile(quick: bool, repeats: int) -> dict:
    shards = demo_data()
    return train_rows.row_profile(shards, shard_pattern(shards), quick, repeats)


def row_data(quick: bool, repeats: int) -> dict:
    shards = demo_data()
    batches = 20 if quick else 40  # 5000 pairs: full mode stays inside one epoch of both loaders
    args = [shard_pattern(shards), "5000", "2", "100", "32", str(batches)]
    ours, ref = [], []
    for _ in range(repeats):
        for py, script, values in ((PY, "clipkit_loader", ours), (REF_PY, "reference_loader", ref)):
            line = last_line([str(py), str(ROOT / f"scripts/bench/{script}.py"), *args])
            values.append(json.loads(line)["samples_per_s"])
    return _row("data loading samples/s (decode+augment, 2 workers)", ours, ref)


def row_mfu(quick: bool, repeats: int, compile_: bool = False, gpu: bool = False) -> dict:
    args = [str(PY), str(ROOT / "scripts/bench/mfu.py"), "--quick" if quick else "--full"]
    args += ["--compile"] if compile_ else []
    return json.loads(last_line(args + (["--device", "cuda"] if gpu else [])))


def row_index(quick: bool, repeats: int) -> dict:
    return _index_row(100_000 if quick else 1_000_000, budget_mb=None)


def row_index_tight(quick: bool, repeats: int) -> dict:
    """Vectors under a budget of a quarter of their raw float32 size: compressed codes only."""
    n = 20_000 if quick else 1_000_000
    return _index_row(n, budget_mb=n * 256 * 4 / 4 / 2**20)


def _index_row(n: int, budget_mb: float | None) -> dict:
    args = [str(PY), str(ROOT / "scripts/bench/index_bench.py"), str(n)]
    if budget_mb is not None:
        args.append(f"{budget_mb:.1f}")
    return json.loads(last_line(args))


def row_zeroshot(quick: bool, repeats: int) -> dict:
    demo_data()
    script = ROOT / "scripts/bench/zeroshot_bench.py"
    return json.loads(
        last_line([str(PY), str(script), str(BENCH_DIR / "data"), "tiny-64", str(repeats)])
    )


def row_memory(quick: bool, repeats: int) -> dict:
    """Peak RSS of `retrieve eval` at N pairs (exact + index recall, no N x N matrix), against
    the N x N float32 similarity matrix a non-chunked evaluation (CLIP_benchmark's) builds."""
    n = 20_000 if quick else 100_000  # the size takes ~12 minutes on 2 cores
    data = write_demo(BENCH_DIR / f"pairs-{n}", 1, n, 1, 32, 5000)
    cmd = [
        str(PY),
        "-m",
        "clipkit",
        "retrieve",
        "eval",
        "--model",
        "test",
        "--data",
        str(data / "eval"),
        "--batch-size",
        "256",
        "--workers",
        "2",
    ]
    peak_mb = peak_rss_mb(cmd)
    matrix_mb = n * n * 4 / 2**20
    return {
        "row": f"memory: retrieve eval peak RSS at {n} pairs, MB (reference: the N x N "
        "similarity matrix alone)",
        "clipkit": peak_mb,
        "reference": matrix_mb,
        "ratio": matrix_mb / peak_mb,
    }


def _row(name: str, ours: list[float], ref: list[float], extra: dict | None = None) -> dict:
    a, b = statistics.median(ours), statistics.median(ref)
    return {
        "row": name,
        "clipkit": a,
        "reference": b,
        "ratio": a / b,
        "clipkit_runs": ours,
        "reference_runs": ref,
        **(extra or {}),
    }


ROWS = {
    "train": row_train,
    "train-vit-s-32": lambda quick, repeats: row_train(quick, repeats, "vit-s-32"),
    "train-vit-b-32": lambda quick, repeats: row_train(quick, repeats, "vit-b-32"),
    "profile": row_profile,
    "data": row_data,
    "mfu": row_mfu,
    "index": row_index,
    "mfu-compile": lambda quick, repeats: row_mfu(quick, repeats, compile_=True),
    # ViT-B/16, bf16 autocast, batch 256 on a GPU (target >= 40% of measured bf16 matmul)
    "mfu-gpu": lambda quick, repeats: row_mfu(quick, repeats, gpu=True),
    "index-tight": row_index_tight,
    "zeroshot": row_zeroshot,
    "memory": row_memory,
}


def _earlier_rows(out: Path, quick: bool, cpu: str) -> dict[str, dict]:
    """Rows of an earlier run of the same mode on the same CPU model in `out`, by row name: a
    run of some rows replaces those and keeps the others (each row carries its own date and
    CPU); rows measured on another CPU are dropped, never mixed with this machine's."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    if earlier.get("quick") != quick:
        return {}
    return {r["bench"]: r for r in earlier["rows"] if "bench" in r and r.get("cpu_model") == cpu}


def _set_aside(out: Path, quick: bool, cpu: str) -> Path | None:
    """Copy `out` to `<stem>-<its date>.json` when this run would drop some of its rows (another
    mode, another or an unrecorded CPU), so that no earlier measurement is lost; the copy's path."""
    if not out.exists():
        return None
    kept = _earlier_rows(out, quick, cpu)
    earlier = json.loads(out.read_text())
    if len(kept) == len([r for r in earlier.get("rows", []) if "bench" in r]):
        return None
    stem, date = out.stem, earlier.get("date", "undated")
    aside = out.with_name(f"{stem}-{date}.json")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{stem}-{date}-{n}.json")
    shutil.copyfile(out, aside)
    return aside


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="Small sizes, 2 repeats (a few minutes).")
    gpu_rows = {"mfu-gpu"}
    default_rows = [r for r in ROWS if r not in gpu_rows or shutil.which("nvidia-smi")]
    ap.add_argument(
        "--rows",
        default=",".join(default_rows),
        help=f"Comma-separated rows of {', '.join(ROWS)} (default: all; {', '.join(gpu_rows)} "
        "only where nvidia-smi exists).",
    )
    ap.add_argument("--repeats", type=int, default=None, help="Alternating repeats per row.")
    ap.add_argument(
        "--out",
        help="JSON output (default docs/bench-results.json; full: docs/bench-results-full.json)",
    )
    args = ap.parse_args()
    if not REF_PY.exists() and {"train", "data"} & set(args.rows.split(",")):
        subprocess.run(["bash", str(ROOT / "scripts/setup_reference.sh")], check=True)
    repeats = args.repeats or (2 if args.quick else 3)
    cpu = train_rows.cpu_model()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpu_model": cpu,
        "quick": args.quick,
        "rows": [],
    }
    out = Path(args.out or ROOT / "docs" / f"bench-results{'' if args.quick else '-full'}.json")
    aside = _set_aside(out, args.quick, cpu)
    if aside is not None:
        print(f"{out} holds rows of another machine or mode: copied to {aside}", flush=True)
    kept = _earlier_rows(out, args.quick, cpu)
    for name in args.rows.split(","):
        row = {"bench": name, "date": results["date"], "cpu_model": cpu}
        row |= ROWS[name](args.quick, repeats)
        kept.pop(name, None)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        tmp = out.with_suffix(".tmp")  # after every row: a failing later row loses nothing
        tmp.write_text(json.dumps(results | {"rows": [*kept.values(), *results["rows"]]}, indent=1))
        tmp.replace(out)
    print("\n| row | clipkit | reference | ratio |\n|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['row']} | {r['clipkit']:.4g} | {r['reference']:.4g} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
