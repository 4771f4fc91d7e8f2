"""How many threads mlxedge's own work may use, and the one pool it runs on.

One policy for every native kernel (affine and ggml blocks), the numpy search and llama.cpp:
every core this process may run on, or MLXEDGE_THREADS when set (a test runner with one worker
per core sets 1, so that workers do not fight over cores). NumPy's BLAS has its own settings
(OPENBLAS_NUM_THREADS, OMP_NUM_THREADS).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

THREADS_ENV = "MLXEDGE_THREADS"

T = TypeVar("T")
R = TypeVar("R")
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def thread_count() -> int:
    """Threads work should use: MLXEDGE_THREADS if it is a positive integer, else the cores
    this process may run on."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`fn` over `items` on the shared pool of `thread_count()` threads, results in order.

    The kernels it runs release the GIL. One thread runs in the caller, without a pool. Tasks
    must not submit to the pool themselves (they would wait on threads they occupy).
    """
    global _pool, _pool_size
    items = list(items)
    size = thread_count()
    if size == 1 or len(items) < 2:
        return [fn(x) for x in items]
    with _lock:  # created once per size, even when two threads start work at the same time
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="mlxedge"), size
        pool = _pool
    return list(pool.map(fn, items))


def pool_size() -> int:
    """Threads of the shared pool as last created (0 before any parallel work)."""
    return _pool_size
