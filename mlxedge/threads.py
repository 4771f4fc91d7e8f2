"""How many threads mlxedge's own pools (the native kernels) and llama.cpp may use.

One policy for all of them: every core this process may run on, or MLXEDGE_THREADS when set
(a test runner with one worker per core sets 1, so that workers do not fight over cores).
NumPy's BLAS has its own settings (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS).
"""

from __future__ import annotations

import os

THREADS_ENV = "MLXEDGE_THREADS"


def thread_count() -> int:
    """Threads a pool should use: MLXEDGE_THREADS if it is a positive integer, else the cores
    this process may run on."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1
