"""Run one command in a fresh child process and measure it: peak resident memory of its process
tree (ru_maxrss from wait4, which covers the child and the children it reaped, e.g. data
workers), CPU time (user + system, same tree), wall time and the load average around it.

The machine these benchmarks run on is shared, so CPU time next to wall time tells how much of
the wall time the command actually had the cores for."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def run_measured(
    cmd: list[str], log: Path, cwd: Path | None = None, env: dict | None = None
) -> dict:
    """Run `cmd` (stdout and stderr to `log`); raise with the log's tail if it fails."""
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{log.read_text()[-3000:]}")
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
