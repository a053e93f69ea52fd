"""How many samples a folder of local shards holds, without `sizes.json` and without decoding.

For each shard, the first answer found is used:

1. `sizes.json` next to the shards (open_clip's convention; `clipkit data check` and
   `clipkit data pack` write it);
2. img2dataset's per-shard stats file (`00000.tar` -> `00000_stats.json`, its `successes`);
3. a cached count (below), valid while the shard's size and modification time are unchanged;
4. a count from the tar headers: members are grouped by sample key, as webdataset groups them,
   and a sample counts when it has an image member and a caption member. Only headers are
   read (the tar is seeked past member data), so a 10,000-sample shard takes milliseconds.

Counts of step 4 are cached in `.clipkit-counts.json` next to the shards when that folder is
writable, else under clipkit's cache folder ($CLIPKIT_CACHE, else $XDG_CACHE_HOME/clipkit, else
~/.cache/clipkit), in `counts/`, one file per shard folder. Remote shards (`pipe:`, http...)
cannot be counted: they need `sizes.json` or `--train-num-samples`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

from clipkit.config import ConfigError
from clipkit.data.sources import _is_remote
from clipkit.data.tarscan import _READ_ERRORS, sample_key
from clipkit.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_NAME = ".clipkit-counts.json"
_CACHE_VERSION = 1


def cache_root() -> Path:
    """clipkit's cache folder: $CLIPKIT_CACHE, else $XDG_CACHE_HOME/clipkit, else
    ~/.cache/clipkit."""
    if os.environ.get("CLIPKIT_CACHE"):
        return Path(os.environ["CLIPKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipkit"


def member_ext(name: str) -> str:
    """webdataset's extension of a member: the basename after its first dot, lower-cased."""
    return name.rpartition("/")[2].partition(".")[2].lower()


def count_tar(path: str | Path, image_key: str, text_key: str) -> int:
    """Samples of a local shard that have an image and a caption member, from headers only.

    Consecutive members sharing a key form one sample (webdataset's grouping). A shard damaged
    part-way counts the samples before the damage, with a warning."""
    images, texts = set(image_key.split(";")), set(text_key.split(";"))
    count, key, found = 0, None, set()
    try:
        with tarfile.open(path, "r:*") as tar:  # random access: seeks past member data
            for info in tar:
                new = sample_key(info.name) if info.isreg() else None
                if new is None:
                    continue
                if new != key:
                    count += bool(found & images and found & texts)
                    key, found = new, set()
                found.add(member_ext(info.name))
                tar.members = []  # keep memory flat on large shards
    except _READ_ERRORS as e:
        log.warning("%s: stopped counting at a damaged header (%s)", path, e)
    return count + bool(found & images and found & texts)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class _CountCache:
    """Counts of one shard folder, keyed by shard name, valid for a (size, mtime) stamp and the
    member keys they were counted with."""

    def __init__(self, folder: Path, keys: str):
        self.folder = folder
        self.keys = keys
        self.beside = folder / CACHE_NAME
        digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        self.elsewhere = cache_root() / "counts" / f"{digest}.json"
        self.entries: dict = {}
        for f in (self.elsewhere, self.beside):  # the one beside the shards wins
            self.entries.update(self._read(f))
        self.changed = False

    def _read(self, f: Path) -> dict:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            return {}
        ok = isinstance(data, dict) and data.get("version") == _CACHE_VERSION
        return data.get("counts", {}).get(self.keys, {}) if ok else {}

    def get(self, shard: Path) -> int | None:
        entry = self.entries.get(shard.name)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == _stamp(shard):
            return int(entry[2])
        return None

    def put(self, shard: Path, count: int) -> None:
        self.entries[shard.name] = [*_stamp(shard), count]
        self.changed = True

    def save(self) -> Path | None:
        """Write the cache beside the shards, else in clipkit's cache; None if neither works."""
        if not self.changed:
            return None
        for f in (self.beside, self.elsewhere):
            data = {"version": _CACHE_VERSION, "folder": str(self.folder.resolve())}
            data["counts"] = {self.keys: self.entries}
            try:
                atomic_write_bytes(f, (json.dumps(data, indent=1) + "\n").encode())
                return f
            except OSError:
                continue
        return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stats_successes(shard: Path) -> int | None:
    """img2dataset's `successes` for a shard, from `STEM_stats.json` beside it."""
    value = _read_json(shard.with_name(shard.name.split(".")[0] + "_stats.json")).get("successes")
    return int(value) if isinstance(value, int) and value >= 0 else None


def _shard_count(shard: Path, sizes: dict, cache: _CountCache, keys: tuple) -> tuple[int, str]:
    """(samples, where the number came from) for one local shard."""
    if isinstance(sizes.get(shard.name), int):
        return sizes[shard.name], "sizes.json"
    stats = _stats_successes(shard)
    if stats is not None:
        return stats, "img2dataset stats"
    cached = cache.get(shard)
    if cached is not None:
        return cached, "the count cache"
    count = count_tar(shard, *keys)
    cache.put(shard, count)
    return count, "counting tar headers"


def count_shards(urls: list[str], image_key: str, text_key: str) -> int:
    """Total samples of local shards (see the module docstring for where each count comes from);
    logs how many shards each source answered for, and where new counts were cached."""
    remote = [u for u in urls if _is_remote(u)]
    if remote:
        raise ConfigError(
            f"dataset size unknown: {len(remote)} remote shard(s) (e.g. {remote[0]}) have no "
            "sizes.json; clipkit counts only local shards: pass --train-num-samples N or put a "
            "sizes.json next to them"
        )
    total, sources = 0, Counter()
    folders: dict[Path, tuple[dict, _CountCache]] = {}
    for url in urls:
        shard = Path(url)
        if shard.parent not in folders:
            sizes = _read_json(shard.parent / "sizes.json")
            folders[shard.parent] = sizes, _CountCache(shard.parent, f"{image_key}|{text_key}")
        sizes, cache = folders[shard.parent]
        count, source = _shard_count(shard, sizes, cache, (image_key, text_key))
        total += count
        sources[source] += 1
    saved = [str(f) for _, cache in folders.values() if (f := cache.save()) is not None]
    where = ", ".join(f"{n} shard(s) from {source}" for source, n in sources.most_common())
    log.info("dataset size: %d samples in %d shard(s): %s", total, len(urls), where)
    if saved:
        log.info("shard counts cached in %s", ", ".join(saved))
    return total
