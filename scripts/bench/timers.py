"""A wall-clock timer around a library function, for the benchmark drivers that run in either
venv (clipkit's or open_clip's reference): `module.fn = timed(SPENT, "name", module.fn)`."""

from __future__ import annotations

import functools
import time


def timed(spent: dict[str, float], name: str, fn):
    """`fn`, adding the wall time of each call to spent[name]."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    return wrapper
