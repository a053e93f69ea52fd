"""Training time per sample of CLIP, FLIP, A-CLIP, A-CLIP-eff and AttMask-high on the same ViT.

One training step = forward + backward + grad clip + AdamW step + `after_step` (the EMA update),
on synthetic tensors (no data loading, no decoding: the extra views A-CLIP's loader makes are not
counted). Each method gets its own model built from the same seed. After warm-up steps, rounds
alternate the methods (so a slow spell on a shared machine hits all of them) and each round times
a few steps; the table reports the median (and the minimum: the step least disturbed by other
processes) time per sample, each with its ratio to CLIP's. The paper's
targets (A-CLIP arXiv 2212.08653, README table): A-CLIP <= 1.16x CLIP, A-CLIP-eff <= 0.86x, and
FLIP at 50% removal well under 1x.

    .venv/bin/python scripts/bench_methods.py --quick            # ~1-2 min on 2 CPU cores
    .venv/bin/python scripts/bench_methods.py --device cuda      # full: ViT-S/16 at 224 px
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from clipkit.methods import list_methods

# Every registered method, CLIP first (the ratios are against it).
METHODS = ("clip", *(name for name in list_methods() if name != "clip"))
TARGETS = {"flip": "well under 1x (50% removed)", "aclip": "<= 1.16x", "aclip-eff": "<= 0.86x"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny-64 model, few rounds (~1-2 min)")
    p.add_argument("--model", help="clipkit preset / open_clip name (default: quick tiny-64, "
                   "full vit-s-16)")  # fmt: skip
    p.add_argument("--image-size", type=int, help="override the model's image size")
    p.add_argument("--batch-size", type=int, help="samples per step (default 32)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 5; quick 3)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument(
        "--ssl-hidden-dim",
        type=int,
        help="A-CLIP SSL head width (default: the paper's 4096 scaled by ViT width / 768)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench_methods.json", help="JSON results file")
    args = p.parse_args()
    args.model = args.model or ("tiny-64" if args.quick else "vit-s-16")
    args.batch_size = args.batch_size or 32
    args.rounds = args.rounds or (3 if args.quick else 5)
    return args


def build(method_name: str, args, device: torch.device):
    """(method, optimizer) for one method on a freshly built model (same seed for all)."""
    from clipkit import methods
    from clipkit.config import MethodConfig, ModelConfig, OptimConfig
    from clipkit.models import factory
    from clipkit.train.optim import build_optimizer

    torch.manual_seed(0)
    model = factory.build(ModelConfig(name=args.model, image_size=args.image_size))
    cfg = MethodConfig(name=method_name)
    if hasattr(cfg.settings, "ssl_hidden_dim"):  # the A-CLIP family's SSL heads
        cfg.settings.ssl_hidden_dim = args.ssl_hidden_dim
    method = methods.build(cfg, model).to(device).train()
    return method, build_optimizer(method, OptimConfig(), device)


def synthetic_batch(method, arch: dict, args, device: torch.device) -> dict:
    """Random tensors in the batch contract of the method's views (boxes: a fixed inner crop)."""
    from clipkit.models.factory import context_length, image_size

    size, batch = image_size(arch), args.batch_size
    out = {
        "image": torch.randn(batch, 3, size, size),
        "text": torch.randint(1, 49000, (batch, context_length(arch))),
    }
    views = method.views
    if views.online_views:
        teacher = views.teacher_size or size
        out["views"] = torch.randn(views.online_views, batch, 3, size, size)
        out["teacher_image"] = torch.randn(batch, 3, teacher, teacher)
        box = torch.tensor([0.1, 0.05, 0.9, 0.8])
        out["boxes"] = box.repeat(batch, views.online_views, 1)
    return {k: v.to(device) for k, v in out.items()}


def train_step(method, optimizer, batch: dict, step: int, autocast) -> None:
    with autocast():
        loss, _ = method(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step(step, 10_000)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run(args) -> dict:
    from contextlib import nullcontext

    from clipkit.config import ModelConfig
    from clipkit.models import factory

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = factory.resolve_arch(ModelConfig(name=args.model, image_size=args.image_size))
    if args.ssl_hidden_dim is None:  # heads sized like the paper's relative to the ViT
        width = arch["model_cfg"]["vision_cfg"]["width"]
        args.ssl_hidden_dim = max(64, round(4096 * width / 768))
    names = [m.strip() for m in args.methods.split(",") if m.strip()]

    def autocast():
        if device.type != "cuda":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)  # the trainer's CUDA default

    setups = {}
    for name in names:
        method, optimizer = build(name, args, device)
        setups[name] = [method, optimizer, synthetic_batch(method, arch, args, device), 0]
    per_sample: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds + 1):  # round 0 is the warm-up
        for name in names:
            method, optimizer, batch, _ = setups[name]
            steps = args.warmup if round_ == 0 else args.steps
            for _ in range(steps):
                setups[name][3] += 1
                step = partial(train_step, method, optimizer, batch, setups[name][3], autocast)
                seconds = timed(step, device)
                if round_ > 0:
                    per_sample[name].append(seconds / args.batch_size)
    return summarise(args, arch, per_sample, device)


def summarise(args, arch: dict, per_sample: dict[str, list[float]], device) -> dict:
    from clipkit.models.factory import image_size

    median = {name: statistics.median(times) for name, times in per_sample.items()}
    base = median.get("clip")
    rows = []
    for name, seconds in median.items():
        ratio = seconds / base if base else None
        rows.append({"method": name, "ms_per_sample": 1e3 * seconds, "ratio_to_clip": ratio})
        rows[-1]["paper_target"] = TARGETS.get(name, "1x" if name == "clip" else "-")
        fastest = min(per_sample[name])  # least disturbed by other processes on a shared machine
        rows[-1]["min_ms_per_sample"] = 1e3 * fastest
        rows[-1]["min_ratio_to_clip"] = fastest / min(per_sample["clip"]) if base else None
        rows[-1]["max_ms_per_sample"] = 1e3 * max(per_sample[name])
    vision = arch.get("model_cfg", {}).get("vision_cfg", {})
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, {device}",
        "torch": torch.__version__,
        "model": args.model,
        "image_size": image_size(arch),
        "vision": {k: vision.get(k) for k in ("patch_size", "width", "layers")},
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "ssl_hidden_dim": args.ssl_hidden_dim,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(
        f"{result['model']} @ {result['image_size']}px {result['vision']}, batch "
        f"{result['batch_size']}, {result['machine']}"
    )
    print(f"{'method':<14}{'median ms':>10}{'x CLIP':>8}{'min ms':>9}{'x CLIP':>8}  paper target")
    for row in result["rows"]:
        ratios = [row["ratio_to_clip"], row["min_ratio_to_clip"]]
        med, low = (f"{r:.2f}" if r is not None else "-" for r in ratios)
        print(
            f"{row['method']:<14}{row['ms_per_sample']:>10.2f}{med:>8}"
            f"{row['min_ms_per_sample']:>9.2f}{low:>8}  {row['paper_target']}"
        )


def main() -> None:
    args = parse_args()
    result = run(args)
    print_table(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
