"""One training process per run directory: an exclusive lock on RUN_DIR/.lock.

The lock is `flock` on the open file: the kernel drops it when the process ends, however it ends
(exit, SIGKILL, OOM kill), so a lock left by a dead process is stale by construction. The file
holds the holder's PID and host only to name it when a second process is refused; it is emptied
on release. Where the file system has no flock (some network mounts) the recorded PID decides
instead: a live process on this host holds the directory, anything else is stale.

A forked child (a DataLoader worker) shares the open file and with it the flock; children close
their copy at once, so a killed main process frees the directory at once, not when its workers
notice and exit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from clipkit.config import ConfigError
from clipkit.run_dir import LOCK

LOCK_NAME = LOCK
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: set[int] = set()  # lock fds of this process


def _close_held_in_child() -> None:
    for fd in _HELD:
        os.close(fd)  # the parent's descriptor keeps the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunDirBusy(ConfigError):
    """Another process is training in this run directory."""


class RunLock:
    """`with RunLock(run_dir):` creates the directory if needed (refusing one that cannot be
    written) and holds it exclusively. A directory it created and nothing else wrote into is
    removed again on release, so a command that fails early leaves nothing behind."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # directories this lock made, deepest first

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self._created = _make_dirs(self.run_dir)
        fd = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._lock(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except BaseException as e:
            if fd is not None:
                os.close(fd)
            self._remove_created()
            if isinstance(e, OSError):
                raise ConfigError(
                    f"cannot write in run directory {self.run_dir}: {e.strerror or e}; "
                    "choose a writable --out"
                ) from None
            raise
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        try:
            os.ftruncate(fd, 0)  # an empty file: nobody holds it (read by the no-flock fallback)
        except OSError:
            pass
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)
            self._remove_created()
        os.close(fd)  # drops the flock

    def _lock(self, fd: int) -> None:
        hint = ""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _holder(fd)
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            holder = _holder(fd)
            if not _alive(holder):
                return
            hint = f" (if it is gone, delete {self.path}: this file system has no flock)"
        who = f"pid {holder[0]} on host {holder[1]}" if holder else "pid unknown"
        raise RunDirBusy(
            f"{self.run_dir} is in use by another training process ({who}){hint}; wait for it "
            "to end or stop it, or choose another --out"
        )

    def _remove_created(self) -> None:
        for d in self._created:  # deepest first; rmdir only ever removes an empty directory
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []


def _make_dirs(run_dir: Path) -> list[Path]:
    """mkdir -p, refusing a path that is a file or cannot be created; returns what it made."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a directory; choose another --out")
    missing = []
    d = run_dir
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create run directory {run_dir}: {e.strerror or e}; choose a writable --out"
        ) from None
    return missing


def _holder(fd: int) -> tuple[str, str] | None:
    """(pid, host) recorded in the lock file, None when empty or unreadable."""
    try:
        fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        return None
    return (fields[0], fields[1]) if len(fields) >= 2 else None


def _alive(holder: tuple[str, str] | None) -> bool:
    """Whether the recorded holder may still run (no-flock fallback). Another host's process
    cannot be checked from here, so it counts as alive."""
    if holder is None:
        return False
    pid, host = holder
    if host != socket.gethostname():
        return True
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
