"""Evaluation commands: `clipkit zero-shot`, `clipkit probe`, `clipkit export` (and the options
they share with `clipkit retrieve`). Each parses, calls one library function, prints."""

from __future__ import annotations

import json
import math

import click

from clipkit.cli.main import fail, run_guarded, stack_options

DATASET_CHOICE = click.Choice(["imagenet", "folder", "wds", "demo"])


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan (it passes every range comparison) and inf."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


# Option types shared by the evaluation commands (click's messages go through the one-line
# error path: "Invalid value for '--batch-size': 0 is not in the range x>=1.").
POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)
FRACTION = FiniteFloatRange(0, 1)  # [0, 1]
OPEN_FRACTION = FiniteFloatRange(0, 1, min_open=True, max_open=True)  # (0, 1)
POSITIVE_FLOAT = FiniteFloatRange(min=0, min_open=True)
NON_NEGATIVE_FLOAT = FiniteFloatRange(min=0)


def loader_options() -> list:
    """--batch-size, --workers, --device, --max-bad-fraction (evaluation and retrieval)."""
    return [
        click.option(
            "--batch-size",
            default=64,
            type=POSITIVE_INT,
            show_default=True,
            help="Images per batch.",
        ),
        click.option(
            "--workers",
            default=2,
            type=NON_NEGATIVE_INT,
            show_default=True,
            help="Data loader worker processes.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto (CUDA if present), cpu, cuda or cuda:N.",
        ),
        click.option(
            "--max-bad-fraction",
            default=0.01,
            type=FRACTION,
            show_default=True,
            help="Unreadable images are skipped and counted; stop if more than this share is.",
        ),
    ]


def model_options(fn):
    """--checkpoint | --model [--pretrained], --weights."""
    options = [
        click.option(
            "--checkpoint",
            "-c",
            type=str,
            help="clipkit checkpoint file, or a run directory (uses its checkpoints/latest.pt).",
        ),
        click.option(
            "--model",
            type=str,
            help="open_clip model instead of a checkpoint: NAME (with --pretrained FILE) or "
            "local-dir:DIR (an open_clip / `clipkit export` folder).",
        ),
        click.option("--pretrained", type=str, help="Local open_clip weights file for --model."),
        click.option(
            "--weights",
            type=click.Choice(["online", "ema"]),
            default="online",
            show_default=True,
            help="Which weights of the checkpoint: the trained ones, or the EMA copy (A-CLIP).",
        ),
    ]
    return stack_options(fn, options)


def run_options(fn):
    """--batch-size, --workers, --device, --max-bad-fraction, --output."""
    options = [
        *loader_options(),
        click.option(
            "--output",
            "-o",
            type=click.Path(dir_okay=False),
            help="Write the results JSON (CLIP_benchmark's shape + a clipkit block) here.",
        ),
    ]
    return stack_options(fn, options)


def dataset_options(fn):
    options = [
        click.argument("dataset", type=DATASET_CHOICE),
        click.option(
            "--data-root",
            required=True,
            type=str,
            help="Dataset directory (imagenet: synset folders; folder: ImageFolder tree; wds: "
            "CLIP_benchmark layout; demo: a `clipkit data demo` folder).",
        ),
        click.option(
            "--task",
            type=click.Choice(["shape", "colour"]),
            default="shape",
            show_default=True,
            help="demo only: classify shapes or colours.",
        ),
        click.option(
            "--templates",
            type=click.Path(dir_okay=False),
            help="Prompt templates file, one per line with {c} for the class name.",
        ),
        click.option(
            "--classnames",
            type=click.Path(dir_okay=False),
            help="Class names file, one per line in class-index order (folder, wds).",
        ),
    ]
    return stack_options(fn, options)


def load_for_eval(checkpoint, model, pretrained, weights, device):
    """Validate the model flags up front, then load; returns (LoadedModel, torch.device)."""
    from clipkit.eval.loading import load_model, pick_device

    dev = run_guarded(pick_device, device)
    loaded = run_guarded(
        load_model,
        checkpoint=checkpoint,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=dev,
    )
    return loaded, dev


def check_output(output, checkpoint, model, pretrained, *data) -> None:
    """Before any work: `-o` must be writable and must not be one of the inputs (the checkpoint,
    weights, data, templates...)."""
    if not output:
        return
    from clipkit.eval.loading import model_inputs
    from clipkit.fileio import guard_output_file

    inputs = model_inputs({"checkpoint": checkpoint, "model": model, "pretrained": pretrained})
    run_guarded(guard_output_file, output, inputs=inputs + [d for d in data if d])


def write_output(output, result) -> None:
    if output:
        from clipkit.eval.results import write_json

        run_guarded(write_json, output, result)
        click.echo(f"results: {output}")


def _metric_rows(metrics: dict) -> list:
    return [(name, value) for name, value in metrics.items() if isinstance(value, float)]


@click.command(name="zero-shot")
@dataset_options
@click.option("--split", default="test", show_default=True, help="Split folder (wds, demo).")
@model_options
@run_options
def zero_shot(
    dataset,
    data_root,
    task,
    templates,
    classnames,
    split,
    checkpoint,
    model,
    pretrained,
    weights,
    batch_size,
    workers,
    device,
    max_bad_fraction,
    output,
):
    """Zero-shot classification: top-1, top-5 and mean per-class recall.

    \b
    Examples:
      clipkit zero-shot demo --data-root demo_data --checkpoint runs/demo
      clipkit zero-shot imagenet --data-root /data/imagenet --model ViT-B-32 --pretrained w.pt
      clipkit zero-shot wds --data-root /data/wds_cifar10 --checkpoint runs/x -o cifar10.json
    """
    from clipkit.data.eval_sets import classification_set
    from clipkit.eval.results import table
    from clipkit.eval.zero_shot import run_zero_shot

    check_output(output, checkpoint, model, pretrained, data_root, templates, classnames)
    loaded, dev = load_for_eval(checkpoint, model, pretrained, weights, device)
    data = run_guarded(
        classification_set,
        dataset,
        data_root,
        split,
        loaded.preprocess,
        task=task,
        templates_file=templates,
        classnames_file=classnames,
    )
    result = run_guarded(
        run_zero_shot,
        loaded,
        data,
        device=dev,
        batch_size=batch_size,
        workers=workers,
        max_bad_fraction=max_bad_fraction,
    )
    n = result["clipkit"]["num_samples"]
    title = (
        f"zero-shot {data.name} ({n} images, {len(data.classnames)} classes, "
        f"{len(data.templates)} templates; chance top-1 {100 / len(data.classnames):.2f}%)"
    )
    click.echo(table(_metric_rows(result["metrics"]), title))
    write_output(output, result)


@click.command()
@dataset_options
@click.option("--train-split", default="train", show_default=True, help="Split to fit on.")
@click.option("--test-split", default="test", show_default=True, help="Split to score on.")
@click.option("--shots", type=POSITIVE_INT, help="Few-shot: K training images per class.")
@click.option(
    "--seeds", default=3, type=POSITIVE_INT, show_default=True, help="Few-shot: number of seeds."
)
@click.option(
    "--seed",
    default=0,
    type=NON_NEGATIVE_INT,
    show_default=True,
    help="Seed of the validation split.",
)
@click.option(
    "--val-fraction",
    default=0.2,
    type=OPEN_FRACTION,
    show_default=True,
    help="Share of train held out to sweep the weight decay, in (0, 1).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Feature cache (default $CLIPKIT_CACHE or ~/.cache/clipkit/features).",
)
@click.option("--no-cache", is_flag=True, help="Always recompute the features.")
@click.option(
    "--method",
    "probe_method",
    type=click.Choice(["linear", "vqt"]),
    default="linear",
    show_default=True,
    help="linear: logistic regression on cached features; vqt: Visual Query Tuning "
    "(Tang et al., arXiv 2212.03220), learnable queries in every frozen ViT layer + a linear head.",
)
@click.option(
    "--vqt-queries",
    default=5,
    type=POSITIVE_INT,
    show_default=True,
    help="vqt: query tokens per layer.",
)
@click.option(
    "--vqt-epochs", default=10, type=POSITIVE_INT, show_default=True, help="vqt: passes over train."
)
@click.option(
    "--vqt-lr",
    default=1e-3,
    type=POSITIVE_FLOAT,
    show_default=True,
    help="vqt: AdamW learning rate.",
)
@click.option(
    "--vqt-weight-decay",
    default=1e-4,
    type=NON_NEGATIVE_FLOAT,
    show_default=True,
    help="vqt: AdamW weight decay.",
)
@click.option(
    "--vqt-batch-size",
    default=32,
    type=POSITIVE_INT,
    show_default=True,
    help="vqt: training batch.",
)
@model_options
@run_options
def probe(
    dataset,
    data_root,
    task,
    templates,
    classnames,
    train_split,
    test_split,
    shots,
    seeds,
    seed,
    val_fraction,
    cache_dir,
    no_cache,
    probe_method,
    vqt_queries,
    vqt_epochs,
    vqt_lr,
    vqt_weight_decay,
    vqt_batch_size,
    checkpoint,
    model,
    pretrained,
    weights,
    batch_size,
    workers,
    device,
    max_bad_fraction,
    output,
):
    """Linear probe on frozen image features (weight decay swept on a validation split), or a
    Visual Query Tuning probe (--method vqt) on the frozen ViT.

    \b
    Examples:
      clipkit probe demo --data-root demo_data --checkpoint runs/demo
      clipkit probe folder --data-root /data/pets --checkpoint runs/x --shots 16 --seeds 3
      clipkit probe demo --data-root demo_data --checkpoint runs/demo --method vqt --vqt-queries 5
    """
    from pathlib import Path

    from clipkit.data.eval_sets import classification_set
    from clipkit.eval.linear_probe import default_cache_dir, run_probe
    from clipkit.eval.results import table
    from clipkit.fileio import check_writable

    check_output(output, checkpoint, model, pretrained, data_root, templates, classnames)
    loaded, dev = load_for_eval(checkpoint, model, pretrained, weights, device)
    sets = [
        run_guarded(
            classification_set,
            dataset,
            data_root,
            split,
            loaded.preprocess,
            task=task,
            templates_file=templates,
            classnames_file=classnames,
            strict_split=True,
        )
        for split in (train_split, test_split)
    ]
    if probe_method == "vqt":
        if shots is not None:
            fail("--shots is not supported with --method vqt")
        from clipkit.eval.vqt import run_vqt_probe

        result = run_guarded(
            run_vqt_probe,
            loaded,
            *sets,
            device=dev,
            num_queries=vqt_queries,
            epochs=vqt_epochs,
            lr=vqt_lr,
            weight_decay=vqt_weight_decay,
            batch_size=vqt_batch_size,
            workers=workers,
            seed=seed,
            max_bad_fraction=max_bad_fraction,
        )
        c = result["clipkit"]
        title = (
            f"VQT probe {sets[0].name} ({vqt_queries} queries/layer, {vqt_epochs} epochs; "
            f"{c['num_train']} train / {c['num_samples']} test images, {c['num_classes']} classes)"
        )
        click.echo(table(_metric_rows(result["metrics"]), title))
        write_output(output, result)
        return
    cache = None if no_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    if cache is not None:
        run_guarded(check_writable, cache / "features.npz")  # a cache dir under a file...
    try:
        result = run_guarded(
            run_probe,
            loaded,
            *sets,
            device=dev,
            batch_size=batch_size,
            workers=workers,
            cache_dir=cache,
            shots=shots,
            seeds=seeds,
            seed=seed,
            val_fraction=val_fraction,
            max_bad_fraction=max_bad_fraction,
        )
    except ValueError as e:  # e.g. a class with fewer images than --shots
        fail(str(e))
    c = result["clipkit"]
    kind = f"{shots}-shot x {seeds} seeds" if shots else "full"
    title = (
        f"linear probe {sets[0].name} ({kind}; {c['num_train']} train / "
        f"{c['num_samples']} test images, {c['num_classes']} classes)"
    )
    click.echo(table(_metric_rows(result["metrics"]), title))
    write_output(output, result)


@click.command()
@click.option("--checkpoint", "-c", required=True, help="clipkit checkpoint file or run dir.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write.")
@click.option(
    "--weights",
    type=click.Choice(["online", "ema"]),
    default="online",
    show_default=True,
    help="online: trained weights; ema: A-CLIP's EMA image tower with the online text tower.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --out folder that is an earlier export (no other folder is ever "
    "replaced).",
)
def export(checkpoint, out, weights, overwrite):
    """Export a checkpoint to an open_clip local-dir folder.

    \b
    The folder loads with:
      open_clip.create_model_and_transforms('local-dir:DIR')
    and with clipkit: --model local-dir:DIR.
    """
    from clipkit.export import export_open_clip

    summary = run_guarded(export_open_clip, checkpoint, out, weights=weights, overwrite=overwrite)
    click.echo(json.dumps(summary, indent=2))
