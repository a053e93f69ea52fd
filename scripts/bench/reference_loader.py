"""Run inside .venv-openclip: time open_clip_train's get_wds_dataset loader (decoded + augmented
samples/s). Prints one JSON line. Usage: python reference_loader.py SHARDS N_SAMPLES WORKERS BATCH
IMAGE_SIZE BATCHES"""

import json
import sys
import time
from types import SimpleNamespace

import open_clip
from open_clip_train.data import get_wds_dataset

shards, n, workers, batch, size, batches = sys.argv[1], *map(int, sys.argv[2:])
args = SimpleNamespace(
    train_data=shards,
    train_num_samples=n,
    dataset_resampled=False,
    train_data_upsampling_factors=None,
    seed=0,
    batch_size=batch,
    workers=workers,
    world_size=1,
    rank=0,
    distributed=False,
    val_data=None,
)
preprocess = open_clip.image_transform(size, is_train=True)
tokenizer = open_clip.get_tokenizer("ViT-B-32")
data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
it = iter(data.dataloader)
next(it)  # workers up
t0 = time.perf_counter()
done = 0
for _ in range(batches):
    images, _ = next(it)
    done += images.shape[0]
print(json.dumps({"samples_per_s": done / (time.perf_counter() - t0)}))
