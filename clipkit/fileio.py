"""Writing outputs safely.

- Writes never leave a half-written file or folder behind: readers see the old version or the
  new one, nothing in between (temporary sibling + rename).
- An output never destroys an input or a folder clipkit did not write: every command that writes
  an output folder goes through `guard_output_dir`, which refuses an output that is, contains or
  lies inside one of the command's inputs, and replaces an existing folder only when it carries
  clipkit's marker file for the same kind of output.
- Unwritable outputs are found before the work starts (`check_writable`), and an OSError while
  writing becomes one line naming the path and the cause (`writing`).
- Created files and folders follow the umask (0666 / 0777 before it), like any other tool.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from clipkit import __version__

MARKER = ".clipkit-output"


class OutputError(ValueError):
    """An output that clipkit will not or cannot write; a user-facing error (one line, exit 2)."""


# ---- errors while writing ----


def _cause(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised inside the block (permission denied, read-only file system, full
    disk, a file where a folder should be...) into one OutputError naming `path` and the cause."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_cause(e)}") from None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path) -> None:
    """Before any work: refuse an output whose folder cannot be created or written to.

    `path` is the file or folder to write; its temporary sibling goes next to it, so the
    nearest existing ancestor of its parent must be a folder that accepts a new file. Nothing is
    left behind (no folders are created; the probe file is removed)."""
    path = Path(path)
    ancestor = _nearest_existing(path.absolute().parent)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is not a directory")
    with writing(path):
        probe = make_temp_file(ancestor, ".clipkit-write-test-")
        probe.unlink()


# ---- creating files and folders with the umask's permissions ----


def _unique(parent: Path, prefix: str, suffix: str = "") -> Path:
    return parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new, uniquely named folder (tempfile.mkdtemp makes 0700; this follows the umask)."""
    while True:
        path = _unique(Path(parent), prefix)
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def make_temp_file(parent: str | Path, prefix: str, suffix: str = "") -> Path:
    """A new, empty, uniquely named file (tempfile.mkstemp makes 0600; this follows the umask)."""
    while True:
        path = _unique(Path(parent), prefix, suffix)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def current_umask() -> int:
    try:  # Linux shows it without changing it (os.umask would, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file another library created 0600 (safetensors) the umask's permissions."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_output_file(path: str | Path, data: bytes) -> None:
    """`atomic_write_bytes` for a command's output: an OSError becomes one OutputError line."""
    with writing(path):
        atomic_write_bytes(Path(path), data)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`; an existing `out` is moved aside first (and put
    back if the rename fails) and deleted afterwards."""
    old = None
    if out.exists():
        old = _unique(out.parent, f".{out.name}.old-")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None and old.is_symlink():  # `out` was a link: drop the link, not its target
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- which folders clipkit may replace ----


def output_kind(folder: str | Path) -> str | None:
    """The kind of output clipkit wrote into `folder` ('export', 'index', 'demo'...), read from
    its marker file; None for a folder clipkit did not write."""
    try:
        info = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    kind = info.get("kind") if isinstance(info, dict) else None
    return kind if isinstance(kind, str) else None


def write_marker(folder: str | Path, kind: str) -> None:
    text = json.dumps({"kind": kind, "clipkit": __version__}) + "\n"
    (Path(folder) / MARKER).write_text(text)


def _resolve(path: str | Path, what: str) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError before Python 3.13
        raise OutputError(f"{what} {path}: cannot resolve the path ({e})") from None


def check_not_input(
    out: str | Path, inputs: Iterable[str | Path], *, folder: bool, flag: str = "--out"
) -> None:
    """Refuse an output that would overwrite an input (symlinks resolved).

    A folder output may not be, contain or lie inside an input (replacing it would delete the
    input); a file output may not be an input file (hard links included)."""
    o = _resolve(out, flag)
    for given in inputs:
        i = _resolve(given, "input")
        same = o == i or (o.exists() and i.exists() and os.path.samefile(o, i))
        if same:
            raise OutputError(f"{flag} {out} is the input {given}; write the output elsewhere")
        if not folder:
            continue
        if i.is_relative_to(o):
            raise OutputError(
                f"{flag} {out} contains the input {given}; write the output elsewhere"
            )
        if o.is_relative_to(i):
            raise OutputError(
                f"{flag} {out} lies inside the input {given}; write the output elsewhere"
            )


def guard_output_dir(
    out: str | Path,
    kind: str,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    command: str = "",
    renamed: bool = True,
) -> Path:
    """Check, before any work, that folder `out` may be written as a `kind` output.

    Refused (OutputError): `out` is, contains or lies inside an input; `out` is a file; `out` is
    a non-empty folder that is not a clipkit `kind` output (whatever the flags: clipkit replaces
    only what it wrote itself); an earlier `kind` output without `overwrite`; an unwritable
    place; with `renamed` (a new folder is renamed onto `out`, see `output_dir`), a folder that
    holds the working directory. A missing or empty folder is fine."""
    out = Path(out)
    with writing(out):  # e.g. a folder that cannot be listed
        _guard_output_dir(out, kind, inputs, overwrite, command, renamed)
    check_writable(out)
    return out


def _guard_output_dir(out, kind, inputs, overwrite, command, renamed) -> None:
    """The checks of `guard_output_dir` that look at the file system."""
    check_not_input(out, inputs, folder=True)
    if renamed and out.exists() and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise OutputError(
            f"--out {out} holds the working directory, which replacing it would pull away; "
            "give a folder elsewhere"
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; give a folder to write")
    if out.is_dir() and any(out.iterdir()):
        found = output_kind(out)
        if found != kind:
            what = f"a clipkit '{found}' output" if found else "a folder clipkit did not write"
            raise OutputError(
                f"--out {out} already exists and is {what}; clipkit replaces only "
                f"{command or kind} outputs it wrote itself: choose another --out"
            )
        if not overwrite:
            raise OutputError(f"--out {out} already exists; pass --overwrite to replace it")


def guard_output_file(
    path: str | Path, *, inputs: Iterable[str | Path] = (), flag: str = "--output"
) -> Path:
    """Check, before any work, that file `path` may be written: not an input, not a folder, in a
    writable place."""
    path = Path(path)
    check_not_input(path, inputs, folder=False, flag=flag)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name")
    check_writable(path)
    return path


@contextlib.contextmanager
def output_dir(out: str | Path, kind: str) -> Iterator[Path]:
    """Yield a new temporary sibling of `out` to fill; when the block succeeds it gets the
    marker of `kind` and replaces `out` in one rename. On any failure it is deleted and `out`
    is untouched. OSErrors while writing become one-line OutputErrors.

    Call `guard_output_dir` first: this replaces whatever is at `out`."""
    out = Path(out)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        with writing(out):
            yield tmp
            write_marker(tmp, kind)
            replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
