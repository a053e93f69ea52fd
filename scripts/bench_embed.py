#!/usr/bin/env python
"""Embedding throughput (issue 19): `clipkit retrieve embed` side by side with
`clip-retrieval inference` on the same webdataset shards and the same open_clip model and weights.

    python scripts/bench_embed.py                      # docs/bench-embed.json
    python scripts/bench_embed.py --rounds 1 --samples 250 --out /tmp/e.json

The shards: `clipkit data demo --shard-size S --image-size 64` (captions, images, json
metadata). The model: the registered open_clip architecture --arch (ViT-S-32 by default, the
smallest ViT both open_clip versions register with the same config) with random weights written
once to a local file (throughput only); clipkit loads it with `--model ARCH --pretrained FILE`,
clip-retrieval with `--clip_model open_clip:ARCH/FILE` (all_clip hands FILE to open_clip as its
`pretrained`). Nothing is downloaded: HF_HUB_OFFLINE=1, CPU only.

Four configurations, run in alternating rounds (A B C D, A B C D) so slow phases of the shared
machine hit each alike:
  clipkit 1: one process, --workers 0;  clipkit 2: torchrun --nproc_per_node 2, --workers 0
  (shard i on rank i % 2);  clip-retrieval 1: --num_prepro_workers 0;  clip-retrieval 2:
  --num_prepro_workers 1 (decoding in a second process). clip-retrieval's only way to run the
  model in several processes is its pyspark / slurm distribution, and pyspark is not in its venv.

Images/s from each tool's own timing, model loading excluded: clipkit's `images embedded in Xs`
(the slowest rank's loop, parts written); clip-retrieval's stats file (the sum of its per-batch
read + inference + write times). Wall time of the whole command is recorded too. Last, the
two tools' 1-process embeddings of each image and caption are compared (matched by key): the
smallest cosine, which says both ran the same model on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from measure import run_measured  # noqa: E402

CLIPKIT_TIME = re.compile(r"(\d+) images embedded in ([\d.]+)s")


def clipkit_rate(log_text: str) -> tuple[int, float]:
    """(images, seconds) from `retrieve embed`'s closing line."""
    found = CLIPKIT_TIME.findall(log_text)
    if not found:
        raise RuntimeError("no 'images embedded in' line in clipkit's output")
    images, seconds = found[-1]
    return int(images), float(seconds)


def clip_retrieval_rate(stats: list[dict]) -> tuple[int, float]:
    """(images, seconds) from clip-retrieval's per-partition stats files: each holds the sums,
    over its batches, of sample_count and of total_duration (read + inference + write)."""
    images = sum(int(s["sample_count"]) for s in stats)
    seconds = sum(float(s["total_duration"]) for s in stats)
    if images == 0 or seconds <= 0:
        raise RuntimeError("clip-retrieval wrote no stats of embedded samples")
    return images, seconds


def load_parts(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image rows, caption rows and keys of an embedding folder, parts in numeric order."""
    import pandas as pd

    def part_no(path: Path) -> int:
        return int(path.stem.rsplit("_", 1)[1])

    metas = sorted((folder / "metadata").glob("metadata_*.parquet"), key=part_no)
    nums = [part_no(m) for m in metas]
    width = len(metas[0].stem.rsplit("_", 1)[1]) if metas else 1
    images = [np.load(folder / "img_emb" / f"img_emb_{n:0{width}d}.npy") for n in nums]
    texts = [np.load(folder / "text_emb" / f"text_emb_{n:0{width}d}.npy") for n in nums]
    keys = [k for m in metas for k in pd.read_parquet(m)["image_path"].tolist()]
    return np.concatenate(images), np.concatenate(texts), keys


def matched_cosines(a: np.ndarray, a_keys: list, b: np.ndarray, b_keys: list) -> np.ndarray:
    """Cosine of each row of `a` with the row of `b` under the same key."""
    where = {k: n for n, k in enumerate(b_keys)}
    b = b[[where[k] for k in a_keys]].astype(np.float64)
    a = a.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def agreement(work: Path) -> dict:
    """How close the two tools' 1-process embeddings of the same images and captions are."""
    ours = load_parts(work / "out-clipkit-1")
    theirs = load_parts(work / "out-clip-retrieval-1")
    result = {}
    for n, name in enumerate(("image", "text")):
        cos = matched_cosines(theirs[n], theirs[2], ours[n], ours[2])
        result[name] = {"rows": len(cos), "min_cosine": float(cos.min())}
    return result


def make_inputs(work: Path, args) -> tuple[list[Path], Path]:
    """Demo shards and a random-weight file of --arch, both reused when present."""
    data = work / "data"
    shards = sorted((data / "train").glob("*.tar"))
    if len(shards) * args.shard_size != args.samples:
        cmd = [sys.executable, "-m", "clipkit", "data", "demo", "--out", str(data)]
        cmd += ["--train-samples", str(args.samples), "--shard-size", str(args.shard_size)]
        cmd += ["--eval-samples", "10", "--probe-train-samples", "10", "--image-size", "64"]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        shards = sorted((data / "train").glob("*.tar"))
    weights = work / f"{args.arch}-random.pt"
    if not weights.exists():
        import open_clip
        import torch

        torch.manual_seed(0)
        torch.save(open_clip.create_model(args.arch).state_dict(), weights)
    return shards, weights


def clipkit_cmd(procs: int, shards: list[Path], weights: Path, out: Path, args) -> list[str]:
    if procs == 1:
        cmd = [sys.executable, "-m", "clipkit"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        cmd += ["-m", "clipkit"]
    cmd += ["retrieve", "embed", "--model", args.arch, "--pretrained", str(weights)]
    cmd += ["--data", str(shards[0].parent), "--out", str(out)]
    return cmd + ["--batch-size", str(args.batch_size), "--workers", "0", "--device", "cpu"]


def clip_retrieval_cmd(procs: int, shards: list[Path], weights: Path, out: Path, args):
    exe = str(Path(args.clip_retrieval_venv) / "bin" / "clip-retrieval")
    last = len(shards) - 1
    pattern = str(shards[0].parent / f"shard-{{000000..{last:06d}}}.tar")
    cmd = [exe, "inference", "--input_dataset", pattern, "--output_folder", str(out)]
    cmd += ["--input_format", "webdataset", "--clip_model", f"open_clip:{args.arch}/{weights}"]
    cmd += ["--batch_size", str(args.batch_size), "--num_prepro_workers", str(procs - 1)]
    cmd += ["--enable_text", "True", "--enable_metadata", "True", "--use_jit", "False"]
    return cmd + ["--wds_number_file_per_input_file", str(args.shard_size)]


def run_one(tool: str, procs: int, shards, weights, work: Path, args) -> dict:
    out = work / f"out-{tool}-{procs}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(ROOT)
    log = work / f"{tool}-{procs}.log"
    make = clipkit_cmd if tool == "clipkit" else clip_retrieval_cmd
    row = {"tool": tool, "processes": procs}
    row.update(run_measured(make(procs, shards, weights, out, args), log, cwd=ROOT, env=env))
    if tool == "clipkit":
        images, seconds = clipkit_rate(log.read_text())
    else:
        stats = [json.loads(p.read_text()) for p in (out / "stats").glob("[0-9]*.json")]
        images, seconds = clip_retrieval_rate(stats)
    row.update(images=images, loop_s=seconds, images_per_s=images / seconds)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=250, help="images in all shards")
    ap.add_argument("--shard-size", type=int, default=125)
    ap.add_argument("--arch", default="ViT-S-32", help="registered open_clip architecture")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clip-retrieval-venv", default=str(ROOT / ".venv-clipretrieval"))
    ap.add_argument("--work", default=str(ROOT / ".bench" / "embed"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-embed.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards, weights = make_inputs(work, args)
    configs = [("clipkit", 1), ("clip-retrieval", 1), ("clipkit", 2), ("clip-retrieval", 2)]
    rows = []
    for round_no in range(args.rounds):
        for tool, procs in configs:
            rows.append(dict(run_one(tool, procs, shards, weights, work, args), round=round_no))
    result = {
        "samples": args.samples,
        "shards": len(shards),
        "arch": args.arch,
        "batch_size": args.batch_size,
        "machine": {"cpus": os.cpu_count(), "load_avg_end": os.getloadavg()},
        "runs": rows,
        "agreement": agreement(work),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
