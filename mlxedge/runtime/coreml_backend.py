"""The `coreml-interp` backend: a Core ML export run by the numpy interpreter of its saved program
(`coreml_interp`), one prefill per window with a real causal mask (Apple's and Hugging Face's
convention; the tests also decode step by step under swift-transformers' convention)."""

from __future__ import annotations

import numpy as np

from ..errors import MlxedgeError
from . import BackendUnavailable, Tolerance

# Stated before measuring: the program computes in float16, like MLX on Metal.
FLOAT16_TOLERANCE = Tolerance(kl_mean=5e-3)


class CoreMLInterpBackend:
    name = "coreml-interp"
    device = "numpy interpreter of the saved program, float16 ops"
    tolerance = FLOAT16_TOLERANCE
    token_budget = None

    def __init__(self, model) -> None:
        if model.kind != "coreml":
            raise BackendUnavailable(
                f"it runs Core ML packages; {model.name} is a {model.kind} model "
                "(write one with `mlxedge export coreml` first)"
            )
        self._program = model.weights.program
        self.context = self._program.states["keyCache"][3]

    def logits(self, ids: np.ndarray, first: int = 0) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int32)
        n = len(ids)
        if n > self.context:
            raise MlxedgeError(
                f"{n} tokens exceed the package's context of {self.context}",
                path=self._program.path,
                fix="export it again with a larger --context, or pass a smaller --ctx",
            )
        mask = np.triu(np.full((1, 1, n, n), -np.inf, np.float16), 1)
        state = self._program.make_state()
        out = self._program.predict({"inputIds": ids[None], "causalMask": mask}, state)
        return np.asarray(out["logits"][0, first:], dtype=np.float32)
