"""Checkpoints: one self-describing file per save, written atomically, read without executing code.

Contents: format version, resolved config, model weights, method state (EMA teacher...),
optimizer, step, samples seen, data position of every rank, RNG states. A checkpoint rebuilds its
model from the config stored inside.

Reading: `read` takes the file in once, hashes those bytes (the sha256 results report), checks
them and unpickles them, returning `Loaded(path, sha256, state)`; `load` is its state alone.
Rebuilding the model and method from a checkpoint is `clipkit.methods.restore.load_method`
(this module stays below models); the run directory's layout is `clipkit.run_dir`.

Integrity: `save` stores a sha256 of every tensor; `load` checks the CRC-32 of every member of
the zip archive and then that checksum, so a file damaged on disk or in transit is refused with
one line instead of training or evaluating garbage weights.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipkit.fileio import atomic_write_bytes
from clipkit.run_dir import LATEST, RunDir, is_checkpoints_folder

FORMAT_VERSION = 1
CHECKSUM_KEY = "tensor_sha256"  # hex sha256 of every tensor in the checkpoint (see tensor_sha256)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, not clipkit's); a user-facing error."""


@dataclass(frozen=True)
class Loaded:
    """A checkpoint as read: the file it came from, the sha256 of its bytes, its contents."""

    path: Path
    sha256: str
    state: dict


def save(state: dict, path: str | Path) -> None:
    """Write `state` atomically, with a checksum of its tensors that `load` verifies."""
    full = {"format_version": FORMAT_VERSION, **state}
    full[CHECKSUM_KEY] = tensor_sha256(full)
    buf = io.BytesIO()
    torch.save(full, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def tensor_sha256(state: Any) -> str:
    """sha256 over every tensor in `state` (nested dicts / lists), each with its place, dtype,
    shape and bytes, dicts in sorted key order: the same for a state before saving and after
    loading, on any device. The checksum entry itself is left out."""
    h = hashlib.sha256()

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{where}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                if key != CHECKSUM_KEY:
                    walk(obj[key], f"{where}/{key!r}")
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(item, f"{where}/{i}")

    walk(state, "")
    return h.hexdigest()


def link_latest(src: Path, latest: Path) -> None:
    """Point `latest` at `src` atomically (a hard link; a copy where links are unsupported)."""
    tmp = latest.with_name(f".{latest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, latest)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory / checkpoints directory meaning its latest.pt."""
    p = Path(path)
    for candidate in (p, RunDir(p).latest, p / LATEST):
        if candidate.is_file():
            return candidate
    if p.is_dir():
        expected = RunDir(p).latest.relative_to(p)
        raise CheckpointError(f"no checkpoint in {p} (expected {expected})")
    raise CheckpointError(f"checkpoint not found: {p}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:  # unreadable (permissions...): one line, not a traceback
        raise CheckpointError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None


def verify_archive(data: bytes, path: Path) -> None:
    """Check the CRC-32 of every member of the zip archive torch.save writes (torch's reader
    does not): flipped bits anywhere in the file are caught here. About as fast as reading the
    file once (0.05 s per 100 MB). `path` names the file in messages."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if not data.startswith(b"PK\x03\x04"):
            raise CheckpointError(
                f"{path} is not a clipkit checkpoint (not the zip archive torch.save writes)"
            ) from None
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}); use an earlier checkpoint"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{path} is corrupt: member {bad} fails its CRC check; use an earlier checkpoint"
        )


def read_torch_file(
    path: str | Path, map_location: Any = "cpu", what: str = "weights file", mmap: bool = False
):
    """torch.load that never runs code (`weights_only=True`), for files from anywhere. Every
    failure is one CheckpointError line; torch's advice to turn the safety off is not relayed.
    `mmap` (zip archives only) maps the tensor data instead of reading it."""
    return _safe_torch_load(path, path, map_location, what, mmap)


def _safe_torch_load(source: Any, path: str | Path, map_location: Any, what: str, mmap: bool):
    """torch.load(source) with weights_only=True; `path` names the file in error lines."""
    try:
        with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: noise here
            warnings.simplefilter("ignore")
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        name = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} holds pickled objects{name} that clipkit will not load (loading them could "
            "run code); only tensors and plain data are read: save a state_dict"
        ) from None
    except Exception as e:  # the safe unpickler meets arbitrary bytes: any error means unusable
        raise CheckpointError(
            f"{path} is not a readable {what}: truncated, corrupt or not a torch file "
            f"({type(e).__name__})"
        ) from None


def read(path: str | Path, map_location: str | torch.device = "cpu") -> Loaded:
    """Read a checkpoint file (or a run's latest) once: hash the bytes read, check the archive's
    CRCs, load them safely (no code runs) and verify the tensor checksum stored at save
    (checkpoints written before it existed load without one)."""
    p = resolve(path)
    data = _read_bytes(p)
    digest = hashlib.sha256(data).hexdigest()
    verify_archive(data, p)
    state = _safe_torch_load(io.BytesIO(data), p, map_location, "clipkit checkpoint", False)
    del data  # the tensors are copied out: do not hold the file twice while checking
    _check_contents(state, p)
    return Loaded(path=p, sha256=digest, state=state)


def _check_contents(state: Any, p: Path) -> None:
    if not isinstance(state, dict) or "format_version" not in state or "config" not in state:
        raise CheckpointError(f"{p} is not a clipkit checkpoint (no format version / config)")
    version = state["format_version"]
    if not isinstance(version, int):
        raise CheckpointError(f"{p} is not a clipkit checkpoint (format version {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{p} has format {version}; upgrade clipkit")
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is not None and tensor_sha256(state) != expected:
        raise CheckpointError(
            f"{p} is corrupt: its tensors do not match the checksum written with them; use an "
            "earlier checkpoint"
        )


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The contents of a checkpoint (see `read`, which also gives its path and sha256)."""
    return read(path, map_location).state


def input_paths(path: str | Path) -> list[Path]:
    """What an output must not overwrite when `path` (a file or run dir) is read: the path as
    given, the checkpoint file, and for a run's checkpoint its run dir and every file of its
    checkpoints/ folder. Missing checkpoints give just the path (loading reports them)."""
    paths = [Path(path)]
    try:
        file = resolve(path)
    except CheckpointError:
        return paths
    paths.append(file)
    if is_checkpoints_folder(file.parent):
        paths.append(file.parent.parent)
        paths.extend(p for p in file.parent.iterdir() if p.is_file())
    return paths


def sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (a weights file; a checkpoint's comes with `read`)."""
    h = hashlib.sha256()
    with open(resolve(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
