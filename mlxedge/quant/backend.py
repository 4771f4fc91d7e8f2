"""Dispatch quantization to the fastest implementation on this machine, same contract everywhere.

Order: MLX ops (Metal on a Mac, MLX's CPU backend elsewhere) → numpy. Every path returns what
`schemes.quantize` (the specification) returns; tests hold each fast path to it bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import schemes
from .schemes import AffineScheme, QuantizedTensor

log = logging.getLogger(__name__)

try:  # MLX is a hard dependency, but a broken install should degrade to numpy, not crash.
    import mlx.core as mx
except ImportError:  # pragma: no cover - exercised only on a machine without MLX
    mx = None


@dataclass(frozen=True)
class QuantError:
    """How far the reconstruction is from the weight that was quantized (on the sampled rows).

    Attributes:
        sq_err: Σ (W − Ŵ)².
        sq_ref: Σ W².
        max_abs: largest |W − Ŵ|.
    """

    sq_err: float
    sq_ref: float
    max_abs: float

    @property
    def rel_rmse(self) -> float:
        """‖W − Ŵ‖ / ‖W‖."""
        if self.sq_ref > 0:
            return (self.sq_err / self.sq_ref) ** 0.5
        return 0.0 if self.sq_err == 0 else float("inf")

    def __add__(self, other: QuantError) -> QuantError:
        """The error of two row blocks of one tensor taken together."""
        return QuantError(
            self.sq_err + other.sq_err, self.sq_ref + other.sq_ref, max(self.max_abs, other.max_abs)
        )


def _to_mx(a: np.ndarray):
    """numpy (incl. ml_dtypes.bfloat16) → mx.array without a float32 detour."""
    if a.dtype == ml_dtypes.bfloat16:
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def _to_np(a) -> np.ndarray:
    """mx.array → numpy, bfloat16 kept as ml_dtypes.bfloat16."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(a)


def active_backend() -> str:
    """Name of the implementation `quantize` uses for rtn on this machine."""
    if mx is None:
        return "numpy"
    return f"mlx ({mx.default_device()})"


# Error statistics are estimated on evenly spaced rows totalling at most this many weights:
# measuring every weight costs several times the quantization itself on MLX's CPU backend,
# while 64K samples pin the relative RMS error to well under 1% of its value.
ERROR_SAMPLE = 1 << 16


def quantize(
    w: np.ndarray, scheme: AffineScheme, dtype: str, method: str
) -> tuple[QuantizedTensor, QuantError]:
    """Quantize one 2-D weight and measure the reconstruction error.

    Args:
        w: float weight (rows, cols).
        scheme: bits and group size.
        dtype: storage dtype name for scales, biases (and the reference the error is measured from).
        method: "rtn" or "mse".

    Returns:
        The packed tensor (identical to `schemes.quantize`) and its error against `w` cast to
        dtype, measured on evenly spaced rows (at most ERROR_SAMPLE weights).
    """
    out_dtype = schemes.storage_dtype(dtype)
    w = np.asarray(w).astype(out_dtype, copy=False)
    if mx is not None and method == "rtn":
        q, s, b = mx.quantize(_to_mx(w), group_size=scheme.group_size, bits=scheme.bits)
        qt = QuantizedTensor(_to_np(q), _to_np(s), _to_np(b), scheme)
    else:
        qt = schemes.quantize(w, scheme, dtype, method)
    return qt, sampled_error(qt, w)


def sampled_error(qt: QuantizedTensor, w: np.ndarray) -> QuantError:
    """Reconstruction error of `qt` against `w` on evenly spaced rows (all rows if small)."""
    rows, cols = w.shape
    step = max(1, -(-rows * cols // ERROR_SAMPLE))
    sample = QuantizedTensor(qt.weight[::step], qt.scales[::step], qt.biases[::step], qt.scheme)
    ref = w[::step].astype(np.float32)
    diff = schemes.dequantize(sample) - ref
    num, den = float(np.einsum("ij,ij->", diff, diff)), float(np.einsum("ij,ij->", ref, ref))
    worst = float(np.abs(diff).max()) if diff.size else 0.0
    return QuantError(sq_err=num, sq_ref=den, max_abs=worst)
