"""The Core ML backends: an export run by the numpy interpreter of its saved program
(`coreml-interp`, any machine) or by the Core ML runtime itself (`coreml`, macOS only).

Both run one prefill per window with a real causal mask (Apple's and Hugging Face's convention;
the tests also decode step by step under swift-transformers' convention), through the same
`make_state()` / `predict(inputs, state)` interface, which the interpreter copies from coremltools'
`MLModel`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..errors import MlxedgeError
from . import BackendUnavailable, Tolerance

# Stated before measuring: the program computes in float16, like MLX on Metal.
FLOAT16_TOLERANCE = Tolerance(kl_mean=5e-3)


class CoreMLRuntime:
    """A package run by the Core ML runtime (macOS), with the interpreter's interface.

    Args:
        package: the `.mlpackage`.
        compute_units: a `coremltools.ComputeUnit` name; CPU_AND_GPU by default, since block-wise
            int4 weights are a GPU feature (see the README on the Neural Engine).

    Raises:
        BackendUnavailable: not on macOS, where the runtime does not exist.
    """

    def __init__(self, package: Path, compute_units: str = "CPU_AND_GPU") -> None:
        if sys.platform != "darwin":
            raise BackendUnavailable(
                "the Core ML runtime exists only on macOS (coreml-interp runs the saved program "
                "on any machine)"
            )
        import coremltools as ct

        self._model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit[compute_units])

    def make_state(self):
        return self._model.make_state()

    def predict(self, inputs: dict[str, np.ndarray], state) -> dict:
        return self._model.predict(inputs, state=state)


class _PackageBackend:
    tolerance = FLOAT16_TOLERANCE
    token_budget = None

    def __init__(self, model) -> None:
        if model.kind != "coreml":
            raise BackendUnavailable(
                f"it runs Core ML packages; {model.name} is a {model.kind} model "
                "(write one with `mlxedge export coreml` first)"
            )
        program = model.weights.program
        self.path = program.path
        self.context = program.states["keyCache"][3]
        self._runner = self._make_runner(program)

    def _make_runner(self, program):
        raise NotImplementedError

    def logits(self, ids: np.ndarray, first: int = 0) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int32)
        n = len(ids)
        if n > self.context:
            raise MlxedgeError(
                f"{n} tokens exceed the package's context of {self.context}",
                path=self.path,
                fix="export it again with a larger --context, or pass a smaller --ctx",
            )
        mask = np.triu(np.full((1, 1, n, n), -np.inf, np.float16), 1)
        out = self._runner.predict({"inputIds": ids[None], "causalMask": mask},
                                   self._runner.make_state())  # fmt: skip
        return np.asarray(out["logits"][0, first:], dtype=np.float32)


class CoreMLInterpBackend(_PackageBackend):
    name = "coreml-interp"
    device = "numpy interpreter of the saved program, float16 ops"

    def _make_runner(self, program):
        return program


class CoreMLBackend(_PackageBackend):
    name = "coreml"
    device = "Core ML runtime, CPU and GPU"

    def __init__(self, model) -> None:
        if sys.platform != "darwin":  # before opening anything: the reason a row shows on Linux
            raise BackendUnavailable("needs macOS, the only home of the Core ML runtime")
        super().__init__(model)

    def _make_runner(self, program):
        return CoreMLRuntime(program.path)
