"""Grouped affine integer quantization in MLX's storage layout — the numpy specification.

Every faster implementation (MLX ops, Metal kernels) is tested against the functions here.

Layout (what `mx.quantize` writes and `mx.dequantize` / `nn.QuantizedLinear` read):
- a weight (rows, cols) is split along cols into groups of `group_size`;
- each group has a `scale` and a `bias` in the output dtype; w ≈ scale * q + bias,
  with q in [0, 2**bits - 1];
- codes are packed along each row as one continuous little-endian bit stream, lowest bits first,
  stored as uint32 words: (rows, cols * bits / 32). For 2/4/8 bits this is "32/bits codes per word";
  for 3/5/6 bits codes straddle byte (not word) boundaries, exactly as a bit stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import MlxedgeError
from ..threads import parallel_map
from .defaults import METHODS

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
STORAGE_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}

# MLX floors the scale at this value so an all-equal group never divides by zero.
_EPS = np.float32(1e-7)


@dataclass(frozen=True)
class AffineScheme:
    """Bits and group size of grouped affine quantization; validated on construction.

    Raises:
        MlxedgeError: bits or group size is not one MLX supports (the message lists the valid ones).
    """

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise MlxedgeError(
                f"{self.bits} bits is not supported",
                fix=f"choose bits from {', '.join(map(str, SUPPORTED_BITS))}",
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise MlxedgeError(
                f"group size {self.group_size} is not supported",
                fix=f"choose a group size from {', '.join(map(str, SUPPORTED_GROUP_SIZES))}",
            )

    @property
    def levels(self) -> int:
        """Largest code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def packed_cols(self, cols: int) -> int:
        """Number of uint32 words per row for a row of `cols` weights."""
        return cols * self.bits // 32

    def fits(self, cols: int) -> bool:
        """Whether a row of `cols` weights divides into whole groups."""
        return cols % self.group_size == 0


@dataclass
class QuantizedTensor:
    """Packed codes with per-group scales and biases, as MLX stores them.

    Attributes:
        weight: uint32 (rows, cols * bits / 32).
        scales: (rows, cols / group_size) in the storage dtype.
        biases: same shape and dtype as scales.
    """

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    scheme: AffineScheme


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype for a storage dtype name.

    Raises:
        MlxedgeError: the name is not float16, bfloat16 or float32.
    """
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise MlxedgeError(
            f"dtype {name!r} is not supported", fix=f"choose one of {', '.join(STORAGE_DTYPES)}"
        ) from None


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes (rows, cols) into MLX's uint32 bit stream (rows, cols * bits / 32).

    Eight codes always fill exactly `bits` bytes, so each run of eight is assembled in a uint64 and
    its low `bits` bytes are kept: one code path for every bit width.
    """
    rows, cols = codes.shape
    octets = codes.astype(np.uint64).reshape(rows, cols // 8, 8)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(octets << shifts, axis=-1)  # (rows, cols/8) uint64
    stream = words.astype("<u8").view(np.uint8).reshape(rows, cols // 8, 8)[:, :, :bits]
    return np.ascontiguousarray(stream).reshape(rows, cols * bits // 8).view("<u4")


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack`: uint32 (rows, words) → uint8 codes (rows, words * 32 / bits)."""
    rows, words = packed.shape
    out = np.empty((rows, words * 32 // bits), dtype=np.uint8)
    if 8 % bits == 0:  # 2, 4 and 8 bits never straddle a byte: byte ops, ~10x the general path
        per, mask = 8 // bits, (1 << bits) - 1
        octets = np.ascontiguousarray(packed).astype("<u4", copy=False).view(np.uint8)
        for j in range(per):  # little-endian: code k * per + j sits at bit j * bits of byte k
            np.bitwise_and(octets >> (j * bits), mask, out=out[:, j::per])
        return out
    # In slices of rows: the uint64 lanes take 9 bytes per code, which for a whole embedding
    # (262M codes on the 1B shape) would be 2.3 GiB held at once.
    step = max(1, _UNPACK_SLICE // max(words, 1))
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    for r in range(0, rows, step):
        part = np.ascontiguousarray(packed[r : r + step]).astype("<u4")
        stream = part.view(np.uint8).reshape(len(part), -1, bits)
        octets = np.zeros((len(part), stream.shape[1], 8), dtype=np.uint8)
        octets[:, :, :bits] = stream
        codes = (octets.view("<u8") >> shifts) & np.uint64((1 << bits) - 1)  # (n, cols/8, 8)
        out[r : r + step] = codes.reshape(len(part), -1)
    return out


_UNPACK_SLICE = 1 << 19  # packed words per slice of `unpack` (about 2M codes at 4 bits)


def _groups(w: np.ndarray, scheme: AffineScheme) -> np.ndarray:
    """(rows, cols) weight → float32 (rows * cols / group_size, group_size)."""
    return np.asarray(w, dtype=np.float32).reshape(-1, scheme.group_size)


def codes_for(groups: np.ndarray, scale: np.ndarray, bias: np.ndarray, levels: int) -> np.ndarray:
    """Nearest codes for float32 groups (G, gs) under per-group float32 scale and bias (G,)."""
    q = np.rint((groups - bias[:, None]) / scale[:, None])
    return np.clip(q, 0, levels)


def _codes_mul(groups: np.ndarray, inv_scale: np.ndarray, bias: np.ndarray, levels: int):
    """`codes_for` with the reciprocal of the scale: the search's form (a multiply per weight)."""
    q = np.rint((groups - bias[:, None]) * inv_scale[:, None])
    return np.clip(q, 0, levels)


def _lane_sum(x: np.ndarray) -> np.ndarray:
    """float32 sum of each row of x (G, n) in a fixed order: eight interleaved partial sums.

    Element i goes to lane i % 8, lanes combine as ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). The
    native kernel sums in exactly this order (it is what SIMD does well), which is what makes the
    two bit-identical; numpy's own reductions use an order of their own.
    """
    lanes = x.reshape(len(x), -1, 8)
    acc = np.zeros((len(x), 8), dtype=np.float32)
    for k in range(lanes.shape[1]):
        acc += lanes[:, k]
    a4 = acc[:, :4] + acc[:, 4:]
    return (a4[:, 0] + a4[:, 2]) + (a4[:, 1] + a4[:, 3])


def group_error(groups: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray):
    """Sum of squared reconstruction error per group, float32 (G,)."""
    r = (q * scale[:, None] + bias[:, None]) - groups
    return _lane_sum(r * r)


def rtn_params(groups: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """MLX's affine rule: the float32 scale and bias `mx.quantize` uses to compute codes.

    Not plain min/max: the extreme with the larger magnitude ("edge") is put exactly on a code,
    so it is reproduced without error, and the scale is adjusted to keep the range. The bias is
    that edge (or 0 when the edge rounds to code 0). All arithmetic in float32, as MLX does.
    """
    w_max = groups.max(axis=1)
    w_min = groups.min(axis=1)
    neg_edge = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / np.float32(levels), _EPS)
    scale = np.where(neg_edge, scale, -scale)
    edge = np.where(neg_edge, w_min, w_max)
    q0 = np.rint(edge / scale)
    nonzero = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(nonzero, edge / np.where(nonzero, q0, 1), scale).astype(np.float32)
    bias = np.where(nonzero, edge, np.float32(0)).astype(np.float32)
    return scale, bias


def _round_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 values as they are after a round trip through the storage dtype."""
    return x.astype(dtype).astype(np.float32)


def _lsq_params(
    groups: np.ndarray, q: np.ndarray, sw: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares scale and bias for fixed codes: min Σ (s q + b − w)² per group.

    Sums of codes are exact integers (the determinant too: at most 128 * 128 * 255² < 2³¹), so a
    near-constant group cannot lose its determinant to float32 cancellation. `sw` is the group's
    own `_lane_sum`. Returns (scale, bias, ok) where ok is False for groups whose codes are all
    equal (singular).
    """
    n = groups.shape[1]
    qi = q.astype(np.int64)
    sq = qi.sum(axis=1)
    sqq = (qi * qi).sum(axis=1)
    sqw = _lane_sum(q * groups)
    det = n * sqq - sq * sq
    ok = det > 0
    detf = np.where(ok, det, 1).astype(np.float32)
    sqf, sqqf = sq.astype(np.float32), sqq.astype(np.float32)
    scale = (np.float32(n) * sqw - sqf * sw) / detf
    bias = (sqqf * sw - sqf * sqw) / detf
    return scale, bias, ok


# Candidate ranges for the squared-error search: the group's [min, max] is shrunk towards its
# middle by these fractions at each end (clipping outliers trades their error for a finer grid).
# Each candidate is refitted by least squares, which does most of the work: on SmolLM2 tensors at
# 3 and 4 bits a 7x7 grid of fractions (0..0.2) lowered squared error only 1-2% more than this 3x3
# grid, at three times the cost.
_SHRINK = np.array([0.0, 0.05, 0.12], dtype=np.float32)
_ONE = np.float32(1)


def _search(groups: np.ndarray, scheme: AffineScheme, dtype: np.dtype, refit) -> tuple:
    """The frame both searches share; see `quantize` for the contract.

    Candidate 0 is MLX's rule itself, judged with its stored (rounded) scale and bias and its own
    codes: a candidate replaces it only when strictly better, so the search is never worse than
    rtn per group. Each other candidate is the group's [min, max] shrunk by `_SHRINK` at each end;
    `refit(lo, scale)` turns that range into a stored (rounded) scale and bias, and codes are then
    assigned with those rounded values: what a reader will reconstruct is what is scored.
    The native kernel (`_affine.c`, `search`) performs these same float32 operations in the
    same order; keep the two in step.
    """
    levels = scheme.levels
    s32, b32 = rtn_params(groups, levels)
    best_q = codes_for(groups, s32, b32, levels)
    best_s, best_b = _round_to(s32, dtype), _round_to(b32, dtype)
    best_err = group_error(groups, best_q, best_s, best_b)

    w_min = groups.min(axis=1)
    w_max = groups.max(axis=1)
    span = w_max - w_min
    for lo_cut in _SHRINK:
        for hi_cut in _SHRINK:
            lo = w_min + lo_cut * span
            hi = w_max - hi_cut * span
            scale = np.maximum((hi - lo) / np.float32(levels), _EPS)
            s, b = refit(lo, scale)
            q = _codes_mul(groups, _ONE / s, b, levels)
            err = group_error(groups, q, s, b)
            better = err < best_err
            if better.any():
                best_err = np.where(better, err, best_err)
                best_s = np.where(better, s, best_s)
                best_b = np.where(better, b, best_b)
                best_q = np.where(better[:, None], q, best_q)
    return best_q, best_s, best_b


def _mse_chunk(groups: np.ndarray, scheme: AffineScheme, dtype: np.dtype):
    """`mse`: each candidate's codes get a least-squares refit of scale and bias."""
    levels = scheme.levels
    sw = _lane_sum(groups)

    def refit(lo, scale):
        q = _codes_mul(groups, _ONE / scale, lo, levels)
        ls, lb, ok = _lsq_params(groups, q, sw)
        s = _round_to(np.where(ok, ls, scale), dtype)
        b = _round_to(np.where(ok, lb, lo), dtype)
        return np.where(s == 0, _round_to(scale, dtype), s), b

    return _search(groups, scheme, dtype, refit)


def _zero_chunk(groups: np.ndarray, scheme: AffineScheme, dtype: np.dtype):
    """`mse-zero`: the squared-error search restricted to grids on which zero is a code.

    Each candidate range gets an integer zero point k (the code of 0.0, clipped to the codes), bias
    -k * scale, and a least-squares refit of the scale alone with k fixed; the bias follows the
    rounded scale. MLX's rule (candidate 0) also keeps zero on its grid. Measured on SmolLM2 at
    3 bits, groups of 64: a free squared-error fit raises KL divergence over MLX's rule, this one
    lowers it (bench/RESULTS.md).
    """
    levels = scheme.levels

    def refit(lo, scale):
        inv = _ONE / scale
        k = np.clip(np.rint((-lo) * inv), 0, levels)  # the code of 0.0
        qk = _codes_mul(groups, inv, -(k * scale), levels) - k[:, None]
        den = _lane_sum(qk * qk)  # whole numbers below 2**24: exact in any order
        num = _lane_sum(qk * groups)
        ok = den > 0
        s = _round_to(np.where(ok, num / np.where(ok, den, _ONE), scale), dtype)
        s = np.where(s == 0, _round_to(scale, dtype), s)
        return s, _round_to(-(k * s), dtype)

    return _search(groups, scheme, dtype, refit)


_SEARCHES = {"mse": _mse_chunk, "mse-zero": _zero_chunk}
_CHUNK_GROUPS = 1 << 14  # bounds each thread's temporaries to a few tens of MiB


def quantize(
    w: np.ndarray, scheme: AffineScheme, dtype: str = "bfloat16", method: str = "rtn"
) -> QuantizedTensor:
    """Quantize a 2-D weight (rows, cols) to grouped affine integers.

    `rtn` is bit-exact with `mx.quantize(w.astype(dtype), group_size, bits)`: `w` is first cast to
    the storage dtype, exactly as MLX would see it. `mse` searches each group's scale and bias for
    the least squared reconstruction error, computing codes with the scale and bias already rounded
    to the storage dtype; per group it is never worse than `rtn`. `mse-zero` searches the same way
    among grids on which zero is exactly a code (see `_zero_chunk`); also never worse than `rtn`.

    Args:
        w: float weight (rows, cols), any float dtype; cols must divide into groups.
        scheme: bits and group size.
        dtype: storage dtype of scales and biases ("float16", "bfloat16", "float32").
        method: "rtn", "mse" or "mse-zero".

    Returns:
        The packed tensor.

    Raises:
        MlxedgeError: unknown method or dtype.
        ValueError: w is not 2-D or its columns do not divide into groups.
    """
    if method not in METHODS:
        raise MlxedgeError(f"method {method!r} is not supported", fix=f"choose one of {METHODS}")
    out_dtype = storage_dtype(dtype)
    if w.ndim != 2 or not scheme.fits(w.shape[1]):
        raise ValueError(f"cannot quantize shape {w.shape} with group size {scheme.group_size}")
    rows, cols = w.shape
    groups = _groups(np.asarray(w).astype(out_dtype), scheme)
    if method == "rtn":
        scale, bias = rtn_params(groups, scheme.levels)
        q = codes_for(groups, scale, bias, scheme.levels)
    else:
        # numpy releases the GIL inside its loops, so chunks searched on threads use every core.
        chunks = [groups[i : i + _CHUNK_GROUPS] for i in range(0, len(groups), _CHUNK_GROUPS)]
        search = _SEARCHES[method]
        parts = parallel_map(lambda c: search(c, scheme, out_dtype), chunks)
        q = np.concatenate([p[0] for p in parts])
        scale = np.concatenate([p[1] for p in parts])
        bias = np.concatenate([p[2] for p in parts])
    n_groups = cols // scheme.group_size
    return QuantizedTensor(
        weight=pack(q.astype(np.uint8).reshape(rows, cols), scheme.bits),
        scales=scale.astype(out_dtype).reshape(rows, n_groups),
        biases=bias.astype(out_dtype).reshape(rows, n_groups),
        scheme=scheme,
    )


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """Reconstruct float32 weights (rows, cols): scale * q + bias per group, in float32."""
    codes = unpack(qt.weight, qt.scheme.bits).astype(np.float32)
    rows, cols = codes.shape
    g = qt.scheme.group_size
    scales = qt.scales.astype(np.float32).reshape(rows, cols // g, 1)
    biases = qt.biases.astype(np.float32).reshape(rows, cols // g, 1)
    return (codes.reshape(rows, cols // g, g) * scales + biases).reshape(rows, cols)
