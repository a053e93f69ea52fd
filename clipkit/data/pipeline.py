"""From a run config to a training DataLoader: per-sample transforms for the method's views,
tokenisation, collation, and the data position a checkpoint stores."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clipkit.config import ConfigError, DataConfig
from clipkit.data.augment import Augment, run_augment
from clipkit.data.counting import count_shards
from clipkit.data.preprocess import Preprocess
from clipkit.data.shards import StreamSpec, batches_per_worker, make_loader
from clipkit.data.sources import expand_sources, preflight, read_sizes
from clipkit.data.transforms import train_transform
from clipkit.data.views import ViewSpec
from clipkit.distributed import DistInfo


class SampleTransform:
    """(PIL image, caption) -> per-sample dict for the method's views (picklable for workers)."""

    def __init__(self, preprocess: Preprocess, views: ViewSpec, augment: Augment | None = None):
        self.views = views
        self.image = train_transform(preprocess, views, augment)

    def __call__(self, image, caption: str) -> dict:
        out = {"caption": caption}
        if self.views.online_views == 0:
            out["image"] = self.image(image)
        else:
            out.update(self.image(image))
        return out


class Collate:
    """Stack samples into the batch contract of DESIGN.md, tokenising the captions at once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict = {
            "text": self.tokenizer([s["caption"] for s in samples]),  # (B, L)
            "key": [s["key"] for s in samples],
        }
        for name in ("image", "teacher_image", "boxes"):
            if name in samples[0]:
                batch[name] = torch.stack([s[name] for s in samples])
        if "views" in samples[0]:
            batch["views"] = torch.stack([s["views"] for s in samples], dim=1)  # (V, B, 3, H, W)
        return batch


@dataclass
class DataPosition:
    """Where every worker of this rank stands; enough to resume the stream exactly."""

    workers: dict[int, list[int]] = field(
        default_factory=dict
    )  # logical id -> [epoch, taken, done]
    batches: int = 0  # batches this rank consumed

    def update(self, batch: dict) -> None:
        logical, epoch, taken, done = (int(x) for x in batch["_pos"])
        self.workers[logical] = [epoch, taken, done]
        self.batches += 1

    def state(self) -> dict:
        return {"workers": {str(k): v for k, v in self.workers.items()}, "batches": self.batches}

    @classmethod
    def from_state(cls, state: dict) -> DataPosition:
        return cls({int(k): list(v) for k, v in state["workers"].items()}, int(state["batches"]))


@dataclass
class LoaderInfo:
    urls: list[str]
    num_samples: int  # samples per epoch (all ranks)
    batches_per_epoch: int  # per rank


def build_loader(
    cfg: DataConfig,
    preprocess: Preprocess,
    views: ViewSpec,
    tokenizer,
    dist: DistInfo,
    seed: int,
    position: DataPosition | None = None,
    pin_memory: bool = False,
):
    """Validate the data (pre-flight) and build the infinite training loader for this rank."""
    urls = expand_sources(cfg.data)
    preflight(urls, ranks=dist.world_size, workers=cfg.workers, resampled=cfg.resampled)
    num_samples = (
        cfg.train_num_samples or read_sizes(urls) or count_shards(urls, cfg.image_key, cfg.text_key)
    )
    if not num_samples:
        raise ConfigError(
            f"no samples with an image ('{cfg.image_key}') and a caption ('{cfg.text_key}') "
            "member in the shards; check --image-key/--text-key, or the shards with "
            "`clipkit data check`"
        )
    workers = max(cfg.workers, 1)
    per_worker = batches_per_worker(num_samples, cfg.batch_size, dist.world_size, workers)
    position = position or DataPosition()
    spec = StreamSpec(
        urls=urls,
        data=cfg,
        batches_per_worker=per_worker,
        seed=seed,
        rank=dist.rank,
        world_size=dist.world_size,
        start=dict(position.workers),
        worker_offset=position.batches % workers,
    )
    sample_fn = SampleTransform(preprocess, views, run_augment(cfg, views))
    loader = make_loader(spec, sample_fn, Collate(tokenizer), pin_memory)
    return loader, LoaderInfo(urls, num_samples, per_worker * workers)
