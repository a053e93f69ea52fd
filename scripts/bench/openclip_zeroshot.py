"""Run inside .venv-openclip: time open_clip_train's `--zeroshot-frequency` evaluation, its
`zero_shot_eval` (ImageNet zero-shot from `--imagenet-val DIR`, open_clip's 1000 class names and
80 templates), ROUNDS times in one process, as its trainer calls it after an epoch.

    python openclip_zeroshot.py MODEL IMAGENET_DIR BATCH WORKERS THREADS ROUNDS TEMPLATES

MODEL is what `--model` takes (here `local-dir:DIR`, a `clipkit export` folder). The data come
from open_clip_train's own `get_imagenet` (torchvision ImageFolder). Prints one JSON line: per
round the seconds of the call, of the class embeddings inside it (its
`build_zero_shot_classifier`, wrapped with a timer), top-1 / top-5 and the load average.
TEMPLATES > 0 keeps only the first TEMPLATES of the 80 templates (as eval_driver.py does)."""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import open_clip
import open_clip_train.zero_shot as zero_shot_module
import torch
from open_clip_train.data import get_imagenet
from timers import timed

SPENT: dict[str, float] = {}


def accuracy(output, target, topk=(1,)):
    """open_clip_train 3.3.0's `accuracy` with `.item()`: its `float()` of a 1-element array
    fails under numpy >= 2.4. The same counts, the same cost."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() for k in topk]


def main() -> None:
    model_name, imagenet = sys.argv[1], sys.argv[2]
    batch, workers, threads, rounds, templates = map(int, sys.argv[3:8])
    torch.set_num_threads(threads)
    if templates:
        zero_shot_module.OPENAI_IMAGENET_TEMPLATES = zero_shot_module.OPENAI_IMAGENET_TEMPLATES[
            :templates
        ]
    zero_shot_module.accuracy = accuracy
    zero_shot_module.build_zero_shot_classifier = timed(
        SPENT, "class_embeddings", zero_shot_module.build_zero_shot_classifier
    )
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_name)
    model.eval()  # as open_clip_train's evaluate() leaves it
    tokenizer = open_clip.get_tokenizer(model_name)
    args = SimpleNamespace(
        imagenet_val=imagenet,
        batch_size=batch,
        workers=workers,
        device="cpu",
        precision="fp32",
        distributed=False,
        horovod=False,
        zeroshot_frequency=1,
        epochs=1,
        model=model_name,
    )
    data = {"imagenet-val": get_imagenet(args, (preprocess_train, preprocess_val), "val")}
    rows = []
    for index in range(rounds):
        SPENT.clear()
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        results = zero_shot_module.zero_shot_eval(model, data, 1, args, tokenizer)
        rows.append(
            {
                "round": index,
                "run_seconds": time.perf_counter() - start,
                "spent": dict(SPENT),
                "acc1": results["imagenet-zeroshot-val-top1"],
                "acc5": results["imagenet-zeroshot-val-top5"],
                "num_samples": len(data["imagenet-val"].dataloader.dataset),
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
            }
        )
    print(json.dumps({"rounds": rows}))


if __name__ == "__main__":
    main()
