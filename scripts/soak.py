#!/usr/bin/env python
"""Soak test: a tiny run killed (SIGKILL, or SIGTERM every third time) at random moments and
resumed again and again must end with exactly the weights of an uninterrupted run.

    .venv/bin/python scripts/soak.py --steps 2000 --kills 20
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clipkit.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")


def cmd(data: Path, out: Path, steps: int, resume: bool) -> list[str]:
    c = [
        PY,
        "-m",
        "clipkit",
        "pretrain",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "test",
        "--steps",
        str(steps),
        "--batch-size",
        "16",
        "--workers",
        "2",
        "--threads",
        "1",
        "--lr",
        "1e-3",
        "--warmup",
        "20",
        "--log-every",
        "10",
        "--save-every",
        "25",
        "--keep-last",
        "2",
        "--shuffle-buffer",
        "200",
        "--seed",
        "7",
    ]
    return c + (["--resume"] if resume else [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="clipkit-soak-"))
    data = work / "data"
    subprocess.run(
        [
            PY,
            "-m",
            "clipkit",
            "data",
            "demo",
            "--out",
            str(data),
            "--train-samples",
            "2000",
            "--eval-samples",
            "50",
            "--probe-train-samples",
            "50",
            "--image-size",
            "32",
            "--shard-size",
            "250",
        ],
        check=True,
        capture_output=True,
    )
    t0 = time.time()
    subprocess.run(
        cmd(data / "train", work / "ref", args.steps, False), check=True, capture_output=True
    )
    full_s = time.time() - t0
    run, kills, log = work / "soak", 0, []
    while True:
        resume = RunDir(run).latest.exists()
        proc = subprocess.Popen(
            cmd(data / "train", run, args.steps, resume),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if kills < args.kills:
            delay = rng.uniform(2.0, max(3.0, full_s / 4))
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                sig = signal.SIGTERM if kills % 3 == 2 else signal.SIGKILL
                proc.send_signal(sig)
                proc.wait()
                kills += 1
                step = (
                    torch.load(RunDir(run).latest, weights_only=True)["step"]
                    if RunDir(run).latest.exists()
                    else 0
                )
                log.append(
                    {
                        "kill": kills,
                        "signal": sig.name,
                        "after_s": round(delay, 1),
                        "checkpoint_step": step,
                    }
                )
                print(json.dumps(log[-1]), flush=True)
                continue
        else:
            proc.wait()
        if proc.returncode != 0:
            print(f"run failed with exit code {proc.returncode}")
            return 1
        break
    ref = torch.load(RunDir(work / "ref").latest, weights_only=True)
    got = torch.load(RunDir(run).latest, weights_only=True)
    same = ref["step"] == got["step"] and all(
        torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"]
    )
    summary = {
        "steps": args.steps,
        "kills": kills,
        "final_step": got["step"],
        "weights_identical": same,
        "work_dir": str(work),
    }
    print(json.dumps(summary))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
