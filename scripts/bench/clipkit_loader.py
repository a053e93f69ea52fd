"""Time clipkit's training loader (decoded + augmented samples/s). Prints one JSON line.
Usage: python clipkit_loader.py SHARDS N_SAMPLES WORKERS BATCH IMAGE_SIZE BATCHES"""

import json
import sys
import time

from clipkit.config import DataConfig, ModelConfig
from clipkit.data.pipeline import build_loader
from clipkit.data.tokenize import build_tokenizer
from clipkit.data.views import ViewSpec
from clipkit.distributed import DistInfo
from clipkit.models import factory

shards, n, workers, batch, size, batches = sys.argv[1], *map(int, sys.argv[2:])
arch = factory.resolve_arch(ModelConfig(name="tiny", image_size=size))
cfg = DataConfig(data=shards, batch_size=batch, workers=workers, train_num_samples=n)
pp = factory.preprocess(arch)
loader, _ = build_loader(cfg, pp, ViewSpec(), build_tokenizer(pp), DistInfo(), seed=0)
it = iter(loader)
next(it)
t0 = time.perf_counter()
done = 0
for _ in range(batches):
    done += next(it)["image"].shape[0]
print(json.dumps({"samples_per_s": done / (time.perf_counter() - t0)}))
