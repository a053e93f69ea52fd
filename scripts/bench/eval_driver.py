"""Run in clipkit's venv (scripts/bench_eval.py starts it): time `InTrainingEval.run`, the call
the trainer makes at each `--eval-every` step, on a saved checkpoint's method, ROUNDS times in
one process (the first round reads the data from disk, as a run's first evaluation does).

    python eval_driver.py CHECKPOINT RUN_DIR BATCH WORKERS THREADS ROUNDS TEMPLATES SPEC [SPEC ...]

TEMPLATES > 0 keeps only the first TEMPLATES of open_clip's 80 ImageNet templates (the ImageNet
set reads them from `open_clip.zero_shot_metadata` when it is opened); 0 keeps all 80.

Prints one JSON line: per round and spec, the record's `eval_seconds` and metrics, the seconds
spent building zero-shot class embeddings and embedding labelled images (timed by wrapping
`clipkit.eval.zero_shot`'s functions, which the evaluation looks up at each call), and the load
average before and after each round."""

from __future__ import annotations

import json
import os
import sys
import time

import open_clip.zero_shot_metadata as imagenet_metadata
import torch
from timers import timed

import clipkit.eval.zero_shot as zero_shot_module
from clipkit.data.tokenize import build_tokenizer
from clipkit.data.transforms import eval_transform
from clipkit.distributed import DistInfo
from clipkit.eval import LoaderSettings
from clipkit.eval.in_training import InTrainingEval
from clipkit.eval.specs import parse_specs
from clipkit.methods.restore import load_method
from clipkit.models import factory

SPENT: dict[str, float] = {}


def main() -> None:
    checkpoint, run_dir = sys.argv[1], sys.argv[2]
    batch, workers, threads, rounds, templates = map(int, sys.argv[3:8])
    texts = sys.argv[8:]
    torch.set_num_threads(threads)
    if templates:
        imagenet_metadata.OPENAI_IMAGENET_TEMPLATES = imagenet_metadata.OPENAI_IMAGENET_TEMPLATES[
            :templates
        ]
    zero_shot_module.zero_shot_classifier = timed(
        SPENT, "class_embeddings", zero_shot_module.zero_shot_classifier
    )
    zero_shot_module.embed_labelled = timed(
        SPENT, "labelled_images", zero_shot_module.embed_labelled
    )
    loaded = load_method(checkpoint)
    arch = loaded.config.model.arch
    evaluator = InTrainingEval(
        parse_specs(texts),
        LoaderSettings(batch_size=batch, workers=workers),
        eval_transform(factory.preprocess(arch)),
        build_tokenizer(factory.preprocess(arch)),
        torch.device("cpu"),
        DistInfo(),
        run_dir,
        model_name=loaded.config.model.name,
        arch=arch,
    )
    rows = []
    for index in range(rounds):
        SPENT.clear()
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        records = evaluator.run(loaded.method, step=index, samples_seen=0)
        total = time.perf_counter() - start
        failed = [r for r in records if "error" in r]
        if failed:
            raise SystemExit(f"evaluation failed: {failed[0]['error']}")
        rows.append(
            {
                "round": index,
                "run_seconds": total,
                "records": records,
                "spent": dict(SPENT),
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
            }
        )
    print(json.dumps({"rounds": rows}))


if __name__ == "__main__":
    main()
