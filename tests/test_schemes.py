"""The numpy specification of grouped affine quantization, held against MLX and against math."""

from __future__ import annotations

import itertools

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rounding import assert_same_multiply_add

from mlxedge.errors import MlxedgeError
from mlxedge.quant import backend, schemes
from mlxedge.quant.schemes import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, AffineScheme

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _mx_quantize(w: np.ndarray, scheme: AffineScheme, dtype: str):
    wm = mx.array(w).astype(DTYPES[dtype])
    # MLX's CPU kernel: its Metal one rounds ties away from zero (mlxedge's rtn follows the CPU)
    q, s, b = mx.quantize(wm, group_size=scheme.group_size, bits=scheme.bits, stream=mx.cpu)
    return np.array(q), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))


def _awkward_weight(rng, rows: int, cols: int, group: int) -> np.ndarray:
    """Random rows plus the groups that trip up rounding rules."""
    w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    w[0, :group] = 0.0  # all zero
    w[1, :group] = 0.37  # constant positive
    w[2, :group] = -0.11  # constant negative
    w[3, 5] = 4.0  # single positive outlier
    w[4, 9] = -4.0  # single negative outlier
    w[5, :group] = np.linspace(-1, 1, group)  # symmetric range: the edge choice is a tie
    w[6, :group] = rng.integers(0, 16, group) * 0.01 - 0.05  # already on a 4-bit grid
    w[7, :group] = 1e-30  # denormal-scale values
    return w


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "bits,group", list(itertools.product(SUPPORTED_BITS, SUPPORTED_GROUP_SIZES))
)
def test_rtn_is_bit_exact_with_mx_quantize(bits, group, dtype):
    rng = np.random.default_rng(bits * 1000 + group)
    scheme = AffineScheme(bits, group)
    w = _awkward_weight(rng, 16, 2 * 128, group)
    ours = schemes.quantize(w, scheme, dtype, "rtn")
    q, s, b = _mx_quantize(w, scheme, dtype)
    np.testing.assert_array_equal(ours.weight, q)
    np.testing.assert_array_equal(ours.scales.astype(np.float32), s)
    np.testing.assert_array_equal(ours.biases.astype(np.float32), b)


@pytest.mark.parametrize(
    "bits,group", list(itertools.product(SUPPORTED_BITS, SUPPORTED_GROUP_SIZES))
)
def test_dequantize_matches_mx_dequantize_in_float32(bits, group):
    rng = np.random.default_rng(7)
    scheme = AffineScheme(bits, group)
    qt = schemes.quantize(_awkward_weight(rng, 8, 256, group), scheme, "bfloat16")
    theirs = mx.dequantize(
        mx.array(qt.weight),
        mx.array(qt.scales.astype(np.float32)),
        mx.array(qt.biases.astype(np.float32)),
        group_size=group,
        bits=bits,
    )
    bias = qt.biases.astype(np.float32).repeat(group, axis=1)
    assert_same_multiply_add(schemes.dequantize(qt), np.array(theirs), bias)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_is_a_little_endian_bit_stream(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 64)).astype(np.uint8)
    packed = schemes.pack(codes, bits)
    assert packed.dtype == np.uint32 and packed.shape == (3, 64 * bits // 32)
    stream = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")
    expect = np.unpackbits(codes[..., None], axis=2, bitorder="little")[..., :bits].reshape(3, -1)
    np.testing.assert_array_equal(stream, expect)
    np.testing.assert_array_equal(schemes.unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_rtn_error_bounds(bits):
    """Within the grid's span every weight is within scale/2 of its reconstruction, and the
    group's larger-magnitude extreme (MLX's "edge") is reproduced exactly."""
    rng = np.random.default_rng(1)
    scheme = AffineScheme(bits, 64)
    w = rng.standard_normal((32, 256), dtype=np.float32)
    qt = schemes.quantize(w, scheme, "float32")
    g = w.reshape(-1, 64)
    err = np.abs(schemes.dequantize(qt).reshape(-1, 64) - g)
    scale = qt.scales.astype(np.float32).reshape(-1, 1)
    bias = qt.biases.astype(np.float32).reshape(-1, 1)
    ends = np.sort(np.concatenate([bias, bias + scheme.levels * scale], axis=1), axis=1)
    inside = (g >= ends[:, :1]) & (g <= ends[:, 1:])
    assert inside.mean() > 0.9
    assert (err[inside] <= (np.abs(scale) / 2 * (1 + 1e-5)).repeat(64, 1)[inside]).all()
    edge = np.take_along_axis(g, np.abs(g).argmax(axis=1)[:, None], axis=1)
    rec = schemes.dequantize(qt).reshape(-1, 64)
    rec_edge = np.take_along_axis(rec, np.abs(g).argmax(axis=1)[:, None], axis=1)
    np.testing.assert_allclose(rec_edge, edge, rtol=1e-6)


def test_all_zero_and_constant_groups_are_exact():
    scheme = AffineScheme(4, 32)
    w = np.zeros((2, 64), dtype=np.float32)
    w[1] = 0.25
    qt = schemes.quantize(w, scheme, "float32")
    np.testing.assert_array_equal(schemes.dequantize(qt), w)


def _group_sse(w: np.ndarray, qt) -> np.ndarray:
    ref = w.astype(np.float32).reshape(-1, qt.scheme.group_size)
    rec = schemes.dequantize(qt).reshape(-1, qt.scheme.group_size)
    return ((rec - ref) ** 2).sum(axis=1)


@pytest.mark.parametrize("method", ["mse", "mse-zero"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_searches_are_never_worse_than_rtn_on_any_group(bits, dtype, method):
    rng = np.random.default_rng(bits)
    scheme = AffineScheme(bits, 64)
    w = _awkward_weight(rng, 64, 256, 64)
    w = w.astype(schemes.storage_dtype(dtype)).astype(np.float32)
    rtn = _group_sse(w, schemes.quantize(w, scheme, dtype, "rtn"))
    mse = _group_sse(w, schemes.quantize(w, scheme, dtype, method))
    assert (mse <= rtn).all()
    assert mse.sum() < rtn.sum()  # and it does find better groups


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_mse_zero_keeps_zero_on_the_grid(bits):
    # Every group's grid holds (up to the storage rounding of its bias) the value 0.0: the bias is
    # minus an integer number of scales. Constant groups are the exception: they are reproduced
    # instead (to within the smallest scale, 1e-7).
    rng = np.random.default_rng(7)
    w = _awkward_weight(rng, 64, 256, 64).astype(np.float32)
    qt = schemes.quantize(w, AffineScheme(bits, 64), "float32", "mse-zero")
    groups = w.reshape(-1, 64)
    constant = groups.min(axis=1) == groups.max(axis=1)
    assert constant.any() and (~constant).sum() > 100
    rec = schemes.dequantize(qt).reshape(-1, 64)
    np.testing.assert_allclose(rec[constant], groups[constant], rtol=0, atol=1e-7)
    s, b = qt.scales.astype(np.float64).ravel(), qt.biases.astype(np.float64).ravel()
    k = (-b / s)[~constant]
    assert np.allclose(k, np.rint(k), atol=1e-3)
    assert ((np.rint(k) >= 0) & (np.rint(k) <= 2**bits - 1)).all()


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-4, 1e3),
    heavy=st.booleans(),
)
def test_mse_never_worse_than_rtn_property(bits, seed, scale, heavy):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 64), dtype=np.float32) * np.float32(scale)
    if heavy:
        w = w**3  # heavy tails: where clipping the range helps most
    w = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    scheme = AffineScheme(bits, 32)
    rtn = _group_sse(w, schemes.quantize(w, scheme, "bfloat16", "rtn"))
    for method in ("mse", "mse-zero"):
        found = _group_sse(w, schemes.quantize(w, scheme, "bfloat16", method))
        assert (found <= rtn).all()


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_backend_matches_specification(method):
    rng = np.random.default_rng(3)
    scheme = AffineScheme(3, 64)
    w = _awkward_weight(rng, 256, 512, 64).astype(ml_dtypes.bfloat16)
    spec = schemes.quantize(w, scheme, "bfloat16", method)
    fast, err = backend.quantize(w, scheme, "bfloat16", method)
    np.testing.assert_array_equal(fast.weight, spec.weight)
    np.testing.assert_array_equal(fast.scales, spec.scales)
    np.testing.assert_array_equal(fast.biases, spec.biases)
    # the error is measured on evenly spaced rows: check it against the same rows
    step = -(-w.size // backend.ERROR_SAMPLE)
    ref = w.astype(np.float32)
    diff = (schemes.dequantize(spec) - ref)[::step]
    ref = ref[::step]
    assert step > 1
    assert err.rel_rmse == pytest.approx(np.sqrt((diff**2).sum() / (ref**2).sum()), rel=1e-4)
    assert err.max_abs == pytest.approx(np.abs(diff).max(), rel=1e-6)


@pytest.mark.parametrize("bits,group", [(7, 64), (1, 64), (4, 16), (4, 256)])
def test_invalid_scheme_names_the_valid_choices(bits, group):
    with pytest.raises(MlxedgeError) as e:
        AffineScheme(bits, group)
    assert "choose" in str(e.value)


def test_unknown_method_and_dtype_are_refused():
    w = np.zeros((1, 64), dtype=np.float32)
    with pytest.raises(MlxedgeError, match="method"):
        schemes.quantize(w, AffineScheme(4, 64), "float16", "gptq")
    with pytest.raises(MlxedgeError, match="dtype"):
        schemes.quantize(w, AffineScheme(4, 64), "int8", "rtn")


def test_the_multiply_add_comparison_allows_one_rounding_and_no_more():
    rng = np.random.default_rng(3)
    s, q, b = (rng.standard_normal(4096).astype(np.float32) for _ in range(3))
    twice = s * q + b  # numpy: the product rounded, then the sum
    once = (s.astype(np.float64) * q + b).astype(np.float32)  # a fused multiply-add's result
    assert not np.array_equal(twice, once)  # the two roundings do differ somewhere
    assert_same_multiply_add(twice, once, b)
    with pytest.raises(AssertionError, match="beyond one rounding"):
        assert_same_multiply_add(twice, np.nextafter(np.nextafter(once, 9), 9) + 1e-6, b)
