"""The training stream over WebDataset shards, with an exactly resumable position.

Each DataLoader worker's stream is a pure function of (seed, epoch, rank, worker): the shard
order, the shuffle buffer and every sample's augmentation RNG are seeded from it. Every batch
carries the worker's position (epoch, samples taken from its shuffle buffer, batches done), so a
checkpoint needs only those numbers. On resume a worker replays its raw (undecoded) samples up to
the position and decodes from there: the same samples come out in the same order with the same
augmentations, and the replay costs tar reads, not image decodes.

Each worker yields a fixed number of batches per epoch (cycling its shards if they run short), so
ranks never wait on each other at an epoch's end.

A stream that can never form a batch stops instead of spinning: after BAD_STREAK unusable samples
in a row, or when every shard it may read yields no sample at all, it raises NoUsableSamples
naming the reason, the key it looked for and the shards. DataLoader workers leave SIGTERM and
SIGINT to the main process, which owns shutdown (finish the step, checkpoint, exit).
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.config import ConfigError, DataConfig
from clipkit.data.decode import BadSample, decode_caption, decode_image, member
from clipkit.data.tarscan import TarStopped, shard_samples

_MASK64 = (1 << 64) - 1

# Unusable samples in a row after which a worker stops the run. The trainer checks
# --max-bad-fraction on the counts that batches carry, so a stream with nothing usable, which
# never forms a batch, has to check itself. 1000 in a row is a 100% bad share over ten times the
# trainer's 100-sample minimum, and at the default 1% budget the whole allowance of 100,000
# samples: a dataset within budget shows such a run only where a large block of it is broken
# (one bad shard), and such a block at the start of a run fails the trainer's check as well.
# --max-bad-fraction 1 (accept any amount) turns it off.
BAD_STREAK = 1000


class NoUsableSamples(ConfigError):
    """The stream can never form a batch: its data or --image-key/--text-key are wrong."""


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
    # the run's data settings: batch size, workers, resampling, shuffle buffer, member keys,
    # pixel limit, bad-sample share (1 turns off the BAD_STREAK stop), stall timeout
    data: DataConfig
    batches_per_worker: int  # per epoch
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    # logical worker id -> [epoch, samples taken, batches done] to resume from
    start: dict[int, list[int]] = field(default_factory=dict)
    # which logical worker physical worker 0 plays (batches consumed so far % workers)
    worker_offset: int = 0


def _count_error(counter: Counter) -> Callable[[Exception], bool]:
    def handler(exn: Exception) -> bool:
        counter["unreadable_shard"] += 1
        return True  # skip and go on, counted

    return handler


def _shard_or_count(url: str, bad: Counter) -> Iterator[dict]:
    """The samples of one shard; a shard that cannot be opened, or stops before its end (a
    corrupt header, a truncated file), counts once as `unreadable_shard` and the stream goes
    on with the next one."""
    try:
        yield from shard_samples(url, _count_error(bad))
    except (TarStopped, OSError, ValueError):  # damaged, or opening failed (missing, pipe)
        bad["unreadable_shard"] += 1


def _names(urls) -> str:
    urls = sorted(set(urls))
    more = f" and {len(urls) - 4} more" if len(urls) > 4 else ""
    return ", ".join(os.path.basename(u) for u in urls[:4]) + more


class _Starvation:
    """One worker's watch for a stream that can never form a batch (see BAD_STREAK)."""

    HINT = "check --image-key/--text-key, or the shards with `clipkit data check`"

    def __init__(self, where: str, max_bad_fraction: float):
        self.where = where  # "data worker W of rank R"
        self.limit = BAD_STREAK if max_bad_fraction < 1 else 0
        self.streak = 0  # unusable samples since the last usable one
        self.reasons: Counter = Counter()
        self.details: dict[str, str] = {}  # reason -> its latest detail (the key looked for)
        self.shards: set[str] = set()

    def usable(self) -> None:
        if self.streak:  # called once per good sample: only a run of bad ones needs a reset
            self.streak = 0
            self.reasons.clear()
            self.details.clear()
            self.shards.clear()

    def unusable(self, e: BadSample, url: str) -> None:
        self.streak += 1
        self.reasons[e.reason] += 1
        self.details[e.reason] = e.detail
        self.shards.add(url)
        if self.limit and self.streak >= self.limit:
            shares = ", ".join(
                f"{n / self.streak:.0%} {reason}"
                + (f" ({self.details[reason]})" if self.details[reason] != reason else "")
                for reason, n in self.reasons.most_common()
            )
            if len(self.reasons) > 1:
                shares = f"100% unusable: {shares}"
            raise NoUsableSamples(
                f"no usable samples: {shares}, {self.streak} in a row read by {self.where} from "
                f"{_names(self.shards)}; {self.HINT}"
            )

    def no_samples(self, shards: set[str], read_errors: int) -> None:
        """Every shard this stream may read was read and yielded nothing."""
        reason = f"unreadable_shard ({read_errors} read errors)" if read_errors else "empty_shard"
        raise NoUsableSamples(
            f"no usable samples: 100% {reason}: {_names(shards)} yielded no samples to "
            f"{self.where}; {self.HINT}"
        )


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
        if s.data.resampled:
            rng = random.Random(seed_for(s.seed, epoch, stream_id, rep, 1))
            return [rng.choice(s.urls) for _ in range(max(1, len(s.urls) // n_streams))]
        order = list(s.urls)
        random.Random(seed_for(s.seed, epoch, 2)).shuffle(order)
        mine = order[stream_id::n_streams]
        if rep:
            random.Random(seed_for(s.seed, epoch, stream_id, rep, 5)).shuffle(mine)
        return mine

    def _raw(
        self, epoch: int, stream_id: int, n_streams: int, bad: Counter, watch: _Starvation
    ) -> Iterator[dict]:
        # The shards a pass may read (without resampling every pass reads the same share), and
        # those not yet read by the passes in a row that yielded nothing: once none is left, no
        # pass ever will yield.
        if self.spec.data.resampled:
            readable = set(self.spec.urls)
        else:
            readable = set(self._shards(epoch, stream_id, n_streams, 0))
        unread, errors = set(readable), 0
        rep = 0
        while True:
            shards = self._shards(epoch, stream_id, n_streams, rep)
            before = bad["unreadable_shard"]
            got = 0
            for url in shards:
                for sample in _shard_or_count(url, bad):
                    got += 1
                    yield sample
            if got:
                unread, errors = set(readable), 0
            else:
                unread -= set(shards)
                errors += bad["unreadable_shard"] - before
                if not unread:
                    watch.no_samples(readable, errors)
            rep += 1

    def _shuffled(self, raw: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        size = self.spec.data.shuffle_buffer
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
        # Both members first: a missing one is cheap to tell and names the key looked for.
        image_bytes = member(raw, s.data.image_key, "no_image", "image")
        caption_bytes = member(raw, s.data.text_key, "no_caption", "caption")
        image = decode_image(image_bytes, s.data.max_pixels)
        caption = decode_caption(caption_bytes, rng)
        # Augmentations draw from torch's global CPU generator. Seed it directly: torch.manual_seed
        # also queues lazy CUDA/XPU seeding with a formatted stack, ~0.7 ms per sample.
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        out = self.sample_fn(image, caption)
        out["key"] = raw.get("__key__", "")
        return out

    def _epoch(
        self,
        epoch: int,
        logical: int,
        stream_id: int,
        n_streams: int,
        skip: int,
        batches_done: int,
        watch: _Starvation,
    ) -> Iterator[dict]:
        s = self.spec
        bad: Counter = Counter()
        bad_shards: Counter = Counter()
        rng = random.Random(seed_for(s.seed, epoch, stream_id, 3))
        stream = self._shuffled(self._raw(epoch, stream_id, n_streams, bad, watch), rng)
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
                watch.unusable(e, raw.get("__url__", "?"))
                continue
            watch.usable()
            if len(pending) == s.data.batch_size:
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
        n_workers = max(self.spec.data.workers, 1)
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
        watch = _Starvation(f"data worker {logical} of rank {s.rank}", s.data.max_bad_fraction)
        try:
            while True:
                yield from self._epoch(epoch, logical, stream_id, n_streams, skip, done, watch)
                epoch, skip, done = epoch + 1, 0, 0
        except NoUsableSamples as e:
            # Sent on as a batch: an exception raised in a DataLoader worker reaches the main
            # process as a traceback text. StreamLoader raises it again there.
            yield {"_error": str(e)}


def batches_per_worker(num_samples: int, batch_size: int, world: int, workers: int) -> int:
    """open_clip's rule: an epoch is ceil(samples / global batch) batches, split over workers."""
    per_rank = math.ceil(num_samples / (batch_size * world))
    return max(1, math.ceil(per_rank / max(workers, 1)))


class StreamLoader(DataLoader):
    """The training DataLoader: a stream's `_error` batch is raised as NoUsableSamples."""

    def __iter__(self) -> Iterator[dict]:
        return self._raise_errors(super().__iter__())  # workers start now, as with DataLoader

    @staticmethod
    def _raise_errors(batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            if "_error" in batch:
                raise NoUsableSamples(batch["_error"])
            yield batch


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGTERM/SIGINT to the main process.

    A scheduler signals the whole process group; a worker that died of it would take the run
    down with a traceback before the main process could checkpoint. The signals are blocked and
    taken by a thread that exits only on SIGTERM from the parent, which is how the DataLoader
    ends a worker that does not stop by itself (torch's own worker handler does the same), or
    when the parent is gone: a worker busy in a stream that yields nothing never looks."""
    if not hasattr(signal, "sigtimedwait"):  # no sender pid to tell them apart (macOS)
        return
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # threads started later inherit it
    parent = os.getppid()
    threading.Thread(target=_take_signals, args=(stops, parent), daemon=True).start()


def _take_signals(stops: set, parent: int) -> None:
    while True:
        info = signal.sigtimedwait(stops, 2.0)  # None after 2 s: look at the parent again
        asked = info is not None and info.si_signo == signal.SIGTERM and info.si_pid == parent
        if asked or os.getppid() != parent:
            os._exit(0)


def make_loader(spec: StreamSpec, sample_fn, collate_fn, pin_memory: bool = False) -> DataLoader:
    workers = spec.data.workers
    return StreamLoader(
        ShardStream(spec, sample_fn, collate_fn),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        in_order=True,
        timeout=spec.data.stall_timeout if workers > 0 else 0,
        worker_init_fn=_ignore_stop_signals,
        # Worker base seeds come from this generator, not torch's global RNG, so starting the
        # loader consumes no global randomness (a resumed run then stays on the same RNG path).
        generator=torch.Generator().manual_seed(spec.seed),
    )
