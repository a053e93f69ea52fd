"""`clipkit data ...`: the built-in demo dataset."""

from __future__ import annotations

import click

from clipkit.cli.main import fail, run_guarded, stack_options
from clipkit.cli.options import option_rows


@click.group()
def data():
    """Datasets: pack your own images and captions; write the demo data; check shards."""


def _demo_options(fn):
    out = click.option(
        "--out",
        required=True,
        type=str,
        help="Folder to write (train/, eval/, zeroshot/): new, empty, or an earlier demo output "
        "(replaced); any other folder is refused, so a user's own shards are never deleted.",
    )
    rows = [
        ("--seed", 0, click.IntRange(min=0), "Same seed, same bytes."),
        ("--train-samples", 5000, None, "Training pairs."),
        (
            "--eval-samples",
            500,
            None,
            "Held-out pairs (attribute combinations never seen in training).",
        ),
        (
            "--probe-train-samples",
            1000,
            None,
            "Labelled training images of the zero-shot/probe sets.",
        ),
        ("--image-size", 64, None, "Image side in pixels."),
        ("--shard-size", 1000, None, "Samples per shard."),
        (
            "--captions",
            "all",
            click.Choice(["all", "no-colour"]),  # clipkit.data.demo.CAPTION_SETS, kept light
            "all: captions name the shape and the colour (and sometimes size, count, position, "
            "background). no-colour: the same captions without any colour word, for training "
            "with colour-changing augmentation; images and attributes are the same.",
        ),
    ]
    return stack_options(fn, [out, *option_rows(rows)])


@data.command()
@_demo_options
def demo(
    out, seed, train_samples, eval_samples, probe_train_samples, image_size, shard_size, captions
):
    """Write synthetic captioned scenes (shapes, colours, counts, positions, backgrounds) as
    WebDataset shards, a held-out eval split, and CLIP_benchmark-style classification sets."""
    from clipkit.data.demo import write_demo

    summary = run_guarded(
        write_demo,
        out,
        seed=seed,
        train_samples=train_samples,
        eval_samples=eval_samples,
        probe_train_samples=probe_train_samples,
        image_size=image_size,
        shard_size=shard_size,
        captions=captions,
    )
    click.echo(f"demo data written to {out}")
    for key, value in summary.items():
        if isinstance(value, (int, str)):
            click.echo(f"  {key}: {value}")


def _check_options(fn):
    rows = [
        ("--image-key", "jpg;jpeg;png;webp", None, "Image member extensions, ';'-separated."),
        ("--text-key", "txt", None, "Caption member extension."),
        (
            "--max-pixels",
            89_478_485,
            click.IntRange(min=1),
            "Images with more pixels count as bad (decompression-bomb guard).",
        ),
    ]
    flags = [
        click.option(
            "--no-sizes", is_flag=True, help="Do not write sizes.json next to the shards."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]
    return stack_options(fn, [click.argument("shards"), *option_rows(rows), *flags])


@data.command()
@_check_options
def check(shards, image_key, text_key, max_pixels, no_sizes, as_json):
    """Read every shard of SHARDS (a directory, brace pattern or '::'-joined list): count samples
    and bad samples by reason, summarise image sizes and caption lengths, and write sizes.json
    (samples per shard, what `clipkit pretrain` reads for the epoch length)."""
    import json

    from clipkit.data.check import check_shards, format_report
    from clipkit.data.sources import expand_sources

    urls = run_guarded(expand_sources, shards)
    report = check_shards(urls, image_key, text_key, max_pixels, write_sizes=not no_sizes)
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report))
    if report["samples"] == 0:
        fail(f"no usable samples in {len(urls)} shard(s) (see the report above)")


def _pack_options(fn):
    kinds = click.Choice(["table", "sidecar", "classes", "hf"])
    modes = click.Choice(["keep_ratio", "center_crop", "border", "no"])
    rows = [
        ("--kind", None, kinds, "What SOURCE is (default: detected from what it holds)."),
        ("--image-col", "image", None, "Table / HF column with the image path (or image)."),
        ("--caption-col", "caption", None, "Table / HF column with the caption."),
        ("--label-col", None, None, "Table column with the class (for --eval-layout)."),
        (
            "--template",
            "a photo of a {c}.",
            None,
            "Caption of class-folder images ({c}: the class); also the --eval-layout template.",
        ),
        ("--resize-mode", "keep_ratio", modes, "keep_ratio: shorter side to --image-size; "
         "center_crop: then the middle square; border: longer side, padded; no: as is."),
        ("--image-size", 256, click.IntRange(min=8), "Side in pixels (see --resize-mode)."),
        ("--quality", 95, click.IntRange(1, 100), "JPEG quality."),
        ("--shard-size", 10_000, click.IntRange(min=1), "Samples per shard."),
        ("--processes", 1, click.IntRange(min=1), "Worker processes."),
        ("--seed", 0, click.IntRange(min=0), "Shuffle seed: same inputs and seed, same bytes."),
        (
            "--max-pixels",
            89_478_485,
            click.IntRange(min=1),
            "Larger images are skipped (decompression-bomb guard).",
        ),
        ("--split", "test", None, "Split folder of --eval-layout."),
    ]  # fmt: skip
    flags = [
        click.option(
            "--eval-layout",
            is_flag=True,
            help="Write CLIP_benchmark's classification layout (KEY.png + KEY.cls, "
            "classnames.txt, templates) for `zero-shot wds` / `probe wds`.",
        ),
        click.option(
            "--overwrite", is_flag=True, help="Replace an --out that holds a different pack."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]
    args = [click.argument("source"), click.option("--out", required=True, help="Folder to write.")]
    return stack_options(fn, [*args, *option_rows(rows), *flags])


@data.command()
@_pack_options
def pack(source, out, as_json, **kwargs):
    """Pack your own images and captions into WebDataset shards for `clipkit pretrain`.

    SOURCE is a CSV/TSV/Parquet table (image path + caption columns), a folder of images with
    captions beside them (a.jpg + a.txt), a folder of class folders (class/a.jpg), or a Hugging
    Face dataset saved with `save_to_disk`. Unusable inputs and exact duplicates are skipped and
    counted; an interrupted pack resumes when run again with the same arguments."""
    import json

    from tqdm import tqdm

    from clipkit.data.pack import PackOptions, format_report
    from clipkit.data.pack import pack as pack_data

    bars: dict[str, tqdm] = {}

    def progress(phase: str, n: int, total: int) -> None:
        if phase not in bars:  # no bar when stderr is not a terminal (disable=None)
            label = "reading" if phase == "read" else "packing"
            bars[phase] = tqdm(total=total, desc=label, unit="img", leave=False, disable=None)
        bars[phase].update(n)

    def pack_then_close_bars(options: PackOptions) -> dict:
        try:
            return pack_data(options, progress)
        finally:  # before an error line is printed
            for bar in bars.values():
                bar.close()

    report = run_guarded(pack_then_close_bars, PackOptions(source, out, **kwargs))
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report))
