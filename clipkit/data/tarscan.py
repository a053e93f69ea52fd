"""Read a tar shard to its end, or say where and why it stopped.

Python's `tarfile` ends iteration without a word when a member header after the first is
corrupt or cut short: a shard with a damaged second header reads as one sample and the rest
is dropped silently. `read_members` yields the regular files in order and, when the archive
stops anywhere but at its end-of-archive blocks, raises `TarStopped` with the byte offset and
the cause. `count_samples` skims a local shard past such damage (as `tar --ignore-zeros` does)
to count how many samples the damage cost.
"""

from __future__ import annotations

import contextlib
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO

# What a broken or truncated stream raises while tarfile reads it (gzip: EOFError, zlib.error).
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class TarStopped(Exception):
    """The archive stopped before its end: `offset` is the byte where reading failed."""

    def __init__(self, offset: int, cause: str, truncated: bool):
        super().__init__(f"unreadable from byte {offset:,}: {cause}")
        self.offset = offset
        self.cause = cause
        self.truncated = truncated  # the data ends early (nothing after it can be counted)


class _WatchedTarInfo(tarfile.TarInfo):
    """Keeps, on the TarFile, the header error that ended its iteration (tarfile drops it)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.header_error = e
            raise


def _stop_from_header(error: Exception | None, offset: int) -> TarStopped | None:
    """None for a proper end (a zero block), else why the headers stopped."""
    if error is None or isinstance(error, tarfile.EOFHeaderError):
        return None
    if isinstance(error, tarfile.EmptyHeaderError):
        return TarStopped(offset, "the file ends without tar's end-of-archive blocks", True)
    if isinstance(error, tarfile.TruncatedHeaderError):
        return TarStopped(offset, "the file ends inside a member header", True)
    return TarStopped(offset, f"corrupt member header ({error})", False)


def _cause(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_members(fileobj: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file of a tar stream (plain or compressed), in order.

    Raises `TarStopped` when the archive stops before its end: a corrupt or truncated header,
    data cut short, or a broken compressed stream. An archive with no members is not an error.
    """
    offset = 0
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_WatchedTarInfo)
        for info in tar:
            offset = info.offset
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            tar.members = []  # stream mode would keep every header in memory
    except _READ_ERRORS as e:
        truncated = "unexpected end" in str(e) or isinstance(e, EOFError)
        raise TarStopped(offset, _cause(e), truncated) from None
    stop = _stop_from_header(getattr(tar, "header_error", None), tar.offset)
    if stop is not None:
        raise stop


def sample_key(name: str) -> str | None:
    """webdataset's sample key of a member: its path up to the first dot of the basename
    (None for names without one, e.g. hidden files or a bare `README`)."""
    folder, _, base = name.rpartition("/")
    stem, dot, _ = base.partition(".")
    if not dot or not stem:
        return None
    return f"{folder}/{stem}" if folder else stem


def count_samples(path: str) -> tuple[int, bool]:
    """(samples, complete) of a local tar read past damaged headers: runs of members sharing a
    key count as one sample. `complete` is False when the data itself ends early."""
    count, key, complete = 0, None, True
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*", ignore_zeros=True, tarinfo=_WatchedTarInfo)
            for info in tar:
                tar.members = []
                new = sample_key(info.name) if info.isreg() else None
                if new is not None and new != key:
                    count, key = count + 1, new
        except _READ_ERRORS:
            complete = False
        else:
            error = getattr(tar, "header_error", None)
            complete = not isinstance(error, tarfile.TruncatedHeaderError)
    return count, complete


def shard_samples(url: str, on_error) -> Iterator[dict]:
    """Raw samples of one shard (anything webdataset opens: a path, `pipe:`, `http`), grouped by
    key as webdataset groups them; raises `TarStopped` where the archive stops before its end.
    The sample being read when it stops is never yielded: it may lack members. Training and
    `data check` both read shards through here, so they see the same samples and the same
    damage."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys

    with contextlib.closing(gopen(url)) as stream:
        files = (
            {"fname": name, "data": data, "__url__": url}
            for name, data in read_members(stream)
            if not re.match(r"__[^/]*__($|/)", name)  # webdataset's metadata members
        )
        yield from group_by_keys(files, handler=on_error)
