"""Resolve `--data` into a shard list and check it before training starts.

`--data` is a directory (every *.tar in it), a brace pattern (`shards/{000000..000099}.tar`), any
URL webdataset can stream (`pipe:curl -s ...`, http), or several of these joined by `::`.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from clipkit.config import ConfigError


def _is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://"))


def expand_sources(data: str) -> list[str]:
    """Shard URLs in a stable order; a user error (ConfigError) when nothing matches."""
    from webdataset.shardlists import expand_urls

    urls: list[str] = []
    for source in data.split("::"):
        source = source.strip()
        if not source:
            continue
        path = Path(source)
        if not _is_remote(source) and path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise ConfigError(f"no *.tar shards in directory {path}")
            urls.extend(found)
            continue
        expanded = expand_urls(source)
        if not _is_remote(source):
            missing = [u for u in expanded if not Path(u).is_file()]
            if len(missing) == len(expanded):
                raise ConfigError(f"no shard matches '{source}' (checked {len(expanded)} path(s))")
            if missing:
                raise ConfigError(
                    f"{len(missing)} shard(s) of '{source}' missing, e.g. {missing[0]}"
                )
        urls.extend(expanded)
    if not urls:
        raise ConfigError("--data names no shards")
    return urls


def local_paths(data: str) -> list[Path]:
    """The local files and folders that `--data` names (brace patterns expanded, URLs left out):
    what an output must not overwrite."""
    from webdataset.shardlists import expand_urls

    paths: list[Path] = []
    for source in (data or "").split("::"):
        source = source.strip()
        if not source or _is_remote(source):
            continue
        try:
            names = [source] if Path(source).exists() else expand_urls(source)
        except ValueError:  # a malformed brace pattern names nothing to protect
            names = [source]
        paths.extend(Path(name) for name in names)
    return paths


def read_sizes(urls: list[str]) -> int | None:
    """Total samples from `sizes.json` files next to local shards (open_clip's convention)."""
    total = 0
    cache: dict[Path, dict] = {}
    for url in urls:
        if _is_remote(url):
            return None
        folder = Path(url).parent
        if folder not in cache:
            f = folder / "sizes.json"
            try:
                cache[folder] = json.loads(f.read_text()) if f.is_file() else {}
            except (OSError, json.JSONDecodeError):
                cache[folder] = {}
        n = cache[folder].get(Path(url).name)
        if n is None:
            return None
        total += int(n)
    return total


def preflight(urls: list[str], *, ranks: int, workers: int, resampled: bool) -> None:
    """Cheap checks: local shards are readable tar files, and there are enough of them."""
    for url in urls:
        if not _is_remote(url) and not tarfile.is_tarfile(url):
            raise ConfigError(f"{url} is not a readable tar file")
    streams = ranks * max(workers, 1)
    if not resampled and len(urls) < streams:
        raise ConfigError(
            f"{len(urls)} shard(s) for {ranks} rank(s) x {max(workers, 1)} worker(s): each stream "
            f"needs at least one shard; use fewer --workers, more shards, or --resampled"
        )
