"""Embed a shard collection into clip-retrieval's inference layout (`clipkit.index.parts`), one
part per input shard, spread over the ranks of a torchrun job (shard i goes to rank i % world).

Each part is written atomically and skipped when already complete, so a killed job resumes
where it stopped; a part is embedded by one process in the batches one process would read, so
the embeddings do not depend on the number of ranks. The folder also holds `model.json` (how to
load the encoder again, as in index directories) and `embed.json` (the shards and dtype), written
before any part so that a rerun with another model or other shards is refused.

Progress over all ranks: each rank keeps its count of embedded images in `.progress/rank{r}`;
rank 0's bar sums them (images/s of the whole job) without a collective per batch.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipkit.config import ConfigError
from clipkit.data.eval_io import TarShards, image_member, open_image
from clipkit.data.eval_pairs import collate_pairs, split_captions
from clipkit.distributed import DistInfo
from clipkit.eval import LoaderSettings
from clipkit.eval.embed import check_skipped, embed_loader, encode_texts, make_loader
from clipkit.fileio import (
    OutputError,
    atomic_write_bytes,
    check_not_input,
    check_writable,
    output_kind,
    write_marker,
    writing,
)
from clipkit.index.parts import PartFiles, part_label, write_part

log = logging.getLogger(__name__)
EMBED_KIND = "embeddings"  # the output marker of an embedding folder
_PROGRESS = ".progress"
_OWN_COLUMNS = ("image_path", "caption", "key", "shard")  # a json field never replaces them


class TarCaptioned(TarShards):
    """item = (image | None, captions, key, shard, fields of the sample's json)."""

    def item(self, shard: str, key: str, fields: dict[str, bytes]):
        image = image_member(fields)
        if image is None:
            return None
        return (
            open_image(image, self.transform),
            split_captions(fields.get("txt")),
            key,
            shard,
            _json_fields(fields.get("json")),
        )


def _json_fields(data: bytes | None) -> dict:
    """The top-level fields of a sample's json (url, width, ...); nested values as JSON text so
    every metadata column has one type."""
    try:
        record = json.loads(data) if data else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(record, dict):
        return {}
    simple = (str, int, float, bool, type(None))
    return {k: v if isinstance(v, simple) else json.dumps(v) for k, v in record.items()}


def collate_captioned(samples: list) -> dict:
    batch = collate_pairs([s[:4] for s in samples])
    batch["json"] = [s[4] for s in samples if s[0] is not None]
    return batch


@dataclass(frozen=True)
class EmbedJob:
    """What `run_embed_job` embeds, and where to."""

    shards: list[str]
    out: Path
    dtype: str = "float16"  # of the written arrays; features are computed in float32
    reading: LoaderSettings = LoaderSettings()

    def part(self, number: int) -> PartFiles:
        return PartFiles.at(self.out, part_label(number, len(self.shards)))


def prepare_out(job: EmbedJob, model_info: dict) -> None:
    """Check `job.out` (new, empty, or an embedding folder of the same model, shards and dtype:
    a resume) and record the model and the job there. Rank 0 only."""
    out, record = job.out, {"shards": job.shards, "dtype": job.dtype}
    with writing(out):
        if _check_out_kind(out):
            _check_resume(out, model_info, record)
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, EMBED_KIND)
        shutil.rmtree(out / _PROGRESS, ignore_errors=True)  # counts of an earlier (killed) run
        atomic_write_bytes(out / "model.json", (json.dumps(model_info, indent=2) + "\n").encode())
        atomic_write_bytes(out / "embed.json", (json.dumps(record, indent=2) + "\n").encode())


def _check_out_kind(out: Path) -> bool:
    """Whether `out` holds earlier embeddings (a resume); refuses anything but a new or empty
    folder or an embedding folder."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return False
    if output_kind(out) != EMBED_KIND:
        raise OutputError(
            f"--out {out} is not empty and is not an embedding folder; choose another --out"
        )
    return True


def guard_embed_out(out: str | Path, source: dict, data: str) -> Path:
    """Check `--out` before any work: not an input (the model's files, the shards), a new or
    empty folder or an earlier embedding folder, in a writable place."""
    from clipkit.data.sources import local_paths
    from clipkit.eval.loading import model_inputs

    out = Path(out)
    with writing(out):
        check_not_input(out, model_inputs(source) + local_paths(data), folder=True)
        _check_out_kind(out)
    check_writable(out)
    return out


def _check_resume(out: Path, model_info: dict, record: dict) -> None:
    try:
        old_model = json.loads((out / "model.json").read_text())
        old = json.loads((out / "embed.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # killed before its records were written: nothing to disagree with
    if model_info["sha256"] is None:
        raise ConfigError(
            f"--out {out} holds embeddings, and a model with random weights cannot resume them "
            "(each run draws other weights); choose another --out"
        )
    if old_model.get("sha256") != model_info["sha256"] or old_model.get(
        "embed_dim"
    ) != model_info.get("embed_dim"):
        raise ConfigError(f"--out {out} holds embeddings of another model; choose another --out")
    if old != record:
        raise ConfigError(
            f"--out {out} holds embeddings of other shards or another --dtype; choose another --out"
        )


class RankProgress:
    """This rank's embedded-image count in a file; rank 0 shows the sum of all ranks' files."""

    def __init__(self, out: Path, info: DistInfo, total: int | None):
        self.folder, self.info, self.count = out / _PROGRESS, info, 0
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / f"rank{info.rank}", b"0")  # not a killed run's count
        self.bar = tqdm(
            total=total,
            unit="img",
            desc=f"embedding ({info.world_size} process{'es' if info.world_size > 1 else ''})",
            dynamic_ncols=True,
            disable=not info.is_main,
        )

    def _all_ranks(self) -> tuple[int, int]:
        """(images embedded by all ranks, ranks finished)."""
        total = finished = 0
        for f in self.folder.glob("rank*"):
            try:
                count, _, state = f.read_text().partition(" ")
                total, finished = total + int(count or 0), finished + (state == "done")
            except (OSError, ValueError):  # mid-replace: counted next time
                pass
        return total, finished

    def add(self, images: int) -> None:
        self.count += images
        atomic_write_bytes(self.folder / f"rank{self.info.rank}", str(self.count).encode())
        if self.info.is_main:
            self.bar.update(self._all_ranks()[0] - self.bar.n)

    def finish(self) -> None:
        """Say this rank is done and wait for every rank (rank 0's bar going meanwhile): the
        waiting is here, not in a collective, whose timeout a long imbalance would exceed."""
        atomic_write_bytes(self.folder / f"rank{self.info.rank}", f"{self.count} done".encode())
        while True:
            total, finished = self._all_ranks()
            self.bar.update(total - self.bar.n)  # a no-op on the other ranks (disabled bar)
            if finished >= self.info.world_size:
                break
            time.sleep(0.5)
        self.bar.close()


def embed_shard(loaded, shard: str, device: torch.device, reading: LoaderSettings, progress):
    """(image features, caption features, metadata rows) of one shard. The caption row of an
    image is its first caption (clip-retrieval's one text per image), zeros when it has none."""
    loader = make_loader(
        TarCaptioned([shard], loaded.preprocess),
        reading.batch_size,
        reading.workers,
        collate_captioned,
    )

    def counted(batches):
        for batch in batches:
            yield batch
            progress.add(0 if batch["image"] is None else len(batch["image"]))

    part = embed_loader(
        loaded.model, loader, device, fields=("key", "captions", "json"), bar=counted
    )
    if len(part) == 0 and part.skipped.count == 0:  # an empty shard: an empty part
        empty = torch.zeros(0, model_record(loaded, device)["embed_dim"])
        return empty, empty, []
    check_skipped(part.skipped, len(part), reading.max_bad_fraction, shard)
    firsts = [caps[0] if caps else "" for caps in part.rows["captions"]]
    texts = encode_texts(loaded.model, loaded.tokenizer, firsts, device)
    for row, caps in enumerate(part.rows["captions"]):
        if not caps:
            texts[row] = 0.0
    rows = [
        {"image_path": key, "caption": first, "key": key, "shard": shard}
        | {name: value for name, value in extra.items() if name not in _OWN_COLUMNS}
        for key, first, extra in zip(part.rows["key"], firsts, part.rows["json"], strict=True)
    ]
    return part.image_features, texts, rows


def run_embed_job(loaded, job: EmbedJob, device: torch.device, info: DistInfo) -> dict:
    """Embed this rank's shards (i % world == rank) that have no complete part yet. Returns
    this rank's counts: parts written, parts found done, images."""
    from clipkit.data.sources import read_sizes

    mine = [i for i in range(len(job.shards)) if i % info.world_size == info.rank]
    todo = [i for i in mine if not job.part(i).done()]
    for i in sorted(set(mine) - set(todo)):
        log.info("part %s: already complete, skipped", job.part(i).metadata.name)
    pending = [s for i, s in enumerate(job.shards) if not job.part(i).done()]
    progress = RankProgress(job.out, info, read_sizes(pending) if pending else 0)
    start, images = time.perf_counter(), 0
    try:
        for i in todo:
            image_rows, text_rows, metadata = embed_shard(
                loaded, job.shards[i], device, job.reading, progress
            )
            as_dtype = np.dtype(job.dtype)
            write_part(
                job.part(i),
                image_rows.numpy().astype(as_dtype),
                text_rows.numpy().astype(as_dtype),
                metadata,
            )
            images += len(metadata)
            log.info("part %s: %d images written", job.part(i).metadata.name, len(metadata))
    except BaseException:
        progress.bar.close()  # no waiting for the other ranks: torchrun stops them
        raise
    progress.finish()
    return {
        "written": len(todo),
        "skipped": len(mine) - len(todo),
        "images": images,
        "seconds": time.perf_counter() - start,
    }


def model_record(loaded, device: torch.device) -> dict:
    """How to load the encoder again and what it embeds into (an index directory's model.json)."""
    dim = encode_texts(loaded.model, loaded.tokenizer, ["a"], device).shape[1]
    return {**loaded.source, "name": loaded.name, "sha256": loaded.sha256, "embed_dim": int(dim)}


def collection_shards(data: str, split: str = "test") -> list[str]:
    """The tar shards of `data` (a .tar, a folder of them, or DIR/{split}/*.tar)."""
    from clipkit.data.eval_pairs import paired_set

    pairs = paired_set(data, transform=None, split=split)
    if pairs.kind != "shards":
        raise ConfigError(
            f"{data}: `retrieve embed` reads tar shards (img2dataset output); for a folder of "
            "images use `retrieve index --data`"
        )
    return list(pairs.dataset.shards)


def embed_collection(loaded, job: EmbedJob, device: torch.device) -> dict:
    """Join the torchrun job (if any), record the model on rank 0, embed every rank's parts,
    and wait for all ranks. Returns the counts summed over the ranks."""
    from clipkit import distributed
    from clipkit.eval.sharded import gather

    info = distributed.init(device)
    try:
        failure = None
        if info.is_main:
            try:
                prepare_out(job, model_record(loaded, device))
            except (ConfigError, OutputError) as e:  # user errors: every rank stops with one line
                failure = str(e)
        failure = gather(failure, info)[0]  # every rank learns whether rank 0 refused
        if failure:
            raise ConfigError(failure)
        counts = gather(run_embed_job(loaded, job, device, info), info)
    finally:
        distributed.cleanup()
    return {key: sum(c[key] for c in counts) for key in ("written", "skipped", "images")} | {
        "seconds": max(c["seconds"] for c in counts),
        "parts": len(job.shards),
    }
