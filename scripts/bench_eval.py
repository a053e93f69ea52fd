#!/usr/bin/env python
"""Evaluation during training (issue 17): what an evaluation costs, and clipkit's in-training
zero-shot against open_clip_train's `--zeroshot-frequency` evaluation.

    python scripts/bench_eval.py --out docs/bench-eval.json   # docs/benchmarks.md (6.5 min here)
    python scripts/bench_eval.py --quick --out /tmp/e.json    # checks the script (minutes)

cost: the demo's model and batch (scripts/demo.sh: `tiny-rn-64`, batch 100, 2 workers) on
  `clipkit data demo` data. Seconds of one training step (median of the steps after the first
  --skip-steps of a fresh `clipkit pretrain --log-every 1`, from its metrics.jsonl) against the
  seconds of each evaluation the demo would run while it trains (zero-shot shape and colour,
  retrieval on the eval split, probe with the quick sweep), timed as `InTrainingEval.run`
  reports them (`eval_seconds`) on that run's checkpoint, --cost-rounds rounds in one process.
zeroshot: that checkpoint, exported with `clipkit export` (an open_clip `local-dir:` folder
  that open_clip loads), on an ImageNet-layout folder of --imagenet-images demo images in 1000
  synset folders (both clipkit's `zero-shot:imagenet:DIR` and torchvision's ImageFolder read
  it). clipkit: `InTrainingEval.run` with that spec; open_clip: `zero_shot_eval` from
  open_clip_train, called in a small driver in the reference venv as its trainer calls it. Same
  batch, workers and threads; each round is a fresh process per tool, the tools alternate
  (A B A B), and the time is that of the call alone (not the process start or model load).
  --templates K keeps the first K of the 80 ImageNet templates in both (default 8: all 80
  cost 10x the class embeddings, about 4 minutes per evaluation on 2 shared cores).

The machine may be shared: the load average is recorded next to every figure.
Writes the raw numbers as JSON (--out) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "scripts" / "bench"
sys.path.insert(0, str(BENCH_DIR))
from measure import run_measured  # noqa: E402

DEMO = {"model": "tiny-rn-64", "batch": 100, "workers": 2}  # scripts/demo.sh's pretraining
EVAL_READING = {"batch": 64, "workers": 2}  # pretrain's --eval-batch-size / --eval-workers
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def demo_specs(root: Path) -> list[str]:
    """The evaluations scripts/demo.sh runs after training, as `pretrain --eval` specs."""
    return [
        f"zero-shot-shape=zero-shot:demo:{root},task=shape",
        f"zero-shot-colour=zero-shot:demo:{root},task=colour",
        f"retrieval=retrieval:{root / 'eval'}",
        f"probe-shape=probe:demo:{root},task=shape,sweep=quick",
    ]


def step_seconds(records: list[dict], batch: int, skip: int) -> list[float]:
    """Seconds of each logged step (one step per record at --log-every 1), the first `skip`
    steps (start-up: workers, first batches) left out."""
    return [batch / r["samples_per_s"] for r in records if r["step"] > skip]


def synset_names(count: int) -> list[str]:
    """Folder names in ImageNet's synset form (n + 8 digits), sorted as the class index."""
    return [f"n{i:08d}" for i in range(count)]


def median_row(values: list[float]) -> dict:
    return {"median": statistics.median(values), "all": values}


def cost_summary(train_steps: list[float], rounds: list[dict]) -> list[dict]:
    """Per evaluation: median seconds over the rounds and that in training steps."""
    step = statistics.median(train_steps)
    by_name: dict[str, list[float]] = {}
    for round_ in rounds:
        for record in round_["records"]:
            by_name.setdefault(record["eval"], []).append(record["eval_seconds"])
    whole = [r["run_seconds"] for r in rounds]
    rows = [{"eval": name, "seconds": median_row(s)} for name, s in by_name.items()]
    rows.append({"eval": "all four (one InTrainingEval.run)", "seconds": median_row(whole)})
    return [row | {"training_steps": row["seconds"]["median"] / step} for row in rows]


def zeroshot_summary(rows: list[dict]) -> dict:
    """Median seconds per evaluation of each tool, its parts, and clipkit's time over
    open_clip's."""
    out = {}
    for tool in ("clipkit", "open_clip"):
        mine = [r for r in rows if r["tool"] == tool]
        out[tool] = {
            "seconds": median_row([r["seconds"] for r in mine]),
            "class_embeddings_s": statistics.median(r["class_embeddings_s"] for r in mine),
            "images_s": statistics.median(r["seconds"] - r["class_embeddings_s"] for r in mine),
            "acc1": [r["acc1"] for r in mine],
        }
    out["clipkit_over_open_clip"] = (
        out["clipkit"]["seconds"]["median"] / out["open_clip"]["seconds"]["median"]
    )
    return out


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def reference_python() -> Path:
    python = ROOT / ".venv-openclip" / "bin" / "python"
    if not python.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "setup_reference.sh")], check=True)
    return python


def run_json(cmd: list, work: Path, name: str, threads: int) -> dict:
    """Run a driver; its result is the JSON on the last line of its output."""
    log = work / f"{name}.log"
    measured = run_measured([str(c) for c in cmd], log, env=child_env(threads))
    return json.loads(log.read_text().strip().splitlines()[-1]) | {"process": measured}


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_demo(work: Path, quick: bool) -> Path:
    """`clipkit data demo` at its default sizes (--quick: small, 100-sample shards so that 2
    workers have a shard each), written once and reused."""
    bench = _load_bench()
    bench.PY = Path(sys.executable)
    sizes = (400, 100, 200, 64, 100) if quick else (5000, 500, 1000, 64, 1000)
    root = work / ("eval-demo-quick" if quick else "eval-demo")
    bench.write_demo(root, *sizes)
    return root


def train(cfg: dict, root: Path) -> tuple[Path, dict]:
    """A fresh short `clipkit pretrain` of the demo's model and batch; its step times."""
    run = cfg["work"] / "eval-run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "clipkit", "pretrain", "--data", root / "train", "--out", run,
        "--model", DEMO["model"], "--steps", cfg["steps"], "--batch-size", DEMO["batch"],
        "--lr", "1e-3", "--warmup", "40", "--workers", DEMO["workers"], "--log-every", "1",
        "--save-every", "100000", "--threads", cfg["threads"], "--seed", "0",
    ]  # fmt: skip
    measured = run_measured([str(c) for c in cmd], cfg["work"] / "train.log",
                            env=child_env(cfg["threads"]))  # fmt: skip
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = step_seconds(records, DEMO["batch"], cfg["skip_steps"])
    print(f"training step: median {statistics.median(steps):.2f} s", flush=True)
    return run, measured | {"step_seconds": median_row(steps), "steps": len(records)}


def cost(cfg: dict, root: Path, run: Path, training: dict) -> dict:
    cmd = [
        sys.executable, BENCH_DIR / "eval_driver.py", run, cfg["work"] / "eval-out",
        EVAL_READING["batch"], EVAL_READING["workers"], cfg["threads"], cfg["cost_rounds"], 0,
        *demo_specs(root),
    ]  # fmt: skip
    result = run_json(cmd, cfg["work"], "cost", cfg["threads"])
    summary = cost_summary(training["step_seconds"]["all"], result["rounds"])
    for row in summary:
        print(f"{row['eval']}: {row['seconds']['median']:.1f} s = "
              f"{row['training_steps']:.1f} steps", flush=True)  # fmt: skip
    return {"training": training, "eval_rounds": result["rounds"], "summary": summary}


def imagenet_folder(cfg: dict, root: Path) -> Path:
    """--imagenet-images demo images (shape set, test then train; reused in turn where the demo
    has fewer) as JPEGs in 1000 synset folders, image i in folder i mod 1000, so that no class
    folder is empty (ImageFolder refuses one)."""
    count = cfg["imagenet_images"]
    out = cfg["work"] / f"imagenet-{count}-{root.name}"
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    images = demo_images(root, count)
    names = synset_names(1000)
    for i in range(count):
        folder = out / "val" / names[i % 1000]
        folder.mkdir(parents=True, exist_ok=True)
        images[i % len(images)].save(folder / f"{i:06d}.jpg", quality=90)
    (out / "done").write_text(str(count))
    return out


def demo_images(root: Path, limit: int) -> list:
    """Up to `limit` decoded images of the demo's shape set (test split first)."""
    from PIL import Image

    images = []
    for split in ("test", "train"):
        for shard in sorted((root / "zeroshot" / "shape" / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if len(images) < limit and member.name.endswith(IMAGE_EXTS):
                        with Image.open(tar.extractfile(member)) as image:
                            images.append(image.convert("RGB"))
    return images


def export(cfg: dict, run: Path) -> Path:
    out = cfg["work"] / "eval-export"
    cmd = [sys.executable, "-m", "clipkit", "export", "-c", run, "--out", out, "--overwrite"]
    run_measured([str(c) for c in cmd], cfg["work"] / "export.log", env=child_env(1))
    return out


def zeroshot_round(cfg: dict, tool: str, index: int, run: Path, exported: Path, data: Path):
    """One fresh process of `tool` evaluating ImageNet zero-shot once."""
    common = [EVAL_READING["batch"], EVAL_READING["workers"], cfg["threads"], 1,
              cfg["templates"]]  # fmt: skip
    if tool == "clipkit":
        spec = f"zero-shot-imagenet=zero-shot:imagenet:{data}"
        cmd = [sys.executable, BENCH_DIR / "eval_driver.py", run, cfg["work"] / "zs-out",
               *common, spec]  # fmt: skip
    else:
        cmd = [reference_python(), BENCH_DIR / "openclip_zeroshot.py",
               f"local-dir:{exported}", data / "val", *common]  # fmt: skip
    (row,) = run_json(cmd, cfg["work"], f"zs-{tool}-{index}", cfg["threads"])["rounds"]
    if tool == "clipkit":
        (record,) = row["records"]
        row["acc1"] = record["eval/zero-shot-imagenet/acc1"]
    return {
        "tool": tool,
        "round": index,
        "seconds": row["run_seconds"],
        "class_embeddings_s": row["spent"]["class_embeddings"],
        "acc1": row["acc1"],
        "load_before": row["load_before"],
        "load_after": row["load_after"],
    }


def zeroshot(cfg: dict, root: Path, run: Path) -> dict:
    exported, data = export(cfg, run), imagenet_folder(cfg, root)
    rows = []
    for index in range(cfg["zs_rounds"]):
        for tool in ("clipkit", "open_clip"):
            rows.append(zeroshot_round(cfg, tool, index, run, exported, data))
            r = rows[-1]
            print(
                f"zero-shot {tool} #{index}: {r['seconds']:.1f} s (class embeddings "
                f"{r['class_embeddings_s']:.1f} s, load {r['load_before']:.1f})",
                flush=True,
            )
    return {"rounds": rows, "summary": zeroshot_summary(rows)}


def markdown(results: dict) -> str:
    lines = []
    if "cost" in results:
        train = results["cost"]["training"]
        lines += [f"training step: median {train['step_seconds']['median']:.2f} s "
                  f"(load {train['load_before']:.1f} -> {train['load_after']:.1f})", "",
                  "| evaluation | seconds (median) | every round | training steps |",
                  "|---|---|---|---|"]  # fmt: skip
        for row in results["cost"]["summary"]:
            every = ", ".join(f"{s:.1f}" for s in row["seconds"]["all"])
            lines.append(f"| {row['eval']} | {row['seconds']['median']:.1f} | {every} | "
                         f"{row['training_steps']:.1f} |")  # fmt: skip
    if "zeroshot" in results:
        lines += [
            "",
            "| tool | round | seconds | class embeddings (s) | images (s) | top-1 | load |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["zeroshot"]["rounds"]:
            lines.append(f"| {r['tool']} | {r['round']} | {r['seconds']:.1f} | "
                         f"{r['class_embeddings_s']:.1f} | "
                         f"{r['seconds'] - r['class_embeddings_s']:.1f} | {r['acc1']:.4f} | "
                         f"{r['load_before']:.1f} |")  # fmt: skip
        ratio = results["zeroshot"]["summary"]["clipkit_over_open_clip"]
        lines.append(f"\nclipkit / open_clip time per evaluation (medians): {ratio:.2f}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="Small demo data, 4 steps, one "
        "round each, 1000 ImageNet images, 2 templates (checks the script).",
    )
    ap.add_argument("--parts", default="cost,zeroshot", help="cost, zeroshot or both "
                    "(zeroshot trains the checkpoint it needs too).")  # fmt: skip
    ap.add_argument("--steps", type=int, default=10, help="Training steps of the run (10).")
    ap.add_argument("--skip-steps", type=int, default=2, help="First steps not counted (2).")
    ap.add_argument("--cost-rounds", type=int, default=2, help="Rounds of the demo's "
                    "evaluations, in one process (2).")  # fmt: skip
    ap.add_argument("--zs-rounds", type=int, default=2, help="Rounds of each tool's "
                    "ImageNet zero-shot, alternating (2).")  # fmt: skip
    ap.add_argument(
        "--imagenet-images",
        type=int,
        default=1000,
        help="Images in the ImageNet-layout folder (at least 1000: one per class; default 1000).",
    )
    ap.add_argument("--templates", type=int, default=8, help="First K of the 80 ImageNet "
                    "templates in both tools (default 8; 0: all 80).")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every process "
                    "(default 1: on a shared machine more threads wait for each other at "
                    "every op).")  # fmt: skip
    ap.add_argument("--work-dir", default=str(ROOT / ".bench"), help="Data and runs go here.")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "eval-results.json"))
    args = ap.parse_args()
    if args.imagenet_images < 1000:
        ap.error("--imagenet-images must be at least 1000 (one image per ImageNet class)")
    return args


def main() -> None:
    args = parse_args()
    if args.quick:
        args.steps, args.skip_steps, args.cost_rounds, args.zs_rounds = 4, 1, 1, 1
        args.templates = 2
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = vars(args) | {"work": work}
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python", "scripts/bench_eval.py", *sys.argv[1:]]),
        "settings": {k: v for k, v in cfg.items() if k not in ("work", "out", "work_dir")}
        | {"demo": DEMO, "eval_reading": EVAL_READING},
    }
    started = time.perf_counter()
    root = write_demo(work, args.quick)
    run, training = train(cfg, root)
    parts = args.parts.split(",")
    if "cost" in parts:
        results["cost"] = cost(cfg, root, run, training)
    if "zeroshot" in parts:
        results["zeroshot"] = zeroshot(cfg, root, run)
    results["script_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
