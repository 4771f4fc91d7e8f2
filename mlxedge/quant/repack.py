"""MLX affine tensors as GGUF blocks without re-quantizing: 4-bit → Q4_1, 5-bit → Q5_1.

An MLX group (scale s, bias b, codes q; w = s * q + b) of 32, 64 or 128 weights is one, two or four
ggml blocks of 32 with d = s and m = b: the codes are carried over unchanged, only repacked (MLX
packs codes lowest bits first along the row; a ggml block puts elements j and j + 16 in one byte).
Q4_1/Q5_1 store d and m as float16. Where every scale and bias is exactly a float16 value (true of
many bfloat16 and float16 checkpoints, not of all), the GGUF reconstructs exactly what MLX does;
otherwise the report says how far it is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlxedge.quant.ggml import BLOCK, dequantize_rows, pack_q4_1, pack_q5_1
from mlxedge.quant.schemes import AffineScheme, QuantizedTensor, dequantize, unpack

REPACKABLE = {4: "Q4_1", 5: "Q5_1"}


@dataclass(frozen=True)
class Repacked:
    """A tensor as ggml blocks, and how faithful the repack is."""

    type_name: str
    data: np.ndarray  # uint8 (rows, bytes per row)
    lossless: bool  # every scale and bias survived float16 exactly
    max_abs_error: float  # largest |GGUF value - MLX value| over the tensor (0 when lossless)


def repackable(scheme: AffineScheme) -> bool:
    """4 or 5 bits with groups that are whole ggml blocks."""
    return scheme.bits in REPACKABLE and scheme.group_size % BLOCK == 0


def repack(qt: QuantizedTensor) -> Repacked:
    """The Q4_1/Q5_1 form of an MLX affine tensor (see the module doc).

    Raises:
        ValueError: bits other than 4/5 or a group size that is not a multiple of 32.
    """
    if not repackable(qt.scheme):
        raise ValueError(
            f"{qt.scheme.bits}-bit groups of {qt.scheme.group_size} cannot be repacked; "
            "only 4 or 5 bits with groups of a multiple of 32"
        )
    codes = unpack(qt.weight, qt.scheme.bits)  # (rows, cols)
    rows, cols = codes.shape
    per_group = qt.scheme.group_size // BLOCK
    scales = qt.scales.astype(np.float32)
    biases = qt.biases.astype(np.float32)
    d = np.repeat(scales, per_group, axis=1).reshape(-1)
    m = np.repeat(biases, per_group, axis=1).reshape(-1)
    pack = pack_q4_1 if qt.scheme.bits == 4 else pack_q5_1
    data = pack(codes.reshape(-1, BLOCK), d, m).reshape(rows, -1)
    lossless = bool(
        (scales.astype(np.float16).astype(np.float32) == scales).all()
        and (biases.astype(np.float16).astype(np.float32) == biases).all()
    )
    error = 0.0
    if not lossless:
        ours = dequantize_rows(data, REPACKABLE[qt.scheme.bits], cols)
        error = float(np.abs(ours - dequantize(qt)).max())
    return Repacked(REPACKABLE[qt.scheme.bits], data, lossless, error)
