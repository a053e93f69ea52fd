"""Writing tar shards whose bytes depend only on their content, and only ever whole."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from clipkit.fileio import make_temp_file


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write samples into one tar with fixed metadata (mtime 0, root owner) so the bytes depend
    only on the content. Returns the number of samples."""
    n = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def write_tar_atomic(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """`write_tar` into a hidden temporary sibling renamed onto `path` once complete: a reader,
    or a pack interrupted midway, never sees half a shard."""
    tmp = make_temp_file(path.parent, f".{path.name}.tmp-")
    try:
        n = write_tar(tmp, samples)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
