"""Every command and every option of the CLI, each given generic bad values (issue 14).

For each command a valid base invocation on tiny data is built; then each option (and each
positional argument) in turn gets every generic bad value of its kind, the rest of the command
staying valid. Whatever the value does, the command must end with exit code 0 (it was fine) or 2
(one `error:` line), and never with a traceback. The commands come from the CLI itself, so a new
command or option is walked without touching this file (a command without a base invocation here
fails the coverage test)."""

from __future__ import annotations

import itertools

import click
import pytest
import torch
from click.testing import CliRunner

from clipkit.cli.main import cli
from clipkit.method_config import MethodConfig, methods_with_setting

NUMBER_TYPES = (click.INT, click.FLOAT)


def walk(group: click.Group = cli, path: tuple = ()):
    """(command path, command) for every leaf command, groups resolved lazily like the CLI does."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from walk(command, (*path, name))
        else:
            yield (*path, name), command


def walked_params(command: click.Command) -> list[click.Parameter]:
    """Options that take a value, and positional arguments; flags have no bad value to give."""
    return [
        p
        for p in command.params
        if (isinstance(p, click.Argument) or not p.is_flag) and p.name != "help"
    ]


def bad_values(param: click.Parameter, files: dict) -> list[str]:
    if isinstance(param.type, click.Choice):
        return [""]
    if isinstance(param.type, type(click.INT)) or isinstance(param.type, type(click.FLOAT)):
        return ["", "-1", "0"]
    # text and paths: empty, missing, a file where a folder is expected, an unwritable path
    # (under a regular file, so it cannot be created even by root, as the tests run here)
    return ["", files["missing"], files["file"], files["unwritable"]]


def substitute(args: list[str], param: click.Parameter, value: str) -> list[str]:
    """`args` with `param` set to `value`: replaced where given, else added."""
    if isinstance(param, click.Argument):
        # positional arguments lead every base invocation (after the command path)
        index = next(i for i, a in enumerate(args) if a == POSITIONAL)
        return [*args[:index], value, *args[index + 1 :]]
    names = set(param.opts) | set(param.secondary_opts)
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in names:
            out[i + 1] = value
            return out
    return [*out, param.opts[-1], value]


POSITIONAL = "\0positional"  # where a command's positional argument goes in its base invocation


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk-files")
    a_file = root / "a-file.txt"
    a_file.write_text("not what the option expects\n")
    return {
        "root": root,
        "missing": str(root / "missing" / "nothing-here"),
        "file": str(a_file),
        "unwritable": str(a_file / "below-a-file"),
    }


@pytest.fixture(scope="module")
def aclip_checkpoint(demo_root, tmp_path_factory):
    """A one-step A-CLIP run (for `inspect masks`)."""
    out = tmp_path_factory.mktemp("walk-aclip") / "run"
    base = ["pretrain", "--data", demo_root / "train", "--out", out, "--model", "test"]
    args = [*base, "--method", "aclip", "--steps", 1, "--batch-size", 8, "--workers", 0]
    result = CliRunner().invoke(cli, [str(a) for a in [*args, "--threads", 1]])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def index_dir(tiny_checkpoint, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("walk-index") / "idx"
    args = ["retrieve", "index", "-c", tiny_checkpoint, "--data", demo_root / "eval"]
    result = CliRunner().invoke(cli, [str(a) for a in [*args, "--out", out, "--workers", 0]])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pack_source(tmp_path_factory):
    """Two images with captions beside them, for `data pack`."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("pack-source")
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (24, 20), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} square")
    return folder


@pytest.fixture(scope="module")
def shard_copy(demo_root, tmp_path_factory):
    """The demo eval shards copied (data check writes sizes.json next to them)."""
    import shutil

    out = tmp_path_factory.mktemp("walk-shards") / "eval"
    shutil.copytree(demo_root / "eval", out)
    return out


def base_invocation(path: tuple, fx: dict, fresh) -> list:
    """A valid, quick invocation of the command at `path`; `fresh()` gives an unused folder."""
    ckpt, demo = fx["tiny_checkpoint"], fx["demo_root"]
    eval_common = ["--checkpoint", ckpt, "--workers", 0]
    bases = {
        ("pretrain",): [
            "--data", demo / "train", "--out", fresh() / "run", "--model", "test",
            "--steps", 1, "--batch-size", 8, "--workers", 0, "--threads", 1, "--shuffle-buffer", 16,
        ],
        ("zero-shot",): [
            POSITIONAL, "--data-root", demo, *eval_common, "-o", fresh() / "zs.json",
        ],
        ("probe",): [
            POSITIONAL, "--data-root", demo, *eval_common, "--cache-dir", fx["cache"],
            "-o", fresh() / "probe.json",
        ],
        ("export",): ["--checkpoint", ckpt, "--out", fresh() / "export"],
        ("retrieve", "index"): [
            *eval_common, "--data", demo / "eval", "--out", fresh() / "idx",
        ],
        ("retrieve", "embed"): [
            *eval_common, "--data", demo / "eval", "--out", fresh() / "emb",
        ],
        ("retrieve", "search"): ["--index", fx["index_dir"], "--text", "a red star", "-k", 3],
        ("retrieve", "serve"): ["--index", fx["index_dir"], "--port", 0, "--check"],
        ("retrieve", "eval"): [
            *eval_common, "--data", demo / "eval", "-o", fresh() / "retrieval.json",
        ],
        ("data", "demo"): [
            "--out", fresh() / "demo", "--train-samples", 32, "--eval-samples", 16,
            "--probe-train-samples", 16, "--image-size", 32, "--shard-size", 16,
        ],
        ("data", "check"): [POSITIONAL, "--json"],
        ("data", "pack"): [POSITIONAL, "--out", fresh() / "packed", "--image-size", 16],
        ("models",): [POSITIONAL],
        ("inspect", "masks"): [
            "--checkpoint", fx["aclip"], "--data", demo / "eval", "--out", fresh() / "m.png",
            "--n", 2,
        ],
    }  # fmt: skip
    return bases[path]


def positional_value(path: tuple, fx: dict) -> str:
    """The valid value of the command's positional argument (where it has one)."""
    values = {("zero-shot",): "demo", ("probe",): "demo", ("models",): "test"}
    shards = {("data", "check"): fx["shards"], ("data", "pack"): fx["pack_source"]}
    return str(shards[path]) if path in shards else values.get(path, "")


COMMANDS = [path for path, _ in walk()]


def test_every_command_has_a_base_invocation():
    """A new command must be added to `base_invocation` so that it is walked too."""
    fresh_dirs = itertools.count()
    fake = {k: f"/x/{k}" for k in ("tiny_checkpoint", "demo_root", "cache", "index_dir", "aclip")}
    from pathlib import Path

    fake = {k: Path(v) for k, v in fake.items()} | {"shards": Path("/x/shards")}
    fake["pack_source"] = Path("/x/pack-source")
    for path in COMMANDS:
        base_invocation(path, fake, lambda: Path(f"/x/{next(fresh_dirs)}"))


def method_for_setting(param: click.Parameter) -> list:
    """`--method M` for a method's own setting (it applies to that method only), else []."""
    key = (param.name or "").removeprefix("method__")
    if key == param.name or key in MethodConfig().common_fields():  # every method has these
        return []
    return ["--method", methods_with_setting(key)[0]]


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_option_with_bad_values(
    path,
    files,
    tiny_checkpoint,
    demo_root,
    index_dir,
    aclip_checkpoint,
    shard_copy,
    pack_source,
    tmp_path,
):
    command = dict(walk())[path]
    counter = itertools.count()

    def fresh():
        folder = tmp_path / f"case-{next(counter)}"
        folder.mkdir()
        return folder

    fx = {
        "tiny_checkpoint": tiny_checkpoint,
        "demo_root": demo_root,
        "cache": tmp_path / "feature-cache",
        "index_dir": index_dir,
        "aclip": aclip_checkpoint,
        "shards": shard_copy,
        "pack_source": pack_source,
    }
    runner = CliRunner()
    failures, cases = [], 0
    for param in walked_params(command):
        for value in bad_values(param, files):
            base = [str(a) for a in base_invocation(path, fx, fresh)]
            base += [str(a) for a in method_for_setting(param)]
            given = substitute(base, param, value)
            args = [*path, *(positional_value(path, fx) if a == POSITIONAL else a for a in given)]
            result = runner.invoke(cli, args)
            torch.set_num_threads(1)  # a command may have set its own thread count
            cases += 1
            output = result.output + (result.stderr or "")
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
            if (
                crashed
                or "Traceback" in output
                or result.exit_code not in (0, 2)
                or (result.exit_code == 2 and len(errors) != 1)
            ):
                what = repr(result.exception) if crashed else output.strip().splitlines()[-1:]
                failures.append(f"{param.opts[-1] if param.opts else param.name}={value!r}: "
                                f"exit {result.exit_code}: {what}")  # fmt: skip
    assert cases > 0
    assert not failures, f"{len(failures)} of {cases} cases failed:\n" + "\n".join(failures)
