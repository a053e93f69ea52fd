"""`clipkit data check`: read every shard once, count good and bad samples by reason, summarise
image sizes and caption lengths, and write `sizes.json` (samples per shard) next to the shards."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from clipkit.data.decode import BadSample, decode_caption, decode_image, pick
from clipkit.fileio import OutputError, write_output_file

log = logging.getLogger(__name__)

SIZE_BINS = (64, 128, 256, 512, 1024, 2048)


def _size_bin(side: int) -> str:
    for edge in SIZE_BINS:
        if side < edge:
            return f"<{edge}"
    return f">={SIZE_BINS[-1]}"


def check_shard(url: str, image_key: str, text_key: str, max_pixels: int) -> dict:
    """Counts for one shard: good samples, bad by reason, image size bins, caption lengths."""
    from webdataset.tariterators import tarfile_samples

    bad: Counter = Counter()
    sizes: Counter = Counter()
    words: list[int] = []
    good = 0

    def on_error(exn: Exception) -> bool:
        bad["unreadable_shard"] += 1
        return True

    rng = random.Random(0)
    for raw in tarfile_samples([{"url": url}], handler=on_error):
        try:
            data = pick(raw, image_key)
            if data is None:
                raise BadSample("no_image")
            image = decode_image(data, max_pixels)
            caption = decode_caption(raw.get(text_key), rng)
        except BadSample as e:
            bad[e.reason] += 1
            continue
        good += 1
        sizes[_size_bin(min(image.size))] += 1
        words.append(len(caption.split()))
    return {"good": good, "bad": dict(bad), "short_side": dict(sizes), "caption_words": words}


def check_shards(
    urls: list[str],
    image_key: str = "jpg;jpeg;png;webp",
    text_key: str = "txt",
    max_pixels: int = 89_478_485,
    write_sizes: bool = True,
    progress: bool = True,
):
    """Check every shard; returns a report dict and writes sizes.json files for local shards."""
    from tqdm import tqdm

    per_shard, bad, sizes, words = {}, Counter(), Counter(), []
    for url in tqdm(urls, desc="check", unit="shard", disable=not progress):
        r = check_shard(url, image_key, text_key, max_pixels)
        per_shard[url] = r["good"]
        bad.update(r["bad"])
        sizes.update(r["short_side"])
        words += r["caption_words"]
    written = _write_sizes(per_shard) if write_sizes else []
    words.sort()
    n = len(words)
    return {
        "shards": len(urls),
        "samples": sum(per_shard.values()),
        "bad_samples": sum(bad.values()),
        "bad_by_reason": dict(bad),
        "image_short_side": {
            k: sizes[k] for k in [f"<{e}" for e in SIZE_BINS] + [f">={SIZE_BINS[-1]}"] if k in sizes
        },
        "caption_words": {
            "min": words[0],
            "median": words[n // 2],
            "max": words[-1],
            "mean": sum(words) / n,
        }
        if n
        else {},
        "sizes_json": [str(p) for p in written],
    }


def _write_sizes(per_shard: dict[str, int]) -> list[Path]:
    by_folder: dict[Path, dict[str, int]] = {}
    for url, n in per_shard.items():
        p = Path(url)
        if p.is_file():
            by_folder.setdefault(p.parent, {})[p.name] = n
    written = []
    for folder, counts in by_folder.items():
        target = folder / "sizes.json"
        existing = {}
        if target.is_file():
            try:
                existing = json.loads(target.read_text())
            except json.JSONDecodeError:
                existing = {}
        existing.update(counts)
        try:
            write_output_file(
                target, (json.dumps(existing, indent=1, sort_keys=True) + "\n").encode()
            )
        except OutputError as e:  # the report is still worth having: say so and go on
            log.warning("%s; sizes.json not updated (the report below is complete)", e)
            continue
        written.append(target)
    return written
