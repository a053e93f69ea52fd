"""The training stream over WebDataset shards, with an exactly resumable position.

Each DataLoader worker's stream is a pure function of (seed, epoch, rank, worker): the shard
order, the shuffle buffer and every sample's augmentation RNG are seeded from it. Every batch
carries the worker's position (epoch, samples taken from its shuffle buffer, batches done), so a
checkpoint needs only those numbers. On resume a worker replays its raw (undecoded) samples up to
the position and decodes from there: the same samples come out in the same order with the same
augmentations, and the replay costs tar reads, not image decodes.

Each worker yields a fixed number of batches per epoch (cycling its shards if they run short), so
ranks never wait on each other at an epoch's end.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.data.decode import BadSample, decode_caption, decode_image, pick

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 chained over the parts): stable across
    processes and Python versions, and cheap enough to call once per sample (~2 us)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


@dataclass
class StreamSpec:
    urls: list[str]
    batch_size: int
    batches_per_worker: int  # per epoch
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    resampled: bool = False
    shuffle_buffer: int = 1000
    image_key: str = "jpg;jpeg;png;webp"
    text_key: str = "txt"
    max_pixels: int = 89_478_485
    # logical worker id -> [epoch, samples taken, batches done] to resume from
    start: dict[int, list[int]] = field(default_factory=dict)
    # which logical worker physical worker 0 plays (batches consumed so far % workers)
    worker_offset: int = 0


def _count_error(counter: Counter) -> Callable[[Exception], bool]:
    def handler(exn: Exception) -> bool:
        counter["unreadable_shard"] += 1
        return True  # skip and go on, counted

    return handler


class ShardStream(IterableDataset):
    """Infinite stream of collated batches for one rank; see the module docstring."""

    def __init__(self, spec: StreamSpec, sample_fn: Callable, collate_fn: Callable):
        super().__init__()
        self.spec = spec
        self.sample_fn = sample_fn  # (PIL image, caption) -> dict of tensors / values
        self.collate_fn = collate_fn  # (list of sample dicts) -> batch dict

    # -- raw stream (no decoding) ------------------------------------------------------------
    def _shards(self, epoch: int, stream_id: int, n_streams: int, rep: int) -> list[str]:
        """This stream's shards for a pass: a share fixed per epoch (split by rank, then worker),
        in an order reshuffled on every further pass; or, resampled, drawn with replacement."""
        s = self.spec
        if s.resampled:
            rng = random.Random(seed_for(s.seed, epoch, stream_id, rep, 1))
            return [rng.choice(s.urls) for _ in range(max(1, len(s.urls) // n_streams))]
        order = list(s.urls)
        random.Random(seed_for(s.seed, epoch, 2)).shuffle(order)
        mine = order[stream_id::n_streams]
        if rep:
            random.Random(seed_for(s.seed, epoch, stream_id, rep, 5)).shuffle(mine)
        return mine

    def _raw(self, epoch: int, stream_id: int, n_streams: int, bad: Counter) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        rep = 0
        while True:
            shards = self._shards(epoch, stream_id, n_streams, rep)
            got = 0
            for sample in tarfile_samples(({"url": u} for u in shards), handler=_count_error(bad)):
                got += 1
                yield sample
            if got == 0:
                raise RuntimeError(f"shards {shards[:3]} yielded no samples")
            rep += 1

    def _shuffled(self, raw: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        size = self.spec.shuffle_buffer
        if size <= 1:
            yield from raw
            return
        buf: list[dict] = []
        for sample in raw:
            if len(buf) < size:
                buf.append(sample)
                if len(buf) < size:
                    continue
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()

    # -- decoded batches -----------------------------------------------------------------------
    def _decode(self, raw: dict, sample_seed: int) -> dict:
        s = self.spec
        rng = random.Random(sample_seed)
        image_bytes = pick(raw, s.image_key)
        if image_bytes is None:
            raise BadSample("no_image")
        image = decode_image(image_bytes, s.max_pixels)
        caption = decode_caption(raw.get(s.text_key), rng)
        # Augmentations draw from torch's global CPU generator. Seed it directly: torch.manual_seed
        # also queues lazy CUDA/XPU seeding with a formatted stack, ~0.7 ms per sample.
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        out = self.sample_fn(image, caption)
        out["key"] = raw.get("__key__", "")
        return out

    def _epoch(
        self, epoch: int, logical: int, stream_id: int, n_streams: int, skip: int, batches_done: int
    ) -> Iterator[dict]:
        s = self.spec
        bad: Counter = Counter()
        bad_shards: Counter = Counter()
        rng = random.Random(seed_for(s.seed, epoch, stream_id, 3))
        stream = self._shuffled(self._raw(epoch, stream_id, n_streams, bad), rng)
        taken = 0
        for _ in range(skip):  # replay to the resume position without decoding
            next(stream)
            taken += 1
        bad.clear()
        pending: list[dict] = []
        while batches_done < s.batches_per_worker:
            raw = next(stream)
            taken += 1
            try:
                pending.append(self._decode(raw, seed_for(s.seed, epoch, stream_id, taken, 4)))
            except BadSample as e:
                bad[e.reason] += 1
                bad_shards[raw.get("__url__", "?")] += 1
                continue
            if len(pending) == s.batch_size:
                batches_done += 1
                batch = self.collate_fn(pending)
                batch["_pos"] = torch.tensor([logical, epoch, taken, batches_done])
                batch["_bad"] = dict(bad)
                batch["_bad_shards"] = dict(bad_shards)
                bad.clear()
                bad_shards.clear()
                pending = []
                yield batch

    def worker_shards(self, logical: int, epoch: int) -> list[str]:
        """The shards a logical worker of this rank reads first in an epoch (for messages)."""
        n_workers = max(self.spec.num_workers, 1)
        stream_id = self.spec.rank * n_workers + logical
        return self._shards(epoch, stream_id, self.spec.world_size * n_workers, 0)

    def __iter__(self) -> Iterator[dict]:
        s = self.spec
        info = get_worker_info()
        physical = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        logical = (physical + s.worker_offset) % n_workers
        stream_id = s.rank * n_workers + logical
        n_streams = s.world_size * n_workers
        epoch, skip, done = s.start.get(logical, [0, 0, 0])
        while True:
            yield from self._epoch(epoch, logical, stream_id, n_streams, skip, done)
            epoch, skip, done = epoch + 1, 0, 0


def batches_per_worker(num_samples: int, batch_size: int, world: int, workers: int) -> int:
    """open_clip's rule: an epoch is ceil(samples / global batch) batches, split over workers."""
    per_rank = math.ceil(num_samples / (batch_size * world))
    return max(1, math.ceil(per_rank / max(workers, 1)))


def make_loader(
    spec: StreamSpec, sample_fn, collate_fn, pin_memory: bool = False, stall_timeout: float = 0.0
) -> DataLoader:
    workers = spec.num_workers
    return DataLoader(
        ShardStream(spec, sample_fn, collate_fn),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        in_order=True,
        timeout=stall_timeout if workers > 0 else 0,
        # Worker base seeds come from this generator, not torch's global RNG, so starting the
        # loader consumes no global randomness (a resumed run then stays on the same RNG path).
        generator=torch.Generator().manual_seed(spec.seed),
    )
