"""Dispatch quantization to the fastest implementation on this machine, same contract everywhere.

Both quantizer families are reached from here:
- affine (MLX) groups, `quantize`: the native kernel (`_affine.c`, built at install time; every
  core the thread policy allows) → MLX ops for rtn (MLX's CPU stream) → numpy. Every path
  returns what `schemes.quantize` (the specification) returns; tests hold each to it bit for bit.
- ggml blocks (GGUF), `encode_ggml`: the native kernel (`_ggml_quants.c`) → numpy (`quant.ggml`,
  the specification, byte-identical with llama.cpp's quantizers); and `repack_mlx`, MLX codes
  carried into Q4_1/Q5_1 blocks without re-quantizing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import MlxedgeError
from ..threads import parallel_map, thread_count
from . import schemes
from .defaults import METHODS
from .schemes import AffineScheme, QuantizedTensor

log = logging.getLogger(__name__)

try:  # MLX is a hard dependency, but a broken install should degrade to numpy, not crash.
    import mlx.core as mx
except ImportError:  # pragma: no cover - exercised only on a machine without MLX
    mx = None

try:  # optional: the install builds it where a C compiler exists
    from . import _affine
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _affine = None

# Set MLXEDGE_NATIVE=0 to use MLX ops / numpy even where the native kernel is built.
NATIVE_ENV = "MLXEDGE_NATIVE"


class NonFiniteWeights(ValueError):
    """The weight holds NaN or Inf (or a value the storage dtype overflows to Inf)."""

    def __init__(self, row: int) -> None:
        super().__init__(f"non-finite value in row {row}")
        self.row = row


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


def native_available() -> bool:
    """Whether the native kernel is built and not switched off by MLXEDGE_NATIVE=0."""
    return _affine is not None and os.environ.get(NATIVE_ENV, "1") != "0"


# The quantizer families `--kernels` chooses from; None: the fastest this machine has.
KERNELS = ("metal", "native", "numpy")
_forced: str | None = None
_metal_failed: str | None = None  # why our Metal kernels did not build or run in this process


def set_kernels(name: str | None) -> None:
    """Use `name` (one of KERNELS) for every quantizer from now on; None: choose per machine.

    Raises:
        MlxedgeError: an unknown name, or one this machine cannot run.
    """
    global _forced
    if name is not None and name not in KERNELS:
        raise MlxedgeError(f"--kernels {name} is not one of {', '.join(KERNELS)}")
    if name == "metal" and not metal_available():
        raise MlxedgeError("--kernels metal needs Apple Silicon's GPU, which this machine lacks",
                           fix="use --kernels native or numpy (the same bytes)")  # fmt: skip
    if name == "native" and not native_available():
        raise MlxedgeError(
            "--kernels native: the native kernels are not built here",
            fix="reinstall with a C compiler (make install), or use numpy",
        )
    _forced = name


def metal_available() -> bool:
    """Whether our Metal kernels can run: macOS with MLX's Metal back end."""
    import sys

    return sys.platform == "darwin" and mx is not None and mx.metal.is_available()


def kernel_family(method: str = "rtn", ggml_type: str | None = None) -> str:
    """Which implementation quantizes with `method` (or into `ggml_type` blocks): metal, native,
    mlx-cpu or numpy. `--kernels` decides when given; otherwise Metal, then native C, then MLX's
    CPU stream (rtn only), then numpy. All give the same bytes."""
    from .metal import METAL_GGML_TYPES, METAL_METHODS

    has_metal = ggml_type in METAL_GGML_TYPES if ggml_type else method in METAL_METHODS
    if _forced == "metal":
        if not has_metal:
            what = ggml_type or method
            raise MlxedgeError(f"--kernels metal: no Metal kernel for {what} yet",
                               fix="use --kernels native (the same bytes)")  # fmt: skip
        return "metal"
    if _forced is not None:
        return _forced
    if has_metal and _metal_failed is None and metal_available():
        return "metal"
    if native_available():
        return "native"
    if mx is not None and method == "rtn" and ggml_type is None:
        return "mlx-cpu"
    return "numpy"


def active_backend(method: str = "rtn") -> str:
    """What `quantize` uses for `method` on this machine, for logs (-v)."""
    family = kernel_family(method)
    return f"native ({thread_count()} threads)" if family == "native" else family


_NATIVE_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
_NATIVE_METHODS = {"rtn": 0, "mse": 1, "mse-zero": 2}
_NATIVE_CHUNK = 1 << 13  # groups per task: small enough to balance, large enough to amortize


def _native_quantize(w: np.ndarray, scheme: AffineScheme, dtype: str, method: str):
    """The native kernel over chunks of groups on every core (it releases the GIL)."""
    if w.dtype.name not in _NATIVE_DTYPES:
        w = w.astype(np.float32)
    w = np.ascontiguousarray(w)
    rows, cols = w.shape
    out_dtype = schemes.storage_dtype(dtype)
    gs = scheme.group_size
    n_groups = rows * cols // gs
    words = gs * scheme.bits // 32  # whole uint32 words per group: chunks never share a word
    packed = np.empty(n_groups * words, dtype=np.uint32)
    scales = np.empty(n_groups, dtype=out_dtype)
    biases = np.empty(n_groups, dtype=out_dtype)
    raw = w.reshape(-1).view(np.uint16 if w.itemsize == 2 else np.float32)
    s_raw = scales.view(np.uint16 if out_dtype.itemsize == 2 else np.float32)
    b_raw = biases.view(s_raw.dtype)
    codes = (_NATIVE_DTYPES[w.dtype.name], _NATIVE_DTYPES[dtype], scheme.bits, gs)

    def run(start: int) -> int:
        stop = min(start + _NATIVE_CHUNK, n_groups)
        bad = _affine.quantize(
            raw[start * gs : stop * gs],
            *codes,
            _NATIVE_METHODS[method],
            packed[start * words : stop * words],
            s_raw[start:stop],
            b_raw[start:stop],
        )
        return -1 if bad < 0 else start + bad

    starts = range(0, n_groups, _NATIVE_CHUNK)
    bad = parallel_map(run, starts)
    first_bad = min((b for b in bad if b >= 0), default=-1)
    if first_bad >= 0:
        raise NonFiniteWeights(first_bad * gs // cols)
    return QuantizedTensor(
        packed.reshape(rows, cols * scheme.bits // 32),
        scales.reshape(rows, cols // gs),
        biases.reshape(rows, cols // gs),
        scheme,
    )


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
        method: "rtn", "mse" or "mse-zero".

    Returns:
        The packed tensor (identical to `schemes.quantize`) and its error against `w` cast to
        dtype, measured on evenly spaced rows (at most ERROR_SAMPLE weights).

    Raises:
        NonFiniteWeights: w holds NaN or Inf (checked here, where the native kernel does it for
            free while reading each group).
    """
    if method not in schemes.METHODS:
        raise MlxedgeError(f"method {method!r} is not supported", fix=f"choose one of {METHODS}")
    out_dtype = schemes.storage_dtype(dtype)
    family = kernel_family(method)
    if family == "native" and scheme.fits(w.shape[1]):
        qt = _native_quantize(np.asarray(w), scheme, dtype, method)
        return qt, sampled_error(qt, w)
    w = np.asarray(w).astype(out_dtype, copy=False)
    finite = np.isfinite(w.astype(np.float32, copy=False)).all(axis=1)
    if not finite.all():
        raise NonFiniteWeights(int(np.argmin(finite)))
    if family == "metal" and scheme.fits(w.shape[1]):
        qt = _on_metal(lambda: _metal_quantize(w, scheme, dtype, method))
        if qt is None:  # the Metal kernels failed: the next family takes over
            return quantize(w, scheme, dtype, method)
    elif family == "mlx-cpu":
        # On MLX's CPU stream: its Metal kernel rounds half away from zero and seeds its min/max
        # differently (an all-negative group gets another scale), so only the CPU kernel gives
        # the specification's bytes. Metal kernels of our own are metal_kernels/'s job.
        q, s, b = mx.quantize(
            _to_mx(w), group_size=scheme.group_size, bits=scheme.bits, stream=mx.cpu
        )
        qt = QuantizedTensor(_to_np(q), _to_np(s), _to_np(b), scheme)
    else:
        qt = schemes.quantize(w, scheme, dtype, method)
    return qt, sampled_error(qt, w)


def _on_metal(run):
    """`run()` on our Metal kernels. Chosen by default, a kernel that fails to build or run (MLX
    raises) switches this process to the next family with a warning and returns None; asked for
    with --kernels metal, the failure is the user's error."""
    global _metal_failed
    try:
        return run()
    except (RuntimeError, ValueError) as e:
        if _forced == "metal":
            raise MlxedgeError(f"the Metal kernels failed: {e}",
                               fix="use --kernels native (the same bytes)") from None  # fmt: skip
        _metal_failed = str(e)
        log.warning("the Metal kernels failed (%s); the native kernels take over", e)
        return None


def _metal_quantize(w: np.ndarray, scheme: AffineScheme, dtype: str,
                    method: str) -> QuantizedTensor:  # fmt: skip
    """Our Metal kernels (metal_kernels/affine_quantize_*.metal) on the GPU: w is already in
    the storage dtype and finite."""
    from . import metal

    rows, cols = w.shape
    kernel, launch = metal.affine_launch(_to_mx(w), scheme.bits, scheme.group_size, dtype, method)
    codes, scales, biases = metal.call(kernel, launch)
    return QuantizedTensor(
        _to_np(codes).reshape(rows, cols * scheme.bits // 32),
        _to_np(scales).reshape(rows, cols // scheme.group_size),
        _to_np(biases).reshape(rows, cols // scheme.group_size),
        scheme,
    )


def sampled_error(qt: QuantizedTensor, w: np.ndarray) -> QuantError:
    """Reconstruction error of `qt` against `w` on evenly spaced rows (all rows if small)."""
    rows, cols = w.shape
    step = max(1, -(-rows * cols // ERROR_SAMPLE))
    sample = QuantizedTensor(qt.weight[::step], qt.scales[::step], qt.biases[::step], qt.scheme)
    ref = w[::step].astype(qt.scales.dtype).astype(np.float32)
    diff = schemes.dequantize(sample) - ref
    num, den = float(np.einsum("ij,ij->", diff, diff)), float(np.einsum("ij,ij->", ref, ref))
    worst = float(np.abs(diff).max()) if diff.size else 0.0
    return QuantError(sq_err=num, sq_ref=den, max_abs=worst)


def encode_ggml(w: np.ndarray, type_name: str) -> np.ndarray:
    """float32 rows (rows, cols) as a GGUF stores them in `type_name`: F32 as they are, F16 or
    BF16 values, or block bytes (uint8, (rows, bytes per row)).

    Raises:
        OverflowError: F16 cannot hold a value (it would become Inf).
    """
    if type_name == "F32":
        return np.ascontiguousarray(w, dtype=np.float32)
    if type_name == "F16":
        with np.errstate(over="ignore"):
            h = w.astype(np.float16)
        if not np.isfinite(h).all():
            raise OverflowError("beyond float16's range")
        return h
    if type_name == "BF16":
        import gguf

        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16).view(np.uint8)
    from .ggml import quantize_rows  # imported on first use: MLX folders never need it

    family = kernel_family(ggml_type=type_name)
    if family == "metal":
        from . import metal

        x = np.ascontiguousarray(w, dtype=np.float32)
        launch = metal.ggml_legacy_launch(_to_mx(x), type_name)
        blocks = _on_metal(lambda: metal.call(metal.GGML_LEGACY, launch))
        if blocks is not None:
            return _to_np(blocks[0]).reshape(x.shape[0], -1)
        family = kernel_family(ggml_type=type_name)
    return quantize_rows(w, type_name, native=family != "numpy")


def repack_mlx(qt: QuantizedTensor):
    """An MLX 4/5-bit tensor as Q4_1/Q5_1 blocks, codes carried over (see `quant.repack`)."""
    from .repack import repack

    return repack(qt)
