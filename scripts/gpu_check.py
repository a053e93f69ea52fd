"""GPU check: the figures a lent H100/H200 should give, in one run of at most 8 minutes.

Steps (sizes in scripts/gpu_check_steps.py, FULL and DRY):
  data      `clipkit data demo` shards at 224 px (the real `clipkit pretrain` input)
  bf16      `clipkit pretrain` ViT-B/16 CLIP, batch 256, bf16: samples/s and hardware use
            (model FLOPs x samples/s over the bf16 matmul rate, both from scripts/bench/mfu.py)
  fp16      the same under fp16 with loss scaling: steps/s, scaler_skipped_steps, loss_scale
  resume    `torchrun --nproc_per_node 1` (NCCL): 2N steps vs N steps + --resume, losses equal
  methods   scripts/bench_methods.py: A-CLIP / A-CLIP-eff / FLIP time per sample vs CLIP at
            per-GPU batch 64 (the A-CLIP / SLIP commands' 4096 over 64 GPUs)
  index     clipkit.index.build_index IVF-flat on GPU (1M x 512): build; nprobe tuned to
            recall@10 >= 0.95 against brute force; queries/s there
  zeroshot  clipkit's zero-shot evaluation: images/s

--dry-run runs every step at tiny sizes on CPU (model `test`, 32 px, gloo, faiss CPU): what CI
tests. Each step runs in its own process under its own time limit (printed before it starts); a
failed or timed-out step records its error and the check goes on; the exit code is 1 if any
step failed. Writes OUT/gpu_check.json and OUT/gpu_check.md."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_steps import STEPS, run_step  # noqa: E402

# Seconds per step: (full on one H100/H200, dry run on 2 CPU cores). Full sums to 480 s.
# Dry-run limits are ~3x a quiet 2-core run (bf16 30 s, resume 36 s): CI runs the dry run beside
# other tests, and a step over its limit is killed.
BUDGETS = {
    "data": (60, 40),
    "bf16": (100, 120),
    "fp16": (70, 70),
    "resume": (90, 150),
    "methods": (80, 60),
    "index": (50, 30),
    "zeroshot": (30, 50),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (< 3 min, 2 cores)")
    p.add_argument("--out", default="gpu_check", help="output folder (default ./gpu_check)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of the steps")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    return p.parse_args()


def run_child(name: str, args, work: Path, budget: float) -> dict:
    """Run one step in a child process group; kill the whole group at the time limit."""
    cmd = [sys.executable, __file__, "--step", name, "--out", str(args.out)]
    cmd += ["--dry-run"] if args.dry_run else []
    log = work / f"{name}.step.log"
    result_file, error_file = work / f"{name}.json", work / f"{name}.error"
    result_file.unlink(missing_ok=True)  # left by an earlier run of the check
    error_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    seconds = time.perf_counter() - t0
    if code == 0 and result_file.exists():
        return {
            "ok": True,
            "seconds": seconds,
            "budget_s": budget,
            **json.loads(result_file.read_text()),
        }
    error = f"over its {budget:.0f} s limit" if code is None else f"exit {code}"
    tail = (error_file if error_file.exists() else log).read_text()[-1500:]
    return {"ok": False, "seconds": seconds, "budget_s": budget, "error": f"{error}: {tail}"}


def environment() -> dict:
    import torch

    gpu = torch.cuda.is_available()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": os.cpu_count(),
    }


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"GPU check ({'dry run, CPU' if report['dry_run'] else 'full'}) on {env['device']}, "
        f"torch {env['torch']}, {env['date']}",
        "",
        "| step | ok | seconds (budget) | figures |",
        "|---|---|---|---|",
    ]
    for name, step in report["steps"].items():
        figures = {k: v for k, v in step.items() if k not in ("ok", "seconds", "budget_s")}
        text = fmt(figures).replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {name} | {'yes' if step['ok'] else 'NO'} | {step['seconds']:.0f} "
            f"({step['budget_s']:.0f}) | {text[:400]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    work = Path(args.out).resolve()
    args.out = str(work)
    if args.step:
        return run_step(args.step, args.dry_run, work)
    names = [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        print(f"unknown steps {unknown}; known: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    column = 1 if args.dry_run else 0
    plan = {name: BUDGETS[name][column] for name in names}
    print(f"time limits (s): {plan}; total {sum(plan.values())} s", flush=True)
    report = {"dry_run": args.dry_run, "environment": environment(), "steps": {}}
    for name in names:
        print(f"[{name}] limit {plan[name]} s ...", flush=True)
        report["steps"][name] = run_child(name, args, work, plan[name])
        step = report["steps"][name]
        print(f"[{name}] {'ok' if step['ok'] else 'FAILED'} in {step['seconds']:.0f} s", flush=True)
    (work / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {work / 'gpu_check.json'}, {work / 'gpu_check.md'}")
    return 0 if all(s["ok"] for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
