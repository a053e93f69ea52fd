"""The steps of scripts/gpu_check.py, one function each; every step returns a JSON-able dict.

Each step runs in its own child process (gpu_check.py starts `gpu_check.py --step NAME`), so its
time limit can end it, its children included, without taking the other steps down."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
PY = sys.executable

# Sizes of the full check (one H100/H200) and of the CPU dry run (model `test`, 32 px).
FULL = {
    "device": "cuda",
    "model": "ViT-B-16",
    "image_size": 224,
    "batch": 256,
    "train_steps": 40,
    "fp16_steps": 40,
    "log_every": 10,
    "workers": 12,
    "demo": {"train": 2048, "eval": 512, "probe": 256, "shard": 256},  # ~6 ms a 224 px image
    "resume_steps": 8,
    "resume_batch": 64,
    "methods_batch": 64,  # per GPU in SLIP's command, which A-CLIP's code follows: 4096 / 64 GPUs
    "methods_model": "ViT-B-16",
    "methods_rounds": 3,
    "index_n": 1_000_000,
    "index_dim": 512,
    "zeroshot_batch": 256,
}
DRY = {
    "device": "cpu",
    "model": "test",
    "image_size": 32,
    "batch": 16,
    "train_steps": 6,
    "fp16_steps": 4,  # CPU fp16 kernels are slow (2-3 s a step here)
    "log_every": 2,
    "workers": 1,
    "demo": {"train": 256, "eval": 64, "probe": 32, "shard": 64},
    "resume_steps": 3,
    "resume_batch": 8,
    "methods_batch": 8,
    "methods_model": "test",
    "methods_rounds": 1,
    "index_n": 20_000,
    "index_dim": 64,
    "zeroshot_batch": 32,
}


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd` (output to `log`), return its wall seconds; raise with the log tail on failure."""
    print(f"running (output in {log}): {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as sink:
        code = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} ... exited {code}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


def metrics(run_dir: Path) -> list[dict]:
    """The training records of a run's metrics.jsonl (one per --log-every steps)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r and "step" in r]


def pretrain_cmd(
    s: dict, work: Path, out: Path, precision: str, steps: int, batch: int, save_every: int = 0
) -> list:
    """`-m clipkit pretrain` arguments on the demo shards (checkpoint at the end by default)."""
    return [
        *("-m", "clipkit", "pretrain", "--data", str(work / "demo" / "train"), "--out", str(out)),
        *("--model", s["model"], "--image-size", str(s["image_size"]), "--device", s["device"]),
        *("--precision", precision, "--batch-size", str(batch), "--steps", str(steps)),
        *("--workers", str(s["workers"]), "--log-every", str(s["log_every"]), "--warmup", "5"),
        *("--save-every", str(save_every or steps), "--report-to", "none", "--seed", "0"),
    ]


def step_data(s: dict, work: Path) -> dict:
    """Demo WebDataset shards at the check's image size (the real `clipkit pretrain` input)."""
    d = s["demo"]
    cmd = [PY, "-m", "clipkit", "data", "demo", "--out", str(work / "demo")]
    cmd += ["--train-samples", str(d["train"]), "--eval-samples", str(d["eval"])]
    cmd += ["--probe-train-samples", str(d["probe"]), "--shard-size", str(d["shard"])]
    cmd += ["--image-size", str(s["image_size"])]
    seconds = run(cmd, work / "data.log")
    return {"train_samples": d["train"], "image_size": s["image_size"], "write_s": seconds}


def steady_rate(records: list[dict], batch: int) -> dict:
    """Samples/s after the first logged window (which holds start-up and autotuning)."""
    later = records[1:] or records
    samples_per_s = statistics.median(r["samples_per_s"] for r in later)
    return {
        "samples_per_s": samples_per_s,
        "steps_per_s": samples_per_s / batch,
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in later),
    }


def train(s: dict, work: Path, precision: str, steps: int) -> tuple[dict, list[dict]]:
    out = fresh(work / f"train-{precision}")
    cmd = [PY, *pretrain_cmd(s, work, out, precision, steps, s["batch"])]
    seconds = run(cmd, work / f"train-{precision}.log")
    records = metrics(out)
    rate = steady_rate(records, s["batch"])
    return {"model": s["model"], "batch": s["batch"], "wall_s": seconds, **rate}, records


def mfu_row(s: dict, work: Path, precision: str) -> dict:
    """scripts/bench/mfu.py: FLOPs per sample, the measured matmul rate, its own synthetic use."""
    cmd = [PY, str(SCRIPTS / "bench" / "mfu.py"), "--device", s["device"], "--model", s["model"]]
    cmd += ["--batch", str(s["batch"]), "--precision", precision]
    cmd += [] if s["device"] == "cuda" else ["--quick"]
    run(cmd, work / f"mfu-{precision}.log")
    return json.loads((work / f"mfu-{precision}.log").read_text().strip().splitlines()[-1])


def step_bf16(s: dict, work: Path) -> dict:
    """bf16 `clipkit pretrain` throughput, and its hardware use (model FLOPs x samples/s over
    the matmul rate mfu.py measures in bf16)."""
    result, _ = train(s, work, "bf16", s["train_steps"])
    mfu = mfu_row(s, work, "bf16")
    result["flops_per_sample"] = mfu["flops_per_sample"]
    result["matmul_flops"] = mfu["matmul_flops"]
    result["hardware_use"] = mfu["flops_per_sample"] * result["samples_per_s"] / mfu["matmul_flops"]
    result["hardware_use_synthetic"] = mfu["clipkit"]  # mfu.py's own step on random tensors
    return result


def step_fp16(s: dict, work: Path) -> dict:
    """fp16 with loss scaling: throughput, skipped steps and the final loss scale."""
    result, records = train(s, work, "fp16", s["fp16_steps"])
    last = records[-1]
    result["scaler_skipped_steps"] = last["scaler_skipped_steps"]
    result["loss_scale"] = last["loss_scale"]
    result["final_loss"] = last["loss"]
    return result


def step_resume(s: dict, work: Path) -> dict:
    """torchrun (one process; NCCL on CUDA, gloo on CPU): 2N steps straight through, saving at
    step N; a second run dir gets that step-N checkpoint alone (as a run killed after step N
    would have) and `--resume`s it to 2N. The losses of steps N+1..2N must match."""
    n, batch = s["resume_steps"], s["resume_batch"]
    launch = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    quick = {**s, "log_every": 1}
    straight, parted = fresh(work / "resume-straight"), fresh(work / "resume-parted")
    precision = "fp32"  # bf16 rounding would hide a resume bug behind its own noise
    cmd = [*launch, *pretrain_cmd(quick, work, straight, precision, 2 * n, batch, n)]
    run(cmd, work / "resume-straight.log")
    (parted / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(straight / "config.yaml", parted / "config.yaml")
    shutil.copy(straight / "checkpoints" / f"step-{n}.pt", parted / "checkpoints")
    cmd = [*launch, *pretrain_cmd(quick, work, parted, precision, 2 * n, batch, n)]
    run([*cmd, "--resume"], work / "resume-parted.log")
    ref = {r["step"]: r["loss"] for r in metrics(straight)}
    got = {r["step"]: r["loss"] for r in metrics(parted)}
    if sorted(got) != list(range(n + 1, 2 * n + 1)):
        raise RuntimeError(f"resumed run logged steps {sorted(got)}, expected {n + 1}..{2 * n}")
    diff = max(abs(got[k] - ref[k]) for k in got)
    tolerance = 1e-4 if s["device"] == "cuda" else 1e-6  # GPU kernels may reorder sums
    if diff > tolerance:
        raise RuntimeError(f"resumed losses differ from the straight run by {diff:g}")
    backend = "nccl" if s["device"] == "cuda" else "gloo"
    return {"backend": backend, "steps": 2 * n, "resumed_at": n, "max_loss_diff": diff}


def step_methods(s: dict, work: Path) -> dict:
    """scripts/bench_methods.py: time per sample of A-CLIP, A-CLIP-eff, FLIP relative to CLIP."""
    out = work / "methods.json"
    cmd = [PY, str(SCRIPTS / "bench_methods.py"), "--device", s["device"]]
    cmd += ["--model", s["methods_model"], "--batch-size", str(s["methods_batch"])]
    cmd += ["--methods", "clip,aclip,aclip-eff,flip", "--rounds", str(s["methods_rounds"])]
    cmd += ["--steps", "2", "--warmup", "2", "--out", str(out)]
    run(cmd, work / "methods.log")
    result = json.loads(out.read_text())
    rows = {r["method"]: r["ratio_to_clip"] for r in result["rows"]}
    return {"model": result["model"], "batch": result["batch_size"], "ratio_to_clip": rows,
            "ms_per_sample": {r["method"]: r["ms_per_sample"] for r in result["rows"]}}  # fmt: skip


def step_index(s: dict, work: Path) -> dict:
    """clipkit.index.build_index (IVF-flat, on GPU when faiss sees one) on clustered unit
    vectors: build time, then clipkit.index.tune_index raises nprobe until recall@10 against
    brute-force inner product reaches 0.95 and times the search there."""
    from clipkit import index as ix

    n, dim = s["index_n"], s["index_dim"]
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(16, n // 500), dim)).astype("float32")
    x = centers[rng.integers(0, len(centers), n)]
    x += 0.35 * rng.standard_normal((n, dim)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = ix.make_queries(x, 1000, seed=1, noise=0.2)
    t0 = time.perf_counter()
    index = ix.build_index(x, kind="ivf-flat", use_gpu="auto")
    build_s = time.perf_counter() - t0
    tuning = ix.tune_index(index, x, target_recall=0.95, k=10, queries=queries)
    return {"vectors": n, "dim": dim, "kind": "ivf-flat", "on_gpu": ix.to_cpu(index) is not index,
            "build_s": build_s, "nprobe": tuning["value"], "recall_at_10": tuning["recall"],
            "queries_per_s": 1e3 / tuning["batch_ms_per_query"],
            "single_query_ms": tuning["median_query_ms"]}  # fmt: skip


def step_zeroshot(s: dict, work: Path) -> dict:
    """Zero-shot images/s of clipkit's evaluation (a randomly initialised model: speed only),
    on the demo `shape` test split; one warm-up pass first. The rate includes data-worker
    start-up, as a user's `clipkit zero-shot` run does."""
    import torch

    from clipkit.config import ModelConfig
    from clipkit.data.eval_sets import classification_set
    from clipkit.data.tokenize import build_tokenizer
    from clipkit.data.transforms import eval_transform
    from clipkit.eval import LoaderSettings
    from clipkit.eval.loading import LoadedModel
    from clipkit.eval.zero_shot import run_zero_shot
    from clipkit.models import factory

    cfg = ModelConfig(name=s["model"], image_size=s["image_size"])
    device = torch.device(s["device"])
    model = factory.build(cfg).eval().to(device)
    prep = factory.preprocess(cfg.arch)
    loaded = LoadedModel(model=model, preprocess=eval_transform(prep),
                         tokenizer=build_tokenizer(prep), arch=cfg.arch, name=s["model"],
                         pretrained="random", sha256=None, method="clip")  # fmt: skip
    reading = LoaderSettings(batch_size=s["zeroshot_batch"], workers=s["workers"])
    rates = []
    for _ in range(2):
        data = classification_set(
            "demo", str(work / "demo"), "test", loaded.preprocess, task="shape"
        )
        t0 = time.perf_counter()
        out = run_zero_shot(loaded, data, device=device, reading=reading)
        rates.append(out["clipkit"]["num_samples"] / (time.perf_counter() - t0))
    return {"images": out["clipkit"]["num_samples"], "batch": s["zeroshot_batch"],
            "images_per_s": rates[-1], "images_per_s_first_pass": rates[0]}  # fmt: skip


STEPS = {
    "data": step_data,
    "bf16": step_bf16,
    "fp16": step_fp16,
    "resume": step_resume,
    "methods": step_methods,
    "index": step_index,
    "zeroshot": step_zeroshot,
}


def fresh(run_dir: Path) -> Path:
    """An empty run directory: a re-run of the check must not meet its earlier run's files."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def run_step(name: str, dry: bool, work: Path) -> int:
    """Child-process entry: run one step and write WORK/NAME.json, or its error to NAME.error."""
    os.environ.setdefault("PYTHONPATH", str(SCRIPTS.parent))
    try:
        result = STEPS[name](DRY if dry else FULL, work)
    except Exception as e:  # recorded for the report; the exit code tells the parent
        (work / f"{name}.error").write_text(f"{type(e).__name__}: {e}")
        raise
    (work / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0
