"""`clipkit data pack`'s process pool: one `run(fn, items, ordered)` whether 1 or N processes.

With one process the work runs in this one (no pool to start, plain tracebacks). With more, a
`spawn` pool: a fork of a process that holds Arrow or HF `datasets` threads can deadlock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator


@contextlib.contextmanager
def worker_map(processes: int) -> Iterator[Callable]:
    """Yield `run(fn, items, ordered=True)`: the results of `fn` over `items`, in order or as
    they finish. `fn` and the items must pickle (module-level functions, partials of them)."""
    if processes <= 1:

        def run_here(fn: Callable, items: Iterable, ordered: bool = True) -> Iterator:
            return map(fn, items)

        yield run_here
        return
    with multiprocessing.get_context("spawn").Pool(processes) as pool:

        def run_pool(fn: Callable, items: Iterable, ordered: bool = True) -> Iterator:
            items = list(items)
            if not ordered:  # whole shards: hand them out one at a time
                return pool.imap_unordered(fn, items, 1)
            return pool.imap(fn, items, max(1, min(64, len(items) // (8 * processes))))

        yield run_pool
