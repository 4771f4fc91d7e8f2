"""MLX affine weights as Core ML block-wise constants, carried without re-quantizing.

MLX stores `w = scale * q + bias` per group of `group_size` weights along a row, q unsigned in
[0, 2^bits - 1]. Core ML's `constexpr_blockwise_shift_scale(data, scale, offset)` computes
`scale * (data - offset)` per block, with uint4 or uint8 data and a float16 scale and offset. So
the codes are kept as they are and `offset = -bias / scale`:

- Core ML's block-wise data is 4- or 8-bit: 2- and 3-bit codes are stored in uint4 and 5- and
  6-bit codes in uint8, with the same scale and offset — every width carried exactly, only larger
  (`Blockwise.widened`).
- The float16 offset rounds: |dw| <= |scale| * |offset| * 2^-11, about |bias| * 2^-11 per weight
  (`Blockwise.bound`); a bfloat16 or float32 scale that float16 cannot hold exactly adds its own
  rounding, times the code. Both are measured per tensor (`Blockwise.max_abs_error`).
- A constant group (MLX floors its scale at 1e-7 and puts the value in the bias) would need an
  offset of ~10^7, beyond float16: it is stored as scale = the value, offset = q - 1, which gives
  the value exactly for its single code.
- A group whose scale float16 cannot hold (beyond 65504, or so small it becomes zero while its
  codes differ), or whose offset overflows while its codes differ, has no block-wise form:
  `NotRepresentable` says which, and the writer stores that tensor as float16 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...quant.schemes import QuantizedTensor, dequantize, unpack

FP16_MAX = float(np.finfo(np.float16).max)
OFFSET_UNIT = 2.0**-11  # float16's relative rounding (half an ulp at the top of a binade)


class NotRepresentable(ValueError):
    """The tensor's scales or offsets do not fit float16 (the message says which group)."""


@dataclass(frozen=True)
class Blockwise:
    """One weight in Core ML's block-wise form.

    Attributes:
        data: the codes, uint8 (rows, cols), one per weight (coremltools packs sub-byte data).
        container_bits: 4 or 8, the width Core ML stores them in (uint4 / uint8).
        bits: the codes' own width.
        scale: float16 (rows, cols / group_size).
        offset: float16, same shape: data - offset is zero where MLX's weight is.
        constant_groups: groups stored by the constant rule.
        max_abs_error: largest |w - w_mlx| of `dequantize()` against MLX's reconstruction.
        bound: the stated bound of the offset's rounding, max over groups of |scale*offset|*2^-11.
    """

    data: np.ndarray
    container_bits: int
    bits: int
    scale: np.ndarray
    offset: np.ndarray
    constant_groups: int
    max_abs_error: float
    bound: float

    @property
    def widened(self) -> bool:
        """Stored in a wider container than the codes need (2/3 -> 4 bits, 5/6 -> 8 bits)."""
        return self.container_bits != self.bits

    @property
    def nbytes(self) -> int:
        """Bytes in the package: the codes at the container width, plus scale and offset."""
        return self.data.size * self.container_bits // 8 + self.scale.nbytes + self.offset.nbytes

    def dequantize(self) -> np.ndarray:
        """scale * (data - offset) per block, in float32 from the float16 scale and offset."""
        return _dequantize(self.data, self.scale, self.offset)

    def stats(self) -> BlockwiseStats:
        """What the export report keeps of it (not the codes, which the program holds)."""
        return BlockwiseStats(self.data.size, self.container_bits, self.bits,
                              self.max_abs_error, self.bound)  # fmt: skip


@dataclass(frozen=True)
class BlockwiseStats:
    """A carried weight as the export report sees it: its size, widths and offset rounding."""

    size: int
    container_bits: int
    bits: int
    max_abs_error: float
    bound: float

    @property
    def widened(self) -> bool:
        return self.container_bits != self.bits


def _dequantize(data: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    rows, cols = data.shape
    groups = scale.shape[1]
    q = data.astype(np.float32).reshape(rows, groups, -1)
    s = scale.astype(np.float32)[..., None]
    o = offset.astype(np.float32)[..., None]
    return (s * (q - o)).reshape(rows, cols)


def container_bits(bits: int) -> int:
    """The Core ML data width that holds `bits`-bit codes."""
    return 4 if bits <= 4 else 8


def to_blockwise(qt: QuantizedTensor, name: str = "the tensor") -> Blockwise:
    """The block-wise form of one MLX-quantized weight.

    Raises:
        NotRepresentable: a group's scale or offset does not fit float16 (see the module doc).
    """
    bits, g = qt.scheme.bits, qt.scheme.group_size
    codes = unpack(qt.weight, bits)
    rows, cols = codes.shape
    grouped = codes.reshape(rows, cols // g, g)
    scale = qt.scales.astype(np.float64)
    bias = qt.biases.astype(np.float64)
    lo, hi = grouped.min(axis=-1), grouped.max(axis=-1)
    constant = lo == hi
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale16 = scale.astype(np.float16)
        offset = -bias / scale16.astype(np.float64)
        offset16 = offset.astype(np.float16)
    bad_scale = ~constant & (~np.isfinite(scale16) | (scale16 == 0))
    bad_offset = ~constant & ~np.isfinite(offset16)
    for bad, what in ((bad_scale, "scale"), (bad_offset, "offset")):
        if bad.any():
            r, c = (int(i[0]) for i in np.nonzero(bad))
            value = scale[r, c] if what == "scale" else offset[r, c]
            raise NotRepresentable(f"{name}: group ({r}, {c}) needs a {what} of {value:.6g}, "
                                   f"beyond float16")  # fmt: skip
    # Constant groups: the value itself as the scale, and an offset one below the code.
    value = scale * lo + bias
    if constant.any():
        if (np.abs(value[constant]) > FP16_MAX).any():
            raise NotRepresentable(f"{name}: a constant group's value is beyond float16")
        scale16 = np.where(constant, value.astype(np.float16), scale16)
        offset16 = np.where(constant, (lo.astype(np.float64) - 1).astype(np.float16), offset16)
    out = Blockwise(
        data=codes,
        container_bits=container_bits(bits),
        bits=bits,
        scale=scale16.astype(np.float16),
        offset=offset16.astype(np.float16),
        constant_groups=int(constant.sum()),
        max_abs_error=0.0,
        bound=float((np.abs(np.where(constant, 0, bias)) * OFFSET_UNIT).max(initial=0.0)),
    )
    # Measured in slices of rows: two float32 copies of a 262M-weight embedding would be the
    # export's peak memory (measured: 4.7 GiB on the 1B shape, against 1 byte per weight held).
    error, step = 0.0, max(1, _SLICE // cols)
    for r in range(0, rows, step):
        part = slice(r, r + step)
        rows_qt = QuantizedTensor(qt.weight[part], qt.scales[part], qt.biases[part], qt.scheme)
        diff = _dequantize(codes[part], out.scale[part], out.offset[part]) - dequantize(rows_qt)
        error = max(error, float(np.abs(diff).max(initial=0.0)))
    return Blockwise(**{**out.__dict__, "max_abs_error": error})


_SLICE = 1 << 22  # weights per slice when measuring the rounding (16 MiB of float32)
