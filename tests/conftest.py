"""Suite-wide settings: thread caps for parallel workers, and the SmolLM2 models shared by tests.

`make test` runs the suite on one worker per core (pytest-xdist). Each worker is then held to one
thread — BLAS, our native pools and llama.cpp alike — or two workers on two cores would each
start a pool per core and spend their time switching. The caps are set before the workers start,
so their NumPy reads them at import.
"""

from __future__ import annotations

import os
import sys

import pytest

_ONE_THREAD = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",  # Accelerate, on a Mac
    "MLXEDGE_THREADS": "1",
}


def pytest_configure(config: pytest.Config) -> None:
    workers = getattr(config.option, "numprocesses", None)
    if workers and not os.environ.get("PYTEST_XDIST_WORKER"):
        for key, value in _ONE_THREAD.items():
            os.environ.setdefault(key, value)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `macos` need the Core ML runtime, tests marked `metal` the GPU: elsewhere they
    skip, saying so (each has a Linux counterpart: the interpreter, the kernel harness)."""
    from mlxedge.quant.backend import metal_available

    skips = {}
    if sys.platform != "darwin":
        skips["macos"] = pytest.mark.skip(
            reason="needs macOS: the Core ML runtime exists only there"
        )
    if not metal_available():
        skips["metal"] = pytest.mark.skip(
            reason="needs Apple Silicon's GPU (on Linux the harness runs the same kernel text)"
        )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2 as `resolve("smollm2")` gives it (weights read lazily), once per worker."""
    from mlxedge.source import resolve

    return resolve("smollm2")


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """The numpy reference of SmolLM2's original weights, built once per worker (about 0.5 GiB of
    float32) and passed to `crosscheck(..., original=)` so no test builds its own."""
    from mlxedge.runtime.reference import ReferenceBackend

    return ReferenceBackend(smollm2)
