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
    """How far the reconstruction is from the weight that was quantized.

    Attributes:
        rel_rmse: ‖W − Ŵ‖ / ‖W‖ over the whole tensor.
        max_abs: largest |W − Ŵ|.
    """

    rel_rmse: float
    max_abs: float


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
        The packed tensor (identical to `schemes.quantize`) and its error against `w` cast to dtype.
    """
    out_dtype = schemes.storage_dtype(dtype)
    w = np.asarray(w)
    if mx is not None and method == "rtn":
        wm = _to_mx(w.astype(out_dtype, copy=False))
        q, s, b = mx.quantize(wm, group_size=scheme.group_size, bits=scheme.bits)
        qt = QuantizedTensor(_to_np(q), _to_np(s), _to_np(b), scheme)
    else:
        qt = schemes.quantize(w, scheme, dtype, method)
        wm = _to_mx(w.astype(out_dtype, copy=False)) if mx is not None else None
    return qt, _error(qt, w.astype(out_dtype, copy=False), wm)


def _error(qt: QuantizedTensor, w: np.ndarray, wm) -> QuantError:
    """Error statistics, computed in float32 with MLX when present (much faster than numpy)."""
    if wm is None:
        ref = w.astype(np.float32)
        diff = schemes.dequantize(qt) - ref
        num, den = float(np.sum(diff * diff)), float(np.sum(ref * ref))
        worst = float(np.abs(diff).max()) if diff.size else 0.0
    else:
        ref = wm.astype(mx.float32)
        rec = mx.dequantize(
            _to_mx(qt.weight),
            _to_mx(qt.scales).astype(mx.float32),
            _to_mx(qt.biases).astype(mx.float32),
            group_size=qt.scheme.group_size,
            bits=qt.scheme.bits,
        )
        diff = rec - ref
        num, den, worst = (
            mx.sum(diff * diff).item(),
            mx.sum(ref * ref).item(),
            mx.max(mx.abs(diff)).item(),
        )
    rel = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
    return QuantError(rel_rmse=rel, max_abs=worst)
