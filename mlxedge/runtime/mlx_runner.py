"""The `mlx` backend: mlx-lm's own model classes on MLX's default device.

On a Mac that is the GPU (Metal), computing in the model's own dtype. Elsewhere it is MLX's CPU
backend, where half-precision matmuls are very slow (SmolLM2 in bfloat16: ~0.8 s per token) and
float32 quantized matmuls run at about 3 GFLOP/s: there the model is cast to float32 and given a
small token budget.
"""

from __future__ import annotations

import numpy as np

from ..errors import MlxedgeError
from . import BackendUnavailable, Tolerance

CPU_TOKEN_BUDGET = 64
# Stated before measuring: float32 on the CPU differs from numpy's float32 only by summation order;
# half precision on the GPU rounds activations, so it is held to a distribution-level bound.
FLOAT32_TOLERANCE = Tolerance(max_abs_logit=1e-2)
HALF_TOLERANCE = Tolerance(kl_mean=5e-3)


class MLXBackend:
    name = "mlx"

    def __init__(self, model) -> None:
        if model.folder is None or model.kind not in ("mlx", "hf"):
            raise BackendUnavailable(
                f"mlx-lm loads model folders; {model.name} is a {model.kind} model "
                "(quantize or import it to a folder first)"
            )
        if model.config.get("model_file") is not None:
            raise BackendUnavailable(
                f"its config names a Python model file ({model.config['model_file']!r}); "
                "mlxedge never runs code from a model folder"
            )
        try:
            import mlx.core as mx
            from mlx_lm.utils import load_model
        except ImportError as e:  # pragma: no cover - mlx is a dependency
            raise BackendUnavailable(f"mlx-lm is not importable ({e})") from None
        self._mx = mx
        self._folder = model.folder
        self._model = None
        gpu = mx.default_device() == mx.gpu
        self.device = "metal" if gpu else "cpu, float32"
        self.tolerance = HALF_TOLERANCE if gpu else FLOAT32_TOLERANCE
        self.token_budget = None if gpu else CPU_TOKEN_BUDGET
        self._load_model = load_model
        self._float32 = not gpu

    def logits(self, ids: np.ndarray, first: int = 0) -> np.ndarray:
        mx = self._mx
        if self._model is None:
            try:
                self._model, _ = self._load_model(self._folder)
            except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
                fix = "check the folder with `mlxedge inspect`"
                raise MlxedgeError(f"mlx-lm cannot load it: {e}", self._folder, fix) from None
            if self._float32:
                self._model.set_dtype(mx.float32)
        out = self._model(mx.array(np.asarray(ids, dtype=np.int32))[None])[0, first:]
        return np.array(out.astype(mx.float32))
