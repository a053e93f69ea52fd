"""`clipkit pretrain`: flags and YAML become one validated Config; the library does the rest."""

from __future__ import annotations

import dataclasses
import typing

import click

from clipkit.cli.main import fail, run_guarded
from clipkit.cli.pretrain_flags import FLAGS, REPEATED, SWITCHES


def _dest(path: str) -> str:
    return path.replace(".", "__")


class _RegistryHelpOption(click.Option):
    """An option whose help names the registered methods, read only when help is shown (so a
    method registered after the CLI was built is listed too)."""

    def get_help_record(self, ctx):
        if self.help and "{methods}" in self.help:
            from clipkit.methods import list_methods

            others = [n for n in list_methods() if n != "clip"]
            self.help = self.help.format(methods=", ".join(["clip (default)", *others]))
        return super().get_help_record(ctx)


def method_flag_rows() -> tuple[list, list]:
    """(FLAGS rows, SWITCHES rows) for the settings of the methods registered now: one flag per
    setting name, its help after the names of the methods it applies to. Torch-free: clipkit's own
    settings classes live in torch-free modules."""
    from clipkit import methods
    from clipkit.config_types import field_types
    from clipkit.method_config import flag_of

    owners: dict[str, list[str]] = {}
    first: dict[str, tuple[type, dataclasses.Field]] = {}
    for name, cls in methods.settings_classes().items():
        for f in dataclasses.fields(cls) if cls is not None else ():
            if f.metadata.get("cli", True):
                owners.setdefault(f.name, []).append(name)
                first.setdefault(f.name, (cls, f))
    flags, switches = [], []
    for key, (cls, f) in first.items():
        help_ = f"{', '.join(owners[key])}: {f.metadata.get('help', '')}"
        hint = field_types(cls)[key]
        if hint is bool:
            switches.append((flag_of(f), f"method.{key}", help_))
        else:
            flags.append((flag_of(f), f"method.{key}", _click_type(hint), help_))
    return flags, switches


def _click_type(hint) -> type:
    """int / float / str for a field typed so, or `X | None`."""
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    return inner[0] if inner else hint


def _options(fn):
    method_flags, method_switches = method_flag_rows()
    for flag, path, type_, help_ in reversed(FLAGS + method_flags):
        fn = click.option(
            flag, _dest(path), type=type_, default=None, help=help_, cls=_RegistryHelpOption
        )(fn)
    for flag, path, help_ in reversed(SWITCHES + method_switches):
        fn = click.option(flag, _dest(path), default=None, help=help_)(fn)
    for flag, path, help_ in reversed(REPEATED):
        fn = click.option(flag, _dest(path), type=str, multiple=True, help=help_)(fn)
    return fn


def overrides_from_flags(kwargs: dict) -> dict:
    """Flags the user gave, as nested {section: {key: value}} updates."""
    updates: dict[str, dict] = {}
    for dest, value in kwargs.items():
        if value is None or value == () or "__" not in dest:  # (): a repeated flag not given
            continue
        section, key = dest.split("__", 1)
        updates.setdefault(section, {})[key] = value
    return updates


def resolve_config(config_file: str | None, resume: bool, flags: dict):
    """defaults <- saved run config (with --resume) <- YAML file <- flags, each value converted to
    its option's type. On resume, options that define what the run trains must keep their saved
    values (`clipkit.config_resume.check_resume`, applied against the checkpoint when training
    starts)."""
    from clipkit import methods  # noqa: F401  (tells the config which settings each method has)
    from clipkit.config import Config, ConfigError, load_yaml, merge
    from clipkit.config_resume import with_legacy_defaults
    from clipkit.method_config import FLAGS_SOURCE
    from clipkit.run_dir import RunDir

    cfg = Config()
    out = flags.get("run", {}).get("out")
    if resume:
        if not out:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = RunDir(out).config
        if saved.is_file():
            merge(cfg, with_legacy_defaults(load_yaml(saved)), source=str(saved), saved=True)
    if config_file:
        merge(cfg, load_yaml(config_file), source=f"config file {config_file}")
    merge(cfg, flags, source=FLAGS_SOURCE)
    return cfg


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--config",
    "config_file",
    type=str,
    default=None,
    help="YAML file with sections data/model/method/optim/run/eval; flags override it.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its latest.pt "
    "(same step, learning rate, samples seen and data position).",
)
@_options
def pretrain(config_file, resume, **kwargs):
    """Train a contrastive image-text model on WebDataset shards (img2dataset layout).

    \b
    Single process:   clipkit pretrain --data shards/ --out runs/x --model tiny --steps 1000
    Several GPUs/CPUs: torchrun --nproc_per_node 4 -m clipkit pretrain --data ... --out ...
    """
    from clipkit.config import validate
    from clipkit.train.run import pretrain as run_pretrain

    cfg = run_guarded(resolve_config, config_file, resume, overrides_from_flags(kwargs))
    run_guarded(validate, cfg)
    from clipkit.train.trainer import TrainingError

    try:
        summary = run_guarded(run_pretrain, cfg, resume=resume)
    except TrainingError as e:
        fail(str(e), code=1)
    _report(summary)


def _report(summary: dict) -> None:
    from clipkit.distributed import env_info

    if not env_info().is_main:
        return
    if summary.get("stopped_by") and summary["step"] == 0:  # stopped while waiting for data
        click.echo(f"stopped by {summary['stopped_by']} before the first step: no checkpoint.")
        return
    if summary.get("stopped_by"):
        click.echo(
            f"stopped by {summary['stopped_by']} at step {summary['step']}; checkpoint "
            f"written. Continue with the same command plus --resume."
        )
        return
    click.echo(f"done: {summary['step']} steps, {summary['samples_seen']} samples")
    click.echo(f"checkpoint: {summary['checkpoint']}")
    click.echo(f"curves:     {summary['curves']}")
    if summary.get("eval_seconds"):
        click.echo(f"evaluation: {summary['eval_seconds']:.1f} s, not counted as training time")
    if summary.get("bad_samples"):
        click.echo(f"skipped samples by reason: {summary['bad_samples']}")


__all__ = ["pretrain", "fail"]
