"""`clipkit retrieve serve`: index directories behind clip-retrieval's back API over HTTP
(clipkit.serve), registered under `clipkit retrieve` by clipkit/cli/retrieve.py."""

from __future__ import annotations

import json

import click

from clipkit.cli.main import fail, run_guarded, stack_options
from clipkit.cli.options import option_rows


def _parse_index_args(values: tuple[str, ...]) -> dict[str, str]:
    """--index DIR or NAME=DIR (repeatable) -> {name: dir}; a bare DIR is named by its folder."""
    from pathlib import Path

    named: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value.rstrip("/")).name or value, value
        if not name or not folder:
            fail(f"--index {value}: expected DIR or NAME=DIR")
        if name in named:
            fail(f"--index: two indexes are named '{name}'; name them with NAME=DIR")
        named[name] = folder
    return named


def _open_collections(named: dict[str, str], device: str, allow_mismatch: bool, inline: bool):
    """Open every index and load each distinct recorded model once."""
    from clipkit.cli.retrieve import _check_same_weights as check_same_weights
    from clipkit.eval.loading import load_from_source, pick_device
    from clipkit.eval.retrieval import open_index_dir
    from clipkit.serve import Collection, Encoder

    dev = run_guarded(pick_device, device)
    encoders: dict[str, Encoder] = {}
    collections = {}
    for name, folder in named.items():
        idx = run_guarded(open_index_dir, folder)
        key = json.dumps({k: idx.model_info.get(k) for k in ("checkpoint", "weights", "model")})
        if key not in encoders:
            loaded = run_guarded(load_from_source, idx.model_info, dev)
            encoders[key] = Encoder(loaded, dev)
        check_same_weights(idx, encoders[key].loaded, None, allow_mismatch)
        collections[name] = Collection.open(name, idx, encoders[key], inline_images=inline)
    return collections


PORT = click.IntRange(0, 65535)
AT_LEAST_ONE = click.IntRange(min=1)
LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"])


def serve_options(fn):
    """The service's address, limits and switches, as (flag, default, type, help) rows."""
    rows = [
        ("--host", "127.0.0.1", None, "Address to listen on."),
        ("--port", 1234, PORT, "Port (clip-retrieval back's); 0 picks a free one, printed."),
        ("--workers", 1, AT_LEAST_ONE, "Threads that encode and search queued queries."),
        ("--max-batch", 32, AT_LEAST_ONE, "Most queued queries one worker takes together."),
        ("--queue-size", 256, AT_LEAST_ONE, "Most queries waiting; more get HTTP 503 at once."),
        (
            "--max-results",
            1000,
            AT_LEAST_ONE,
            "Largest num_images / num_result_ids / /metadata ids of a request (more: 400).",
        ),
        (
            "--inline-images/--no-inline-images",
            True,
            None,
            "Return each result's image inline (base64 'image'), read from the indexed data.",
        ),
        (
            "--file-urls/--no-file-urls",
            True,
            None,
            "Accept file:// image_url queries (files this server can read).",
        ),
        ("--device", "auto", None, "auto, cpu, cuda[:N]."),
        ("--log-level", "warning", LOG_LEVELS, "uvicorn's log level ('info' logs each request)."),
    ]
    return stack_options(fn, option_rows(rows))


@click.command()
@click.option(
    "--index",
    "indexes",
    multiple=True,
    required=True,
    help="Index directory (`retrieve index`) to serve, as DIR (named by its folder) or "
    "NAME=DIR; repeat for several. The first is the default indice_name.",
)
@serve_options
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allow web pages from this origin to query the service (e.g. a clip-front); repeatable.",
)
@click.option(
    "--allow-checkpoint-mismatch",
    is_flag=True,
    help="Serve even when an index's checkpoint has changed since it was built.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Open the indexes, load their models and bind the port, then exit without serving "
    "(a dry run for deployment scripts).",
)
def serve(indexes, host, port, device, allow_checkpoint_mismatch, check, log_level, **kwargs):
    """Serve indexes over HTTP with clip-retrieval's back API, and a search page at /.

    \b
    POST /knn-service   {"text" | "image" (base64) | "image_url" | "embedding_input",
                         "num_images", "num_result_ids", "indice_name", "modality": "image",
                         "deduplicate"}  -> [{"id", "similarity", "caption", "key", "image"}]
    POST /metadata      {"ids", "indice_name"} -> [{"id", "metadata"}]
    GET  /indices-list, GET /health, GET / (web page)

    use_safety_model, use_violence_detector, use_mclip and aesthetic_* are accepted and
    ignored. SIGTERM stops it cleanly: requests in flight are answered first."""
    from clipkit.serve import ServeSettings, create_app, run_server
    from clipkit.serve.server import bind

    names = _parse_index_args(indexes)
    inline, files, cors = kwargs["inline_images"], kwargs["file_urls"], kwargs["cors_origins"]
    collections = _open_collections(names, device, allow_checkpoint_mismatch, inline)
    settings = ServeSettings(
        workers=kwargs["workers"],
        max_batch=kwargs["max_batch"],
        queue_size=kwargs["queue_size"],
        max_results=kwargs["max_results"],
        file_urls=files,
        cors_origins=tuple(cors),
    )
    sock = run_guarded(bind, host, port)
    shown = f"[{host}]" if ":" in host else host
    sizes = ", ".join(f"{n} ({c.size} images)" for n, c in collections.items())
    address = f"http://{shown}:{sock.getsockname()[1]}/"
    if check:
        sock.close()
        click.echo(f"ready to serve {sizes} on {address} (--check: not serving)", err=True)
        return
    click.echo(f"serving {sizes} on {address}", err=True)
    run_server(create_app(collections, settings), sock, log_level=log_level)
