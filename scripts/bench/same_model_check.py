#!/usr/bin/env python
"""Is clipkit's model the one open_clip builds? The same check in one process, so that nothing
about the process (threads, allocator, imports) can differ between the two sides.

    python scripts/bench/same_model_check.py [MODEL] [BATCH] [ROUNDS]   # default ViT-S-32 32 5

Builds MODEL through clipkit (`clipkit.models.factory.build`) and through
`open_clip.create_model`, prints both parameter counts, whether their module types match in order,
and the lines where their printed structure differs; then times one forward + backward + zero_grad
of each on the same random images and tokens with open_clip's `ClipLoss`, alternating, ROUNDS
times after one untimed round each, and prints the per-round seconds and their medians.
"""

from __future__ import annotations

import difflib
import statistics
import sys
import time

import open_clip
import torch

from clipkit.config import ModelConfig
from clipkit.models import factory


def features(out) -> tuple:
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def timed_step(model, images, tokens, loss) -> float:
    t0 = time.perf_counter()
    loss(*features(model(images, tokens))).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "ViT-S-32"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    torch.manual_seed(0)  # the same seed before each build: the same initial weights
    ours = factory.build(ModelConfig(name=name))
    torch.manual_seed(0)
    models = {"clipkit": ours, "open_clip": open_clip.create_model(name)}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    types = {k: [type(x).__name__ for x in m.modules()] for k, m in models.items()}
    print(f"parameters: {counts}; module types equal: {types['clipkit'] == types['open_clip']}")
    diff = difflib.unified_diff(
        repr(models["open_clip"]).splitlines(), repr(models["clipkit"]).splitlines(), lineterm=""
    )
    print("\n".join(list(diff)[:60]) or "printed structure: identical")
    size = models["open_clip"].visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(0, 49408, (batch, models["open_clip"].context_length))
    loss = open_clip.ClipLoss()
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
        timed_step(m, images, tokens, loss)
    for _ in range(rounds):
        for k, m in models.items():
            times[k].append(timed_step(m, images, tokens, loss))
    print(f"torch threads {torch.get_num_threads()}, batch {batch}, {size} px")
    for k, v in times.items():
        print(f"{k}: {[round(x, 3) for x in v]} median {statistics.median(v):.3f} s")


if __name__ == "__main__":
    main()
