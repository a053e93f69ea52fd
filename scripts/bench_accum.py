#!/usr/bin/env python
"""Large batches on a CPU (issue 16): what exact accumulation costs in memory and in time.

    python scripts/bench_accum.py                 # full run (about 25 minutes on 2 cores)
    python scripts/bench_accum.py --quick --no-reference --out /tmp/a.json   # seconds

memory: peak resident memory (ru_maxrss of a fresh `clipkit pretrain` process, data loaded in
  that process) of a few optimizer steps at effective batch E = 32, 64, ... --max-batch, at
  micro-batch 32: exact accumulation (K = E / 32) against a plain batch of E (K = 1). Plain
  batches whose predicted peak (linear in E from the last two) exceeds --max-rss-mb or 70% of
  the memory available now are skipped and recorded as such.
time: steady-state samples/s (median over the steps after the first --warmup-samples) at
  micro-batch 32 of no accumulation, `--accum-mode independent` and `exact` at K = 4 and 8, and
  open_clip_train `--accum-freq K` (K = 1, 4, 8) on the same model config, data and batch, every
  run training the same number of samples; the configurations alternate, --repeats rounds.
  CPU time and the load average go next to wall time: the machine may be shared.

Writes the raw numbers as JSON (--out), prints markdown tables, draws --plot (matplotlib).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
from measure import run_measured  # noqa: E402


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _load_bench()
# --quick: clipkit's `test` size, written out so open_clip can build the very same model.
QUICK_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 2},
}
MODES = {"full": (BENCH.TINY, 32, (4, 8)), "quick": (QUICK_MODEL, 8, (2,))}


def reference_python() -> Path:
    here = ROOT / ".venv-openclip" / "bin" / "python"
    return here if here.exists() else Path("/work/main/.venv-openclip/bin/python")


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def clipkit_cmd(cfg: dict, out: Path, micro: int, accum: int, mode: str, samples: int) -> list:
    return [
        sys.executable, "-m", "clipkit", "pretrain",
        "--data", str(cfg["shards"]), "--out", str(out), "--model", str(cfg["model_json"]),
        "--batch-size", str(micro), "--accum-steps", str(accum), "--accum-mode", mode,
        "--steps", str(samples // (micro * accum)), "--workers", str(cfg["workers"]),
        "--threads", str(cfg["threads"]), "--precision", "fp32", "--device", "cpu",
        "--lr", "1e-3", "--warmup", "10", "--log-every", "1", "--save-every", "100000",
        "--seed", "0",
    ]  # fmt: skip


def run_clipkit(cfg: dict, micro: int, accum: int, mode: str, samples: int, workers=None) -> dict:
    """One fresh `clipkit pretrain`; per-step samples/s from its metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="bench-accum-") as tmp:
        run = Path(tmp) / "run"
        cmd = clipkit_cmd(cfg | {"workers": cfg["workers"] if workers is None else workers},
                          run, micro, accum, mode, samples)  # fmt: skip
        measured = run_measured(cmd, Path(tmp) / "log.txt", env=child_env(cfg["threads"]))
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["samples_seen"] > cfg["warmup_samples"]] or recs[-1:]
    return measured | {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steady),
        "steps": len(recs),
        "steady_steps": len(steady),
    }


def open_clip_cmd(cfg: dict, logs: Path, micro: int, accum: int, samples: int) -> list:
    return [
        str(reference_python()), "-m", "open_clip_train.main",
        "--train-data", BENCH.shard_pattern(cfg["shards"]), "--train-num-samples", str(samples),
        "--dataset-type", "webdataset", "--batch-size", str(micro), "--accum-freq", str(accum),
        "--workers", str(cfg["workers"]), "--model", cfg["ref_model"], "--epochs", "1",
        "--precision", "fp32", "--device", "cpu", "--lr", "1e-3", "--warmup", "10",
        "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
        "--val-frequency", "0", "--logs", str(logs), "--name", "bench", "--report-to", "",
        "--seed", "0", "--grad-clip-norm", "1.0",  # clipkit clips at 1.0 by default
        "--local-loss",  # clipkit's clip_loss form (no difference in one process)
    ]  # fmt: skip


def run_open_clip(cfg: dict, micro: int, accum: int, samples: int) -> dict:
    """One fresh open_clip_train; per-step time from its "Batch (t)" log lines (one per step)."""
    with tempfile.TemporaryDirectory(prefix="bench-accum-oc-") as tmp:
        log = Path(tmp) / "log.txt"
        cmd = open_clip_cmd(cfg, Path(tmp), micro, accum, samples)
        measured = run_measured(cmd, log, cwd=Path(tmp), env=child_env(cfg["threads"]))
        times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", log.read_text())]
    per_step = micro * accum
    skip = cfg["warmup_samples"] // per_step
    steady = times[skip:] or times[-1:]
    return measured | {
        "samples_per_s": statistics.median(per_step / t for t in steady),
        "steps": len(times),
        "steady_steps": len(steady),
    }


def memory_rows(cfg: dict, batches: list[int], micro: int) -> list[dict]:
    """Peak RSS at each effective batch: exact accumulation vs one plain batch."""
    rows, plain = [], []
    for eff in batches:
        k = eff // micro
        samples = cfg["mem_steps"] * eff
        exact = run_clipkit(cfg, micro, k, "exact", samples, workers=0)
        rows.append({"mode": "exact", "effective_batch": eff, "micro_batch": micro, "accum": k}
                    | exact)  # fmt: skip
        print(f"memory exact {eff}: {exact['peak_rss_mb']:.0f} MB", flush=True)
        row = {"mode": "plain", "effective_batch": eff, "micro_batch": eff, "accum": 1}
        if k == 1:  # the same run: one micro-batch, nothing accumulated
            rows.append(row | exact)
            plain.append((eff, exact["peak_rss_mb"]))
            continue
        limit, predicted = memory_limit_mb(cfg), predict_mb(plain, eff)
        if predicted > limit:
            rows.append(row | {"skipped": f"predicted {predicted:.0f} MB > {limit:.0f} MB"})
            print(f"memory plain {eff}: skipped ({rows[-1]['skipped']})", flush=True)
            continue
        try:
            measured = run_clipkit(cfg, eff, 1, "exact", samples, workers=0)
        except RuntimeError as err:  # e.g. killed for memory: the point the figure is about
            rows.append(row | {"failed": str(err)[-500:]})
            print(f"memory plain {eff}: failed", flush=True)
            continue
        rows.append(row | measured)
        plain.append((eff, measured["peak_rss_mb"]))
        print(f"memory plain {eff}: {measured['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def predict_mb(points: list[tuple[int, float]], eff: int) -> float:
    """Linear in the batch through the last two measured points (0 when fewer)."""
    if len(points) < 2:
        return 0.0
    (e0, m0), (e1, m1) = points[-2:]
    return m1 + (m1 - m0) / (e1 - e0) * (eff - e1)


def memory_limit_mb(cfg: dict) -> float:
    """The user's cap, or 70% of what the machine has available now (it may be shared)."""
    available = float("inf")
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) / 1024
    return min(cfg["max_rss_mb"], 0.7 * available)


def time_configs(accums: tuple[int, ...], reference: bool) -> list[tuple[str, int]]:
    configs = [("plain", 1)]
    for k in accums:
        configs += [("independent", k), ("exact", k)]
    if reference:
        configs += [("open_clip", k) for k in accums]
    return configs


def time_rows(cfg: dict, micro: int, accums: tuple[int, ...], repeats: int, ref: bool) -> list:
    rows = []
    for rep in range(repeats):
        for name, k in time_configs(accums, ref):
            if name == "open_clip":
                r = run_open_clip(cfg, micro, k, cfg["time_samples"])
            else:
                r = run_clipkit(cfg, micro, k, "exact" if k == 1 else name, cfg["time_samples"])
            rows.append({"config": name, "accum": k, "micro_batch": micro, "repeat": rep} | r)
            print(f"time {name} K={k} #{rep}: {r['samples_per_s']:.1f} samples/s "
                  f"(cpu {r['cpu_s']:.0f} s / wall {r['wall_s']:.0f} s, "
                  f"load {r['load_before']:.1f})", flush=True)  # fmt: skip
    return rows


def time_summary(rows: list[dict]) -> list[dict]:
    """Median samples/s per configuration, and time per sample relative to plain clipkit and to
    independent accumulation / open_clip at the same K."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["accum"]), []).append(r)
    sps = {key: statistics.median(r["samples_per_s"] for r in rs) for key, rs in groups.items()}
    out = []
    for (name, k), rs in groups.items():
        row = {"config": name, "accum": k, "samples_per_s": sps[(name, k)],
               "ms_per_sample": 1000 / sps[(name, k)],
               "cpu_per_wall": statistics.median(r["cpu_s"] / r["wall_s"] for r in rs),
               "repeats": len(rs)}  # fmt: skip
        for ref_name, ref_k in (("plain", 1), ("independent", k), ("open_clip", k)):
            if (ref_name, ref_k) in sps and (ref_name, ref_k) != (name, k):
                row[f"time_vs_{ref_name}"] = sps[(ref_name, ref_k)] / sps[(name, k)]
        out.append(row)
    return out


def markdown(results: dict) -> str:
    lines = ["| effective batch | exact: K | exact peak RSS (MB) | plain peak RSS (MB) |",
             "|---|---|---|---|"]  # fmt: skip
    by_eff: dict[int, dict] = {}
    for r in results["memory"]:
        by_eff.setdefault(r["effective_batch"], {})[r["mode"]] = r
    for eff, modes in sorted(by_eff.items()):
        plain = modes.get("plain", {})
        shown = (f"{plain['peak_rss_mb']:.0f}" if "peak_rss_mb" in plain
                 else plain.get("skipped") or "failed (out of memory?)")  # fmt: skip
        lines.append(f"| {eff} | {modes['exact']['accum']} | "
                     f"{modes['exact']['peak_rss_mb']:.0f} | {shown} |")  # fmt: skip
    lines += ["", "| configuration | K | samples/s | ms/sample | vs plain | vs independent | "
              "vs open_clip | CPU/wall |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["time_summary"]:
        ratios = [f"{r[k]:.2f}x" if k in r else "" for k in
                  ("time_vs_plain", "time_vs_independent", "time_vs_open_clip")]  # fmt: skip
        lines.append(f"| {r['config']} | {r['accum']} | {r['samples_per_s']:.1f} | "
                     f"{r['ms_per_sample']:.2f} | {' | '.join(ratios)} | "
                     f"{r['cpu_per_wall']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("exact", "o-"), ("plain", "s--")):
        pts = [(r["effective_batch"], r["peak_rss_mb"] / 1024) for r in results["memory"]
               if r["mode"] == mode and "peak_rss_mb" in r]  # fmt: skip
        label = "exact accumulation (micro-batch 32)" if mode == "exact" else "plain batch"
        ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("effective batch (samples per optimizer step)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"clipkit pretrain, {results['settings']['model']}, fp32 CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def prepare(args: argparse.Namespace, model: dict, micro: int) -> dict:
    """Demo shards and the model config, written once into --work-dir and reused."""
    work = Path(args.work_dir)
    samples = 256 if args.quick else 4096
    data = work / f"accum-data-{samples}"
    BENCH.PY = Path(sys.executable)  # bench.py's demo writer runs clipkit with this python
    BENCH.write_demo(data, samples, 32, 32, 32, max(64, samples // 4))
    name = f"clipkit-bench-accum-{'quick' if args.quick else 'tiny'}"
    model_json = work / f"{name}.json"
    model_json.write_text(json.dumps(model))
    if not args.no_reference:  # open_clip finds a model config by name in its package
        cfg_dir = next((reference_python().parents[1] / "lib").glob(
            "python3*/site-packages/open_clip/model_configs"))  # fmt: skip
        (cfg_dir / f"{name}.json").write_text(json.dumps(model))
    quick = args.quick
    return {
        "shards": data / "train",
        "model_json": model_json,
        "ref_model": name,
        "threads": args.threads,
        "workers": args.workers,
        "mem_steps": args.mem_steps,
        "warmup_samples": args.warmup_samples or (micro * 2 if quick else 512),
        "time_samples": args.time_samples or (micro * 6 if quick else 2048),
        "max_rss_mb": args.max_rss_mb,
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="Test-sized model, micro-batch 8, "
                    "effective batch up to 16, K = 2, one round (checks the script).")  # fmt: skip
    ap.add_argument("--no-reference", action="store_true", help="Skip open_clip_train.")
    ap.add_argument("--parts", default="memory,time", help="memory, time or both.")
    ap.add_argument("--max-batch", type=int, default=None, help="Largest effective batch "
                    "(default 4096; quick 16).")  # fmt: skip
    ap.add_argument("--max-rss-mb", type=float, default=12000, help="Skip plain batches "
                    "predicted to need more (default 12000).")  # fmt: skip
    ap.add_argument("--mem-steps", type=int, default=2, help="Optimizer steps per memory run.")
    ap.add_argument("--repeats", type=int, default=None, help="Rounds of the time runs (3).")
    ap.add_argument("--time-samples", type=int, default=None, help="Samples per time run (2048).")
    ap.add_argument("--warmup-samples", type=int, default=None, help="Samples whose steps the "
                    "steady state skips (512).")  # fmt: skip
    ap.add_argument("--accum", default=None, help="K of the time runs, comma-separated (4,8).")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads.")
    ap.add_argument("--workers", type=int, default=1, help="Data workers of the time runs.")
    ap.add_argument("--work-dir", default=str(ROOT / ".bench"), help="Demo shards live here.")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "accum-results.json"))
    ap.add_argument("--plot", default=None, help="PNG of peak memory vs effective batch.")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    model, micro, accums = MODES["quick" if args.quick else "full"]
    accums = tuple(int(k) for k in args.accum.split(",")) if args.accum else accums
    cfg = prepare(args, model, micro)
    max_batch = args.max_batch or (2 * micro if args.quick else 4096)
    batches = [micro * 2**i for i in range(16) if micro * 2**i <= max_batch]
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "command": " ".join(["python", "scripts/bench_accum.py", *sys.argv[1:]]),
        "settings": {
            "model": "quick (test size)" if args.quick else "tiny (bench.py's TINY)",
            "micro_batch": micro,
            "threads": args.threads,
            "time_workers": args.workers,
            "memory_workers": 0,
            "precision": "fp32",
            "data": "clipkit demo shards, 32 px",
        }
        | {k: cfg[k] for k in ("mem_steps", "warmup_samples", "time_samples")},  # fmt: skip
        "memory": [],
        "time": [],
        "time_summary": [],
    }
    parts = args.parts.split(",")
    out = Path(args.out)
    if out.exists():  # a run of one part keeps the other part's numbers (each has its date)
        earlier = json.loads(out.read_text())
        if earlier.get("settings", {}).get("model") == results["settings"]["model"]:
            kept = [k for k in earlier if k.startswith(("date_", "settings_"))]
            kept += ["memory", "time"]
            results |= {k: earlier[k] for k in [*kept, "time_summary"]}
    for part in parts:  # which run each part's numbers come from
        results[f"date_{part}"] = results["date"]
        results[f"settings_{part}"] = results["settings"] | {"command": results["command"]}
    if "memory" in parts:
        results["memory"] = memory_rows(cfg, batches, micro)
    if "time" in parts:
        repeats = args.repeats or (1 if args.quick else 3)
        results["time"] = time_rows(cfg, micro, accums, repeats, not args.no_reference)
        results["time_summary"] = time_summary(results["time"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    if args.plot and results["memory"]:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    sys.exit(main())
