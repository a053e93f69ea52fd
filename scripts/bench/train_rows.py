"""The training rows of scripts/bench.py: `clipkit pretrain` against `open_clip_train.main` on the
same demo shards, model, batch, workers, learning rate and clipping, one after the other in
alternating rounds (run-to-run spread on a shared machine is wide), medians over the rounds.

Models: `tiny` (data-bound: 32 px, 4+4 layers of width 128, batch 100) and two compute-bound
open_clip registry models at a small batch (ViT-S-32 at 32, ViT-B-32 at 16), where the model
step dominates and any overhead of the trainer's own loop shows. The `profile` row runs both
trainers in-process under scripts/bench/step_profile.py and splits a step into its phases.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = ROOT / ".venv" / "bin" / "python"
REF_PY = ROOT / ".venv-openclip" / "bin" / "python"

# The reference architecture: image 32, patch 4, width 128, 4+4 layers, embed 128, ctx 32.
TINY = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
TINY_NAME = "clipkit-bench-tiny"


# name -> (open_clip model, batch, steps quick, steps full, lr, warmup, log every)
TRAIN_MODELS = {
    "tiny": (TINY_NAME, 100, 60, 200, 1e-3, 10, 10),
    "vit-s-32": ("ViT-S-32", 32, 12, 24, 1e-4, 2, 1),
    "vit-b-32": ("ViT-B-32", 16, 12, 24, 1e-4, 2, 1),
}
WORKERS = 2
SKIP = 2  # logged windows left out of the median: start-up, first allocations


def cpu_model() -> str:
    """The CPU's model name from lscpu: figures from different CPUs are never compared."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    names = re.findall(r"^Model name:\s*(.+)$", out, flags=re.M)
    cores = re.findall(r"^CPU\(s\):\s*(\d+)$", out, flags=re.M)
    return f"{names[0].strip() if names else 'unknown'}, {cores[0] if cores else '?'} CPUs"


def steady(values: list[float]) -> float:
    """Median after the first windows (start-up), or of all where there are few."""
    return statistics.median(values[SKIP:] if len(values) > SKIP + 1 else values)


def register_tiny() -> Path:
    """TINY under its name in both venvs' reach: a JSON for clipkit, a model config for
    open_clip's registry in the reference venv. Returns clipkit's JSON."""
    cfg_dir = next((ROOT / ".venv-openclip" / "lib").glob("python3*/site-packages/open_clip"))
    (cfg_dir / "model_configs" / f"{TINY_NAME}.json").write_text(json.dumps(TINY))
    path = ROOT / ".bench" / "tiny.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(TINY))
    return path


def clipkit_args(shards: Path, model: str, batch: int, steps: int, lr, warmup, log_every) -> list:
    return [
        *("--data", str(shards), "--model", model, "--steps", str(steps)),
        *("--batch-size", str(batch), "--workers", str(WORKERS), "--lr", str(lr)),
        *("--warmup", str(warmup), "--log-every", str(log_every), "--save-every", str(10 * steps)),
    ]


def open_clip_args(pattern: str, model: str, batch: int, steps: int, lr, warmup, log_every) -> list:
    return [
        *("--train-data", pattern, "--train-num-samples", str(steps * batch)),
        *("--dataset-type", "webdataset", "--batch-size", str(batch), "--workers", str(WORKERS)),
        *("--model", model, "--epochs", "1", "--precision", "fp32", "--lr", str(lr)),
        *("--warmup", str(warmup), "--log-every-n-steps", str(log_every), "--save-frequency", "0"),
        *("--zeroshot-frequency", "0", "--val-frequency", "0", "--name", "bench"),
        *("--report-to", "", "--seed", "0"),
        *("--grad-clip-norm", "1.0"),  # clipkit clips at 1.0 by default: the same work
    ]


def run_clipkit(shards: Path, args: list, peak_rss) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-clipkit-"))
    cmd = [str(PY), "-m", "clipkit", "pretrain", "--out", str(out / "run"), *args]
    peak_mb = peak_rss(cmd)
    recs = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    recs = [r for r in recs if "samples_per_s" in r]
    return {
        "samples_per_s": steady([r["samples_per_s"] for r in recs]),
        "data_wait_frac": steady([r["data_wait_frac"] for r in recs]),
        "peak_rss_mb": peak_mb,
    }


def run_open_clip(args: list, batch: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-openclip-"))
    cmd = [str(REF_PY), "-m", "open_clip_train.main", "--logs", str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    log = res.stdout + res.stderr
    shutil.rmtree(out)
    if res.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{log[-3000:]}")
    times = [float(m) for m in re.findall(r"Batch \(t\): ([0-9.]+)", log)]
    return {"samples_per_s": steady([batch / t for t in times])}


def row_train(name: str, shards: Path, pattern: str, quick: bool, repeats: int, peak_rss) -> dict:
    model, batch, quick_steps, full_steps, lr, warmup, log_every = TRAIN_MODELS[name]
    steps = quick_steps if quick else full_steps
    ours_model = str(register_tiny()) if model == TINY_NAME else model
    ours, ref, mem, wait = [], [], [], []
    for _ in range(repeats):
        settings = (batch, steps, lr, warmup, log_every)
        r = run_clipkit(shards, clipkit_args(shards, ours_model, *settings), peak_rss)
        ours.append(r["samples_per_s"])
        mem.append(r["peak_rss_mb"])
        wait.append(r["data_wait_frac"])
        ref.append(run_open_clip(open_clip_args(pattern, model, *settings), batch)["samples_per_s"])
    a, b = statistics.median(ours), statistics.median(ref)
    return {
        "row": f"training samples/s ({name}, batch {batch}, {WORKERS} workers, fp32, "
        f"{steps} steps)",
        "clipkit": a,
        "reference": b,
        "ratio": a / b,
        "clipkit_runs": ours,
        "reference_runs": ref,
        "clipkit_data_wait_frac": statistics.median(wait),
        "clipkit_peak_rss_mb": max(mem),
    }


def profile_once(tool: str, args: list) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"profile-{tool}-"))
    py = PY if tool == "clipkit" else REF_PY
    cmd = [str(py), str(HERE / "step_profile.py"), tool, str(out / "run"), "--", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    shutil.rmtree(out)
    if res.returncode != 0:
        raise RuntimeError(f"{tool} profile failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def row_profile(shards: Path, pattern: str, quick: bool, repeats: int) -> dict:
    """Per-phase seconds per step of both trainers on ViT-S-32 (medians over alternating runs)."""
    model, batch, quick_steps, full_steps, lr, warmup, _ = TRAIN_MODELS["vit-s-32"]
    steps = quick_steps if quick else full_steps
    settings = (batch, steps, lr, warmup, 1)  # log every step on both: logging is in the loop
    runs = {"clipkit": [], "open_clip": []}
    for _ in range(repeats):
        runs["clipkit"].append(profile_once("clipkit", clipkit_args(shards, model, *settings)))
        runs["open_clip"].append(
            profile_once("open_clip", open_clip_args(pattern, model, *settings))
        )
    medians = {tool: median_profile(rs) for tool, rs in runs.items()}
    a, b = medians["clipkit"]["seconds_per_step"], medians["open_clip"]["seconds_per_step"]
    return {
        "row": f"step profile, s/step ({model}, batch {batch}, fp32; ratio = open_clip / clipkit)",
        "clipkit": a,
        "reference": b,
        "ratio": b / a,
        "profile": medians,
        "runs": runs,
    }


def median_profile(runs: list[dict]) -> dict:
    phases = sorted({k for r in runs for k in r["phases_s"]})
    return {
        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
        "phases_s": {k: statistics.median(r["phases_s"].get(k, 0.0) for r in runs) for k in phases},
        "trainer_cores": statistics.median(r["trainer_cores"] for r in runs),
        "worker_cores": statistics.median(r["worker_cores"] for r in runs),
    }
