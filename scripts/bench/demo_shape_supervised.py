"""How much shape can the demo's image tower learn at all? A supervised check for issue 21.

Trains the image tower of a clipkit preset (default `tiny-rn-64`, the demo's model) plus a linear
head on the shape labels of the demo's training pairs with cross-entropy, for the demo's steps and
batch, with `clipkit pretrain`'s optimizer, weight-decay rule and learning-rate schedule
(clipkit.train.optim) and the model's evaluation preprocessing, and reports shape accuracy on:
training images, new images of training (shape, colour) pairs, and images of held-out pairs (the
probe split's, and the zero-shot test split that `clipkit zero-shot demo --task shape` scores).
The held-out figure is what the demo's zero-shot shape can be compared with. Prints one JSON line.

    .venv/bin/clipkit data demo --out demo_out/data --seed 0 --train-samples 20000
    .venv/bin/python scripts/bench/demo_shape_supervised.py --data-root demo_out/data
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from clipkit.config import ModelConfig, OptimConfig
from clipkit.data.demo_draw import SHAPES
from clipkit.data.eval_io import iter_tar_samples
from clipkit.data.transforms import eval_transform
from clipkit.models import factory
from clipkit.train.optim import build_optimizer, lr_at, set_lr


def load_split(pattern: str, to_tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """Images, shape labels and (shape, colour) of every sample of the shards `pattern` names
    (captioned shards carry the attributes in key.json, labelled ones too)."""
    images, labels, pairs = [], [], []
    for shard in sorted(glob.glob(pattern)):
        for _, fields in iter_tar_samples(shard):
            attrs = json.loads(fields["json"])
            data = fields.get("jpg") or fields["png"]
            images.append(to_tensor(Image.open(io.BytesIO(data)).convert("RGB")))
            labels.append(SHAPES.index(attrs["shape"]))
            pairs.append((attrs["shape"], attrs["colour"]))
    if not images:
        raise SystemExit(f"no samples under {pattern}")
    return torch.stack(images), torch.tensor(labels), pairs


def accuracy(classify, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    with torch.no_grad():
        preds = torch.cat(
            [classify(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)]
        )
    return float((preds == labels).float().mean()) if len(labels) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-root", required=True, help="a `clipkit data demo` output folder")
    ap.add_argument("--model", default="tiny-rn-64")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    root = Path(args.data_root)

    cfg = ModelConfig(name=args.model)
    cfg.arch = factory.resolve_arch(cfg)
    tower = factory.build(cfg).visual
    to_tensor = eval_transform(factory.preprocess(cfg.arch))
    train_x, train_y, _ = load_split(str(root / "train" / "*.tar"), to_tensor)
    probe_x, probe_y, probe_pairs = load_split(str(root / "zeroshot/shape/train/*.tar"), to_tensor)
    test_x, test_y, _ = load_split(str(root / "zeroshot/shape/test/*.tar"), to_tensor)
    held = {tuple(p) for p in json.loads((root / "demo.json").read_text())["held_out_combos"]}

    head = nn.Linear(tower.output_dim, len(SHAPES))
    optim_cfg = OptimConfig(lr=args.lr, warmup=args.warmup)
    optimizer = build_optimizer(nn.ModuleList([tower, head]), optim_cfg, torch.device("cpu"))
    t0 = time.perf_counter()
    for step in range(args.steps):
        set_lr(optimizer, lr_at(step, args.steps, optim_cfg))
        idx = torch.randint(0, len(train_x), (args.batch,))
        loss = nn.functional.cross_entropy(head(tower(train_x[idx])), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0

    tower.eval()  # BatchNorm with its running statistics, as evaluation uses it

    def classify(x):
        return head(tower(x))

    is_held = torch.tensor([pair in held for pair in probe_pairs])
    print(json.dumps({
        "model": args.model,
        "steps": args.steps,
        "batch": args.batch,
        "train_seconds": round(seconds, 1),
        "final_loss": round(loss.item(), 4),
        "acc_training_images": accuracy(classify, train_x[:2000], train_y[:2000]),
        "acc_new_images_seen_pairs": accuracy(classify, probe_x[~is_held], probe_y[~is_held]),
        "acc_new_images_held_out_pairs": accuracy(classify, probe_x[is_held], probe_y[is_held]),
        "acc_zeroshot_test_split": accuracy(classify, test_x, test_y),
        "threads": torch.get_num_threads(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
