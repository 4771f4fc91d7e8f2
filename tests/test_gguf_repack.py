"""MLX 4/5-bit tensors repacked as Q4_1/Q5_1: same values as MLX computes, without re-quantizing."""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from rounding import assert_same_multiply_add

from mlxedge.quant.repack import repack, repackable
from mlxedge.quant.schemes import AffineScheme, QuantizedTensor, quantize


def mlx_dequantized(qt: QuantizedTensor, dtype) -> np.ndarray:
    """MLX's own dequantization, in float32 (scales and biases cast before the product)."""
    w = mx.array(qt.weight)
    s = mx.array(qt.scales.astype(np.float32))
    b = mx.array(qt.biases.astype(np.float32))
    out = mx.dequantize(w, s, b, group_size=qt.scheme.group_size, bits=qt.scheme.bits)
    return np.array(out)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 5])
def test_float16_scales_repack_exactly(bits, group):
    rng = np.random.default_rng(bits * group)
    w = (rng.standard_normal((24, 256)) * 0.05).astype(np.float16)
    qt = quantize(w, AffineScheme(bits, group), "float16", "mse-zero")
    out = repack(qt)
    assert out.lossless and out.max_abs_error == 0
    assert out.type_name == {4: "Q4_1", 5: "Q5_1"}[bits]
    # gguf-py (the reader llama.cpp's formula is mirrored by) gives MLX's values exactly
    theirs = quants.dequantize(out.data, GGMLQuantizationType[out.type_name])
    bias = qt.biases.astype(np.float32).repeat(group, axis=1)
    assert_same_multiply_add(theirs, mlx_dequantized(qt, np.float16), bias)


def test_bfloat16_scales_report_their_error():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((16, 128)) * 3e-6).astype(
        ml_dtypes.bfloat16
    )  # below float16's normals
    qt = quantize(w, AffineScheme(4, 64), "bfloat16", "rtn")
    out = repack(qt)
    assert not out.lossless and out.max_abs_error > 0
    theirs = quants.dequantize(out.data, GGMLQuantizationType.Q4_1)
    assert np.abs(theirs - mlx_dequantized(qt, None)).max() == pytest.approx(out.max_abs_error)


def test_other_settings_are_refused():
    qt = quantize(np.zeros((2, 64), np.float32), AffineScheme(3, 64), "float16", "rtn")
    assert not repackable(qt.scheme)
    with pytest.raises(ValueError, match="only 4 or 5 bits"):
        repack(qt)
