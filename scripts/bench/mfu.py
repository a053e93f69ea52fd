"""Hardware-use row: model FLOPs per training sample (torch.utils.flop_counter) x samples/s of
full training steps (forward, backward, AdamW) over the dense fp32 matmul rate measured here.
Prints one JSON line. --quick: batch 32; --full: batch 128 (the issue's setting); --compile:
the step runs through torch.compile (what `clipkit pretrain --compile` does), timed after the
compiling warm-up."""

import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipkit.config import MethodConfig, ModelConfig
from clipkit.methods import build as build_method
from clipkit.models import factory

quick = "--quick" in sys.argv
batch = 32 if quick else 128
steps = 2 if quick else 3
use_compile = "--compile" in sys.argv
torch.manual_seed(0)


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


model = factory.build(ModelConfig(name="vit-s-16"))
method = build_method(MethodConfig(name="clip"), model)
opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
images = torch.randn(batch, 3, 224, 224)
text = torch.randint(1, 49000, (batch, 77))
batch_dict = {"image": images, "text": text}

with FlopCounterMode(display=False) as counter:
    loss, _ = method(batch_dict)
    loss.backward()
flops_per_sample = counter.get_total_flops() / batch
opt.zero_grad()


forward = torch.compile(method) if use_compile else method


def step():
    loss, _ = forward(batch_dict)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(2 if use_compile else 1):  # warm-up (the first compiled call compiles)
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
sps = batch * steps / (time.perf_counter() - t)
peak = matmul_rate()
use = flops_per_sample * sps / peak
print(
    json.dumps(
        {
            "row": f"hardware use: ViT-S/16 CLIP, batch {batch}, fp32 CPU"
            + (", torch.compile" if use_compile else "")
            + " (target >= 50%)",
            "clipkit": use,
            "reference": 0.5,
            "ratio": use / 0.5,
            "flops_per_sample": flops_per_sample,
            "samples_per_s": sps,
            "matmul_flops": peak,
            "threads": torch.get_num_threads(),
        }
    )
)
