"""The `clipkit` command group. Subcommands live one per module and are imported lazily, and each
imports torch inside its body, so `clipkit --help` is instant.

User mistakes end with one line `error: ...` on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import importlib
import logging
import sys

import click

# name -> (module, function, one-line help)
COMMANDS = {
    "pretrain": (
        "clipkit.cli.pretrain",
        "pretrain",
        "Train CLIP / MS-CLIP / A-CLIP / FLIP on WebDataset shards.",
    ),
    "zero-shot": (
        "clipkit.cli.zero_shot",
        "zero_shot",
        "Zero-shot classification (ImageNet, folders, CLIP_benchmark WDS, demo).",
    ),
    "retrieve": (
        "clipkit.cli.retrieve",
        "retrieve",
        "Retrieval: embed a collection, build a FAISS index, search, evaluate, serve over HTTP.",
    ),
    "probe": ("clipkit.cli.probe", "probe", "Linear probe on frozen image features."),
    "export": (
        "clipkit.cli.export",
        "export",
        "Export a checkpoint to an open_clip local-dir folder.",
    ),
    "data": (
        "clipkit.cli.data",
        "data",
        "Datasets: pack your own images and captions into shards, or write the demo data.",
    ),
    "models": ("clipkit.cli.models", "models", "List model names and presets, or describe one."),
    "inspect": ("clipkit.cli.inspect", "inspect", "Pictures of what a model does (A-CLIP masks)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, **extra):
        """Run with our own error reporting: one line, exit 2 for every user mistake."""
        try:
            return super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            fail(f"{e.format_message()}{hint}")
        except click.ClickException as e:
            fail(e.format_message())


def fail(message: str, code: int = 2):
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def user_errors():
    """Exception types that are the user's mistake (printed on one line, exit 2)."""
    from clipkit.checkpoint import CheckpointError
    from clipkit.config import ConfigError
    from clipkit.fileio import OutputError

    types: list[type] = [ConfigError, CheckpointError, OutputError, FileNotFoundError]
    index = sys.modules.get("clipkit.index")  # only loaded (with faiss) by retrieval commands
    if index is not None:
        types.append(index.IndexMismatchError)
    return tuple(types)


def stack_options(fn, options: list):
    """Apply click decorators so `--help` lists them in the order given."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_guarded(fn, *args, **kwargs):
    """Call a library function; user mistakes become one-line errors with exit 2."""
    try:
        return fn(*args, **kwargs)
    except user_errors() as e:
        fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="clipkit")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool):
    """clipkit: contrastive language-image pretraining, evaluation and retrieval in one tool.

    \b
    Quick start:
      clipkit data demo --out demo_data
      clipkit pretrain --data demo_data/train --out runs/demo --model tiny --steps 200
      clipkit zero-shot demo --checkpoint runs/demo
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


if __name__ == "__main__":
    cli()
