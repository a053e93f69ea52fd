"""`clipkit retrieve index | search | eval`: FAISS indexes over image embeddings, text or image
queries with an HTML gallery, and recall@k measured exactly and through the index."""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import asdict, dataclass, replace

import click

from clipkit.cli.main import fail, run_guarded, stack_options
from clipkit.cli.options import (
    NON_NEGATIVE_INT,
    FiniteFloatRange,
    ModelSource,
    check_output,
    load_for_eval,
    loader_options,
    model_options,
    option_rows,
    output_option,
    pick,
    pick_loading,
    write_output,
)
from clipkit.cli.retrieve_embed import embed
from clipkit.eval import LoaderSettings

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise

INDEX_TYPES = click.Choice(["auto", "flat", "hnsw", "ivf-flat", "ivf-sq", "ivf-pq"])
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str) -> int:
    """'4GB', '512M', '1.5g', '1000000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        fail(f"--max-memory: cannot read '{text}'; use e.g. 4GB, 512MB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def guarded(fn):
    """Index budget errors (no index kind fits --max-memory) are user errors too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from clipkit.index import IndexBudgetError

        try:
            return fn(*args, **kwargs)
        except IndexBudgetError as e:
            fail(str(e))

    return wrapper


@dataclass(frozen=True)
class IndexSettings:
    """--index-type, --max-memory (in bytes), --target-recall, --seed."""

    index_type: str
    max_memory: int
    target_recall: float
    seed: int

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> IndexSettings:
        settings = pick(cls, kwargs)
        return replace(settings, max_memory=parse_memory(settings.max_memory))

    def build_args(self) -> dict:
        """Keyword arguments of the library's index builders."""
        return asdict(self)


def index_options(fn):
    rows = [
        (
            "--index-type",
            "auto",
            INDEX_TYPES,
            "auto picks under --max-memory: exact below 10k vectors, HNSW / IVF-Flat while "
            "they fit, IVF with 8/6/4-bit residual codes (ivf-sq), then OPQ+IVF-PQ.",
        ),
        ("--max-memory", "8GB", None, "Memory budget of the index (e.g. 4GB, 512MB)."),
        (
            "--target-recall",
            0.95,
            FiniteFloatRange(0, 1, min_open=True),
            "Tune nprobe / efSearch until recall@10 vs exact search reaches this.",
        ),
        ("--seed", 0, NON_NEGATIVE_INT, "Seed of index training."),
    ]
    return stack_options(fn, option_rows(rows))


def data_options(fn, required: bool = True):
    options = [
        click.option(
            "--data",
            required=required,
            help="Captioned data: img2dataset shards (a .tar or a folder of them), "
            "DIR/{split}/*.tar (CLIP_benchmark retrieval), or a folder of images + .txt files.",
        ),
        click.option(
            "--split", default="test", show_default=True, help="Split folder, if --data has one."
        ),
        *loader_options(),
    ]
    return stack_options(fn, options)


@click.group()
def retrieve():
    """FAISS retrieval: build an index, search it, measure recall@k.

    \b
      clipkit retrieve index --checkpoint runs/demo --data demo_data/eval --out idx
      clipkit retrieve search --index idx --text "a red star" -k 8 --html gallery.html
      clipkit retrieve eval --checkpoint runs/demo --data demo_data/eval --k 1,5,10
    """


retrieve.add_command(embed)  # `retrieve embed` lives in its own module (clipkit.cli.retrieve_embed)


def _embed(source: ModelSource, data, split, reading: LoaderSettings, device: str):
    from clipkit.data.eval_pairs import paired_set
    from clipkit.eval.retrieval import embed_pairs

    loaded, dev = load_for_eval(source, device)
    pairs = run_guarded(paired_set, data, loaded.preprocess, split)
    emb = run_guarded(embed_pairs, loaded, pairs, dev, reading)
    return loaded, pairs, emb


@retrieve.command(name="index")
@model_options
@functools.partial(data_options, required=False)
@click.option(
    "--embeddings",
    type=click.Path(file_okay=False),
    help="Build from an embedding folder (`retrieve embed`) instead of --data: parts are read "
    "memory-mapped, one at a time; beyond --max-memory the IVF lists go to disk "
    "(image.ivfdata). The model is the one the folder records.",
)
@index_options
@click.option("--out", required=True, type=click.Path(), help="Index directory to write.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --out that is an earlier index directory (no other folder is "
    "ever replaced).",
)
@guarded
def index_cmd(data, split, embeddings, out, overwrite, **kwargs):
    """Embed images and captions (--data) or read embeddings (--embeddings), build and tune a
    FAISS index, write it with its metadata."""
    from clipkit.eval.retrieval import build_index_dir, guard_index_out

    settings = IndexSettings.from_kwargs(kwargs)
    source = pick(ModelSource, kwargs)
    if (data is None) == (embeddings is None):
        fail("give exactly one of --data or --embeddings")
    if embeddings is not None:
        if any(source.flags().values()):
            fail("--embeddings records its model; drop --checkpoint / --model / --pretrained")
        from clipkit.eval.parts_index import index_from_embeddings

        report = run_guarded(
            index_from_embeddings, embeddings, out, **settings.build_args(), overwrite=overwrite
        )
        return _report_index(out, report, settings)
    run_guarded(guard_index_out, out, source.flags(), data, overwrite)  # before the work, not after
    loaded, pairs, emb = _embed(source, data, split, *pick_loading(kwargs))
    report = run_guarded(
        build_index_dir,
        loaded,
        emb,
        out,
        **settings.build_args(),
        overwrite=overwrite,
        data_root=pairs.root,
    )
    _report_index(out, report, settings)


def _report_index(out, report: dict, settings: IndexSettings) -> None:
    k = report["k"]
    click.echo(
        f"index: {out}  ({report['index_type']}, {report['ntotal']} images x {report['dim']} "
        f"dims, {report['size_bytes']:,} bytes, built in {report['build_seconds']:.2f}s)\n"
        f"  recall@{k} vs exact: {report[f'recall@{k}']:.4f} (target {settings.target_recall}, "
        f"queries: {report['tuning_queries']}); median query {report['median_query_ms']:.3f} ms"
        + ("\n  inverted lists on disk: image.ivfdata" if report.get("on_disk_lists") else "")
    )
    _warn_shortfall(report, settings.max_memory)


def _warn_shortfall(report: dict, budget: int) -> None:
    """Say plainly when tuning missed the recall target (never a silent shortfall)."""
    from clipkit.index import shortfall_message

    message = shortfall_message(report, budget)
    if message:
        click.echo(message, err=True)


def _query_vector(loaded, dev, text, image):
    import torch

    from clipkit.eval.embed import encode_images, encode_texts

    if text is not None:
        return encode_texts(loaded.model, loaded.tokenizer, [text], dev).numpy()
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            pixels = loaded.preprocess(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        fail(f"--image {image}: cannot read the image ({type(e).__name__})")
    return encode_images(loaded.model, torch.stack([pixels]), dev).numpy()


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "none (random weights)"


def _check_same_weights(idx, loaded, explicit: str | None, allow: bool) -> None:
    """Queries must be embedded by the weights that embedded the images: compare the sha256
    recorded in model.json with the weights loaded now. A changed recorded checkpoint (e.g.
    trained further) is refused unless `allow`; an explicit --checkpoint is the user's choice,
    so a different one only gets a warning."""
    recorded = idx.model_info.get("sha256")
    if loaded.sha256 == recorded:
        return
    shas = f"sha256 {_short(loaded.sha256)} now, {_short(recorded)} when the index was built"
    if explicit:
        click.echo(
            f"warning: --checkpoint {explicit} is not the checkpoint the index was built with "
            f"({shas}); queries and images are embedded by different weights",
            err=True,
        )
        return
    source = loaded.pretrained or loaded.name
    if not allow:
        fail(
            f"{source} has changed since the index was built ({shas}; trained further?): "
            "rebuild the index (`clipkit retrieve index ... --overwrite`) or pass "
            "--allow-checkpoint-mismatch to search it with the new weights"
        )
    click.echo(
        f"warning: {source} has changed since the index was built ({shas}); searching with "
        "the new weights (--allow-checkpoint-mismatch)",
        err=True,
    )


@retrieve.command()
@click.option("--index", "index_dir", required=True, help="Index directory (`retrieve index`).")
@click.option("--text", help="Text query.")
@click.option("--image", type=str, help="Image file query.")
@click.option(
    "-k", default=10, type=click.IntRange(min=1), show_default=True, help="Number of results."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--html", type=click.Path(dir_okay=False), help="Write an HTML gallery here.")
@click.option(
    "--checkpoint",
    "-c",
    help="Embed the query with this checkpoint instead of the one recorded in the index "
    "(a warning says so when its weights differ).",
)
@click.option(
    "--allow-checkpoint-mismatch",
    is_flag=True,
    help="Search even when the index's checkpoint has changed since it was built (e.g. "
    "trained further): queries then use the new weights, the images the old ones.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda[:N].")
def search(index_dir, text, image, k, as_json, html, checkpoint, allow_checkpoint_mismatch, device):
    """Search an index by text or image: rank, score, key and caption.

    The query is embedded with the checkpoint recorded in the index; if that file has changed
    since (its sha256 differs), search refuses unless --allow-checkpoint-mismatch."""
    from clipkit.eval.loading import load_from_source, pick_device
    from clipkit.eval.retrieval import open_index_dir, search_index_dir

    if (text is None) == (image is None):
        fail("give exactly one of --text or --image")
    if html:
        _check_html(html, index_dir)
    idx = run_guarded(open_index_dir, index_dir)
    if k > idx.index.ntotal:
        fail(
            f"-k {k} is larger than the index ({idx.index.ntotal} images); use -k <= "
            f"{idx.index.ntotal}"
        )
    dev = run_guarded(pick_device, device)
    source = {"checkpoint": checkpoint} if checkpoint else idx.model_info
    loaded = run_guarded(load_from_source, source, dev)
    _check_same_weights(idx, loaded, checkpoint, allow_checkpoint_mismatch)
    query = _query_vector(loaded, dev, text, image)
    hits = run_guarded(search_index_dir, idx, query, k)
    if as_json:
        click.echo(json.dumps({"query": text or image, "k": k, "results": hits}, indent=2))
    else:
        for h in hits:
            click.echo(f"{h['rank']:>3}  {h['score']:.4f}  {h['key']}  {h['caption']}")
    if html:
        from clipkit.eval.gallery import gallery_html
        from clipkit.fileio import write_output_file

        label = f"text: {text}" if text else f"image: {image}"
        page = gallery_html(label, hits, f"top {k} of {idx.index.ntotal} from {index_dir}")
        run_guarded(write_output_file, html, page.encode("utf-8"))
        click.echo(f"gallery: {html}", err=as_json)


def _check_html(html, index_dir) -> None:
    """--html must be writable and must not overwrite the index or its files."""
    from pathlib import Path

    from clipkit.fileio import guard_output_file

    folder = Path(index_dir)
    inputs = [folder] + (list(folder.iterdir()) if folder.is_dir() else [])
    run_guarded(guard_output_file, html, inputs=inputs, flag="--html")


def parse_ks(ks: str) -> list[int]:
    """--k '1,5,10' -> [1, 5, 10] (sorted, unique, each >= 1)."""
    try:
        k_list = sorted({int(k) for k in ks.split(",") if k.strip()})
    except ValueError:
        fail(f"--k: expected comma-separated integers, got '{ks}'")
    if not k_list or k_list[0] < 1:
        fail("--k values must be >= 1")
    return k_list


@retrieve.command(name="eval")
@model_options
@data_options
@index_options
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma-separated k list.")
@output_option("Results JSON file.")
@guarded
def eval_cmd(data, split, ks, output, **kwargs):
    """Image->text and text->image recall@k, exact and through FAISS indexes."""
    from clipkit.data.sources import local_paths
    from clipkit.eval.results import retrieval_record, table
    from clipkit.eval.retrieval import evaluate_retrieval

    k_list = parse_ks(ks)
    source = pick(ModelSource, kwargs)
    check_output(output, source, *local_paths(data))
    settings = IndexSettings.from_kwargs(kwargs)
    loaded, pairs, emb = _embed(source, data, split, *pick_loading(kwargs))
    out = run_guarded(evaluate_retrieval, emb, k_list, **settings.build_args())
    for report in out["indexes"].values():
        _warn_shortfall(report, settings.max_memory)
    n_img, n_txt = len(emb.keys), len(emb.text_features)
    rows = [(f"{name} exact", value) for name, value in out["metrics"].items()]
    rows += [(f"{name} index", out["index_metrics"][name]) for name in out["metrics"]]
    click.echo(table(rows, f"retrieval on {pairs.root} ({n_img} images, {n_txt} captions)"))
    write_output(output, retrieval_record(loaded, pairs, emb, out, k_list, settings.seed))


def _register_serve() -> None:
    """`retrieve serve` lives in clipkit/cli/serve.py (this file stays small)."""
    from clipkit.cli.serve import serve

    retrieve.add_command(serve)


_register_serve()
