"""Checkpoints: one self-describing file per save, written atomically, read without executing code.

Contents: format version, resolved config, model weights, method state (EMA teacher...),
optimizer, step, samples seen, data position of every rank, RNG states. A checkpoint rebuilds its
model from the config stored inside.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import torch

from clipkit.fileio import atomic_write_bytes

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, not clipkit's); a user-facing error."""


def save(state: dict, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


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
    for candidate in (p, p / "checkpoints" / "latest.pt", p / "latest.pt"):
        if candidate.is_file():
            return candidate
    if p.is_dir():
        raise CheckpointError(f"no checkpoint in {p} (expected checkpoints/latest.pt)")
    raise CheckpointError(f"checkpoint not found: {p}")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load safely (`weights_only=True`); clear errors for corrupt or foreign files."""
    p = resolve(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise CheckpointError(
            f"{p} holds pickled objects that a safe load refuses ({first[:120]}); "
            "only clipkit checkpoints (tensors and plain data) are accepted"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{p} is truncated or corrupt ({type(e).__name__}); use an earlier checkpoint"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state or "config" not in state:
        raise CheckpointError(f"{p} is not a clipkit checkpoint (no format version / config)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{p} has format {state['format_version']}; upgrade clipkit")
    state["_path"] = str(p)
    return state


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(resolve(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
