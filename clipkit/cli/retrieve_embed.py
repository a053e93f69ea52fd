"""`clipkit retrieve embed`: a shard collection's image and caption embeddings in
clip-retrieval's inference layout, spread over torchrun ranks, resumable
(`clipkit.eval.embed_parts`). Registered on the `retrieve` group by clipkit.cli.retrieve."""

from __future__ import annotations

import functools

import click

from clipkit.cli.main import run_guarded, stack_options
from clipkit.cli.options import (
    ModelSource,
    load_for_eval,
    loader_options,
    model_options,
    pick,
    pick_loading,
)


@click.command()
@model_options
@click.option(
    "--data",
    required=True,
    help="img2dataset shards: a .tar, a folder of them, or DIR/{split}/*.tar.",
)
@click.option("--split", default="test", show_default=True, help="Split folder, if --data has one.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Embedding folder (img_emb/, text_emb/, metadata/). Rerun with the same --out to "
    "resume: complete parts are kept.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Type of the written embeddings (computed in float32).",
)
@functools.partial(stack_options, options=loader_options())
def embed(data, split, out, dtype, **kwargs):
    """Embed images and captions of shards into clip-retrieval's layout, one part per shard.

    \b
    Spread over processes / GPUs / nodes with torchrun (shard i goes to rank i % world):
      torchrun --nproc_per_node 2 -m clipkit retrieve embed --checkpoint runs/demo \\
          --data demo_data/eval --out emb
    Each part is written atomically; a killed job rerun with the same --out skips finished
    parts. Then: clipkit retrieve index --embeddings emb --out idx"""
    from pathlib import Path

    from clipkit.eval.embed_parts import (
        EmbedJob,
        collection_shards,
        embed_collection,
        guard_embed_out,
    )

    source = pick(ModelSource, kwargs)
    reading, device = pick_loading(kwargs)
    run_guarded(guard_embed_out, out, source.flags(), data)
    shards = run_guarded(collection_shards, data, split)
    from clipkit.devices import pick_device
    from clipkit.distributed import env_info

    # under torchrun, plain `cuda` (or auto) is this process's local GPU, as in training
    local = run_guarded(pick_device, device, env_info())
    loaded, dev = load_for_eval(source, str(local))
    job = EmbedJob([str(Path(s).resolve()) for s in shards], Path(out), dtype, reading)
    counts = run_guarded(embed_collection, loaded, job, dev)
    if counts is not None and _is_main_process():
        click.echo(
            f"embeddings: {out}  ({counts['parts']} parts: {counts['written']} written, "
            f"{counts['skipped']} already complete; {counts['images']} images embedded in "
            f"{counts['seconds']:.1f}s)"
        )


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
