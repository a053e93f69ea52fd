"""Options shared by the evaluation commands (zero-shot, probe, retrieve), defined once: which
model to load, how to feed it data, where to write results, and the click types they use.

Each group of options has a small dataclass built from the click kwargs (`pick`), so a command
body passes one object instead of a dozen loose parameters. Imports of torch-backed modules stay
inside the functions: this module is imported by `clipkit --help` paths."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import click

from clipkit.cli.main import run_guarded, stack_options
from clipkit.eval import LoaderSettings


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

DATASET_CHOICE = click.Choice(["imagenet", "folder", "wds", "demo"])


def pick(cls, kwargs: dict, prefix: str = ""):
    """Build dataclass `cls` from the click kwargs named `prefix + field` (removing them)."""
    return cls(**{f.name: kwargs.pop(prefix + f.name) for f in fields(cls)})


@dataclass(frozen=True)
class ModelSource:
    """--checkpoint | --model [--pretrained], --weights."""

    checkpoint: str | None
    model: str | None
    pretrained: str | None
    weights: str

    def flags(self) -> dict:
        """The model-choosing flags as given (what the library's input checks take)."""
        return {"checkpoint": self.checkpoint, "model": self.model, "pretrained": self.pretrained}


@dataclass(frozen=True)
class DatasetChoice:
    """A classification dataset: DATASET --data-root, --task, --templates, --classnames."""

    dataset: str
    data_root: str
    task: str
    templates: str | None
    classnames: str | None

    def local_inputs(self) -> list:
        """Files and folders the results file must not overwrite."""
        return [self.data_root, self.templates, self.classnames]

    def load(self, split: str, preprocess, strict_split: bool = False):
        """Open one split (a ClassificationSet); a bad layout or file is a one-line error."""
        from clipkit.data.eval_sets import classification_set

        return run_guarded(
            classification_set,
            self.dataset,
            self.data_root,
            split,
            preprocess,
            task=self.task,
            templates_file=self.templates,
            classnames_file=self.classnames,
            strict_split=strict_split,
        )


def option_rows(rows: list) -> list:
    """click options from (flag, default, type, help) rows, each showing its default in --help.
    The flag is a name, or a tuple of names (a short form, a parameter name); a type of None
    lets click infer it; a default of None gives the option none (click's own "not given")."""
    return [_row_option(*row) for row in rows]


def _row_option(flag, default, type_, help_: str):
    names = (flag,) if isinstance(flag, str) else flag
    given = {} if default is None else {"default": default, "show_default": True}
    return click.option(*names, type=type_, help=help_, **given)


def loader_options() -> list:
    """--batch-size, --workers, --device, --max-bad-fraction (evaluation and retrieval)."""
    return option_rows(
        [
            ("--batch-size", LoaderSettings.batch_size, POSITIVE_INT, "Images per batch."),
            (
                "--workers",
                LoaderSettings.workers,
                NON_NEGATIVE_INT,
                "Data loader worker processes.",
            ),
            ("--device", "auto", None, "auto (CUDA if present), cpu, cuda or cuda:N."),
            (
                "--max-bad-fraction",
                LoaderSettings.max_bad_fraction,
                FRACTION,
                "Unreadable images are skipped and counted; stop if more than this share is.",
            ),
        ]
    )


def model_options(fn):
    """--checkpoint | --model [--pretrained], --weights."""
    rows = [
        (
            ("--checkpoint", "-c"),
            None,
            str,
            "clipkit checkpoint file, or a run directory (uses its checkpoints/latest.pt).",
        ),
        (
            "--model",
            None,
            str,
            "open_clip model instead of a checkpoint: NAME (with --pretrained FILE) or "
            "local-dir:DIR (an open_clip / `clipkit export` folder).",
        ),
        ("--pretrained", None, str, "Local open_clip weights file for --model."),
        (
            "--weights",
            "online",
            click.Choice(["online", "ema", "ema-both"]),
            "Which weights of the checkpoint. online: the trained ones; ema: A-CLIP's EMA image "
            "tower with the online text tower; ema-both: the EMA image and text towers (the "
            "official A-CLIP evaluation's pairing; the run must be trained with --ema-text).",
        ),
    ]
    return stack_options(fn, option_rows(rows))


def output_option(help_: str):
    """-o / --output: a results JSON file."""
    return click.option("--output", "-o", type=click.Path(dir_okay=False), help=help_)


def run_options(fn):
    """--batch-size, --workers, --device, --max-bad-fraction, --output."""
    options = [
        *loader_options(),
        output_option("Write the results JSON (CLIP_benchmark's shape + a clipkit block) here."),
    ]
    return stack_options(fn, options)


def dataset_options(fn):
    """DATASET --data-root --task --templates --classnames (zero-shot and probe)."""
    rows = [
        (
            "--task",
            "shape",
            click.Choice(["shape", "colour"]),
            "demo only: classify shapes or colours.",
        ),
        (
            "--templates",
            None,
            click.Path(dir_okay=False),
            "Prompt templates file, one per line with {c} for the class name.",
        ),
        (
            "--classnames",
            None,
            click.Path(dir_okay=False),
            "Class names file, one per line in class-index order (folder, wds).",
        ),
    ]
    data_root = click.option(
        "--data-root",
        required=True,
        type=str,
        help="Dataset directory (imagenet: synset folders; folder: ImageFolder tree; wds: "
        "CLIP_benchmark layout; demo: a `clipkit data demo` folder).",
    )
    options = [click.argument("dataset", type=DATASET_CHOICE), data_root, *option_rows(rows)]
    return stack_options(fn, options)


def pick_loading(kwargs: dict) -> tuple[LoaderSettings, str]:
    """The library's LoaderSettings (--batch-size, --workers, --max-bad-fraction) and --device,
    picked out of the click kwargs."""
    return pick(LoaderSettings, kwargs), kwargs.pop("device")


def load_for_eval(source: ModelSource, device: str):
    """Validate the model flags up front, then load; returns (LoadedModel, torch.device)."""
    from clipkit.eval.loading import load_model, pick_device

    dev = run_guarded(pick_device, device)
    loaded = run_guarded(load_model, **source.flags(), weights=source.weights, device=dev)
    return loaded, dev


def check_output(output, source: ModelSource, *data) -> None:
    """Before any work: `-o` must be writable and must not be one of the inputs (the checkpoint,
    weights, data, templates...)."""
    if not output:
        return
    from clipkit.eval.loading import model_inputs
    from clipkit.fileio import guard_output_file

    inputs = model_inputs(source.flags())
    run_guarded(guard_output_file, output, inputs=inputs + [d for d in data if d])


def write_output(output, result) -> None:
    if output:
        from clipkit.eval.results import write_json

        run_guarded(write_json, output, result)
        click.echo(f"results: {output}")


def echo_metrics(result: dict, title: str) -> None:
    """Print a result's float metrics as a table under `title`."""
    from clipkit.eval.results import table

    rows = [(name, value) for name, value in result["metrics"].items() if isinstance(value, float)]
    click.echo(table(rows, title))


def load_for_dataset(kwargs: dict, output) -> tuple:
    """zero-shot and probe: pick the dataset, model and loader flags out of the click kwargs,
    check -o, load the model; returns (DatasetChoice, LoaderSettings, LoadedModel, device)."""
    chosen = pick(DatasetChoice, kwargs)
    source = pick(ModelSource, kwargs)
    reading, device = pick_loading(kwargs)
    check_output(output, source, *chosen.local_inputs())
    loaded, dev = load_for_eval(source, device)
    return chosen, reading, loaded, dev
