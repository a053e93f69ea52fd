"""`clipkit data check`: read every shard once, count good and bad samples by reason, summarise
image sizes and caption lengths, and write `sizes.json` (samples per shard) next to the shards.

A shard that stops before its end (a corrupt member header, a truncated file) is reported with
the byte and the number of samples it cost, counted as `unreadable_shard` (the reason the
training stream uses), and named among the worst shards: never a silent short count."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from clipkit.data.decode import BadSample, decode_caption, decode_image, pick
from clipkit.data.tarscan import TarStopped, count_samples, shard_samples
from clipkit.fileio import OutputError, write_output_file

log = logging.getLogger(__name__)

SIZE_BINS = (64, 128, 256, 512, 1024, 2048)
WORST_SHARDS = 5  # shards named in the report, most bad samples first


def _size_bin(side: int) -> str:
    for edge in SIZE_BINS:
        if side < edge:
            return f"<{edge}"
    return f">={SIZE_BINS[-1]}"


def _damage(url: str, stop: TarStopped, read: int, skim: bool = True) -> dict:
    """What an early stop cost. A local shard is skimmed past the damage to count the samples
    it still holds (exact unless the file is cut short); otherwise at least one is lost."""
    lost, exact = 1, False
    if skim and Path(url).is_file():
        try:
            total, complete = count_samples(url)
        except OSError:
            total, complete = read, False
        exact = complete and not stop.truncated and total > read
        lost = max(total - read, 1)
    return {
        "shard": url,
        "after_samples": read,
        "offset": stop.offset,
        "cause": stop.cause,
        "samples_lost": lost,
        "exact": exact,
    }


def check_shard(url: str, image_key: str, text_key: str, max_pixels: int) -> dict:
    """Counts for one shard: good samples, bad by reason (samples an unreadable part of the
    shard cost count as `unreadable_shard`), image size bins, caption lengths, and where the
    shard stopped early (`unreadable`, else None)."""
    bad: Counter = Counter()
    sizes: Counter = Counter()
    words: list[int] = []
    good = read = 0
    unreadable = None

    def on_error(exn: Exception) -> bool:  # as the training stream: counted, then skipped
        bad["unreadable_shard"] += 1
        return True

    rng = random.Random(0)
    try:
        for raw in shard_samples(url, on_error):
            read += 1
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
    except TarStopped as stop:
        unreadable = _damage(url, stop, read)
    except OSError as e:  # cannot open the shard at all (gone, no permission, pipe failed)
        cause = f"cannot open it ({type(e).__name__}: {e.strerror or e})"
        unreadable = _damage(url, TarStopped(0, cause, True), read, skim=False)
    if unreadable is not None:
        bad["unreadable_shard"] += unreadable["samples_lost"]
    return {
        "good": good,
        "read": read,
        "bad": dict(bad),
        "short_side": dict(sizes),
        "caption_words": words,
        "unreadable": unreadable,
    }


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
    bad_per_shard: Counter = Counter()
    unreadable, empty = [], []
    for url in tqdm(urls, desc="check", unit="shard", disable=not progress):
        r = check_shard(url, image_key, text_key, max_pixels)
        per_shard[url] = r["good"]
        bad.update(r["bad"])
        bad_per_shard[url] = sum(r["bad"].values())
        sizes.update(r["short_side"])
        words += r["caption_words"]
        if r["unreadable"] is not None:
            unreadable.append(r["unreadable"])
        elif r["read"] == 0:
            empty.append(url)
    written = _write_sizes(per_shard) if write_sizes else []
    words.sort()
    n = len(words)
    return {
        "shards": len(urls),
        "samples": sum(per_shard.values()),
        "bad_samples": sum(bad.values()),
        "bad_by_reason": dict(bad),
        "worst_shards": [[url, k] for url, k in bad_per_shard.most_common(WORST_SHARDS) if k],
        "unreadable_shards": unreadable,
        "empty_shards": empty,
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


def _damage_line(d: dict) -> str:
    lost = f"{'' if d['exact'] else 'at least '}{d['samples_lost']} sample(s) lost"
    return (
        f"  unreadable: {d['shard']}: {d['cause']} at byte {d['offset']:,}, after "
        f"{d['after_samples']} sample(s); the rest of the shard is unreadable ({lost})"
    )


def format_report(report: dict) -> str:
    """The report as text: totals, bad samples by reason, unreadable and empty shards, the
    shards with the most bad samples, image sizes and caption lengths."""
    lines = [
        f"{report['shards']} shard(s), {report['samples']} good samples, "
        f"{report['bad_samples']} bad"
    ]
    lines += [f"  bad: {reason}: {n}" for reason, n in sorted(report["bad_by_reason"].items())]
    lines += [_damage_line(d) for d in report["unreadable_shards"]]
    lines += [f"  empty shard (no samples): {url}" for url in report["empty_shards"]]
    if report["worst_shards"]:
        worst = ", ".join(f"{Path(url).name} ({k})" for url, k in report["worst_shards"])
        lines.append(f"  worst shards: {worst}")
    lines.append(
        "  image short side: "
        + ", ".join(f"{k}: {v}" for k, v in report["image_short_side"].items())
    )
    if report["caption_words"]:
        w = report["caption_words"]
        lines.append(
            f"  caption words: min {w['min']}, median {w['median']}, mean {w['mean']:.1f}, "
            f"max {w['max']}"
        )
    lines += [f"  wrote {path}" for path in report["sizes_json"]]
    return "\n".join(lines)


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
