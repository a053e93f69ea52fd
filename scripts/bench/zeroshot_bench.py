"""Zero-shot row: images/s of clipkit's zero-shot evaluation vs CLIP_benchmark's
`zeroshot_classification.evaluate` on the same model, data, batch size and workers (alternating,
medians). Prints one JSON line. Usage: zeroshot_bench.py DEMO_ROOT MODEL REPEATS"""

import json
import statistics
import sys
import time

import torch

from clipkit.config import ModelConfig
from clipkit.data.eval_sets import classification_set
from clipkit.data.tokenize import build_tokenizer
from clipkit.data.transforms import eval_transform
from clipkit.eval import LoaderSettings
from clipkit.eval.loading import LoadedModel
from clipkit.eval.zero_shot import run_zero_shot
from clipkit.models import factory

root, model_name, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
READING = LoaderSettings(batch_size=128, workers=2)
cfg = ModelConfig(name=model_name)
torch.manual_seed(0)
model = factory.build(cfg).eval()
arch = cfg.arch
loaded = LoadedModel(
    model=model,
    preprocess=eval_transform(factory.preprocess(arch)),
    tokenizer=build_tokenizer(factory.preprocess(arch)),
    arch=arch,
    name=model_name,
    pretrained="random",
    sha256=None,
    method="clip",
)


def cb_accuracy(output, target, topk=(1,)):  # CLIP_benchmark 1.6.2's formula, numpy>=2.4-safe
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def run_clip_benchmark(data) -> None:
    from clip_benchmark.metrics import zeroshot_classification as cb

    cb.accuracy = cb_accuracy
    data.dataset.classes = data.classnames
    loader = torch.utils.data.DataLoader(
        data.dataset,
        batch_size=128,
        num_workers=2,
        collate_fn=lambda s: (torch.stack([x[0] for x in s]), torch.tensor([x[1] for x in s])),
    )
    cb.evaluate(model, loader, loaded.tokenizer, data.classnames, data.templates, "cpu", amp=False)


ours, ref = [], []
for rep in range(repeats + 1):  # the first round warms both up (page cache, lazy imports)
    data = classification_set("demo", root, "test", loaded.preprocess, task="shape")
    t = time.perf_counter()
    out = run_zero_shot(loaded, data, device=torch.device("cpu"), reading=READING)
    ours.append(out["clipkit"]["num_samples"] / (time.perf_counter() - t))
    data = classification_set("demo", root, "test", loaded.preprocess, task="shape")
    t = time.perf_counter()
    run_clip_benchmark(data)
    ref.append(out["clipkit"]["num_samples"] / (time.perf_counter() - t))
    if rep == 0:
        ours.clear()
        ref.clear()
a, b = statistics.median(ours), statistics.median(ref)
print(
    json.dumps(
        {
            "row": f"zero-shot images/s ({model_name}, {out['clipkit']['num_samples']} "
            "images, 6 classes x 6 templates, batch 128, 2 workers)",
            "clipkit": a,
            "reference": b,
            "ratio": a / b,
            "clipkit_runs": ours,
            "reference_runs": ref,
        }
    )
)
