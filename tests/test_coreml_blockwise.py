"""MLX affine codes carried into Core ML's block-wise form (scale * (data - offset)) without
re-quantizing: the codes are the same bytes, the error is the float16 offset's rounding (stated
as a bound and measured), constant groups are exact, and what float16 cannot hold is refused."""

from __future__ import annotations

import numpy as np
import pytest

from mlxedge.formats.coreml.blockwise import (
    OFFSET_UNIT,
    NotRepresentable,
    container_bits,
    to_blockwise,
)
from mlxedge.quant.schemes import SUPPORTED_BITS, AffineScheme, QuantizedTensor, quantize, unpack


def weights(rows: int = 32, cols: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("method", ["rtn", "mse-zero"])
def test_codes_are_carried_and_the_error_is_within_the_bound(bits, dtype, method):
    qt = quantize(weights(seed=bits), AffineScheme(bits, 64), dtype, method)
    bw = to_blockwise(qt)
    assert np.array_equal(bw.data, unpack(qt.weight, bits))  # the very codes: no re-quantizing
    assert bw.container_bits == container_bits(bits) and bw.widened == (bits not in (4, 8))
    assert bw.scale.dtype == np.float16 and bw.offset.dtype == np.float16
    assert bw.scale.shape == bw.offset.shape == (32, 4)
    # The offset's rounding, |bias| * 2^-11; a float32 scale adds its own rounding times the code.
    s = np.abs(qt.scales.astype(np.float32)).max()
    extra = s * ((1 << bits) - 1) * OFFSET_UNIT if dtype == "float32" else 0.0
    assert bw.max_abs_error <= bw.bound * (1 + 1e-3) + extra + 1e-7
    assert 0 < bw.bound < 0.2 * 2.0**-11 * 4  # |bias| of these weights is below 0.2 * 4


def test_the_bound_is_reached_not_just_stated():
    qt = quantize(weights(rows=256, seed=7), AffineScheme(4, 32), "float16", "rtn")
    bw = to_blockwise(qt)
    assert bw.max_abs_error > 0.25 * bw.bound  # the rounding is real, and the bound is tight


def test_a_constant_group_is_exact():
    w = weights()
    w[3, 64:128] = 0.75  # one group of one value: MLX floors its scale and puts 0.75 in the bias
    w[5, :64] = -1e-3
    qt = quantize(w, AffineScheme(4, 64), "float16", "rtn")
    assert abs(float(qt.scales[3, 1])) <= 1e-6
    with np.errstate(over="ignore", divide="ignore"):
        assert not np.isfinite(np.float16(-float(qt.biases[3, 1]) / float(qt.scales[3, 1])))
    bw = to_blockwise(qt)
    assert bw.constant_groups == 2
    out = bw.dequantize()
    assert np.array_equal(out[3, 64:128], np.full(64, np.float16(0.75), np.float32))
    assert np.array_equal(out[5, :64], np.full(64, np.float16(-1e-3), np.float32))


def test_scales_beyond_float16_are_refused_by_name():
    qt = quantize(weights() * 1e7, AffineScheme(4, 64), "bfloat16", "rtn")  # bf16 holds 1e6
    assert np.abs(qt.scales.astype(np.float32)).max() > 65504
    with pytest.raises(NotRepresentable, match="model.layers.0.mlp.up_proj.*scale.*float16"):
        to_blockwise(qt, "model.layers.0.mlp.up_proj")


def test_a_scale_float16_rounds_to_zero_is_refused():
    # MLX floors scales at 1e-7, which float16 holds as a subnormal; a smaller one (another
    # writer's folder) becomes zero in float16 while its codes differ.
    qt = quantize(weights(), AffineScheme(8, 64), "float32", "rtn")
    qt = QuantizedTensor(qt.weight, np.full_like(qt.scales, 1e-9), qt.biases, qt.scheme)
    with pytest.raises(NotRepresentable, match="scale"):
        to_blockwise(qt)


def test_packed_bytes_are_core_mls_nibble_order():
    # MLX packs 4-bit codes LSB first, as coremltools packs uint4: byte = lo | hi << 4.
    qt = quantize(weights(), AffineScheme(4, 64), "float16", "rtn")
    codes = to_blockwise(qt).data
    packed = qt.weight.view(np.uint8)
    assert np.array_equal(packed, (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8))


def test_the_package_bytes_of_a_widened_tensor():
    rows, cols, g = 32, 256, 64
    for bits in SUPPORTED_BITS:
        qt = QuantizedTensor(
            quantize(weights(), AffineScheme(bits, g), "float16", "rtn").weight,
            np.ones((rows, cols // g), np.float16),
            np.zeros((rows, cols // g), np.float16),
            AffineScheme(bits, g),
        )
        bw = to_blockwise(qt)
        assert bw.nbytes == rows * cols * container_bits(bits) // 8 + 2 * 2 * rows * cols // g
