"""The native kernel (mlxedge/quant/_affine.c) against the numpy specification, bit for bit."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from mlxedge.quant import backend, schemes
from mlxedge.quant.schemes import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, AffineScheme

if backend._affine is None:
    if os.environ.get("CI") == "true":
        pytest.fail(
            "the native kernel did not build in CI (see the pip install log)", pytrace=False
        )
    pytest.skip(
        "the native kernel is not built (no C compiler at install time)", allow_module_level=True
    )

SOURCE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def hard_weights(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random rows at many scales, plus the groups rounding rules trip on."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= rng.uniform(1e-4, 3.0, (rows, 1)).astype(np.float32)
    w[0] = 0.0  # all-zero groups
    w[1] = 0.37  # constant groups
    w[2] = 0.0
    w[2, 5] = 41.0  # a single positive outlier
    w[3, :] = -1e-3
    w[3, 7] = -9.0  # a single negative outlier
    w[4] = np.linspace(-1, 1, cols)  # exact grid-friendly values
    w[5, ::2] = 1e-30  # tiny values next to ordinary ones
    return w


def assert_same(a: schemes.QuantizedTensor, b: schemes.QuantizedTensor) -> None:
    np.testing.assert_array_equal(a.weight, b.weight)
    assert a.scales.dtype == b.scales.dtype and a.biases.dtype == b.biases.dtype
    np.testing.assert_array_equal(a.scales.view(np.uint8), b.scales.view(np.uint8))
    np.testing.assert_array_equal(a.biases.view(np.uint8), b.biases.view(np.uint8))


@pytest.mark.parametrize("method", ["rtn", "mse", "mse-zero"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("source", ["float32", "float16", "bfloat16"])
def test_native_equals_the_specification(method, dtype, source):
    rng = np.random.default_rng(hash((method, dtype, source)) % 2**32)
    for bits in SUPPORTED_BITS:
        for gs in SUPPORTED_GROUP_SIZES:
            w = hard_weights(rng, 24, 384).astype(SOURCE_DTYPES[source])
            scheme = AffineScheme(bits, gs)
            spec = schemes.quantize(w, scheme, dtype, method)
            native = backend._native_quantize(w, scheme, dtype, method)
            assert_same(native, spec)


def test_native_rtn_equals_mx_quantize():
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(1)
    w = hard_weights(rng, 16, 512)
    for bits in SUPPORTED_BITS:
        for gs in SUPPORTED_GROUP_SIZES:
            native = backend._native_quantize(w, AffineScheme(bits, gs), "float32", "rtn")
            q, s, b = mx.quantize(mx.array(w), group_size=gs, bits=bits, stream=mx.cpu)
            np.testing.assert_array_equal(native.weight, np.array(q))
            np.testing.assert_array_equal(native.scales, np.array(s))
            np.testing.assert_array_equal(native.biases, np.array(b))


def test_chunks_on_threads_give_the_specifications_bytes(monkeypatch):
    # Many chunks, the last one short: chunk boundaries must not show in the output.
    monkeypatch.setattr(backend, "_NATIVE_CHUNK", 7)
    rng = np.random.default_rng(2)
    w = hard_weights(rng, 37, 320).astype(ml_dtypes.bfloat16)
    for bits in (3, 4, 6):
        scheme = AffineScheme(bits, 32)
        for method in ("rtn", "mse", "mse-zero"):
            spec = schemes.quantize(w, scheme, "bfloat16", method)
            assert_same(backend._native_quantize(w, scheme, "bfloat16", method), spec)


@pytest.mark.parametrize(
    "bad, dtype",
    [(np.nan, "bfloat16"), (np.inf, "float32"), (-np.inf, "float16"), (1e38, "float16")],
)
def test_non_finite_weights_are_found_with_their_row(bad, dtype):
    # 1e38 is finite in float32 but overflows float16 storage: that is non-finite too.
    w = np.ones((300, 64), dtype=np.float32)
    w[211, 17] = bad
    with pytest.raises(backend.NonFiniteWeights) as info:
        backend.quantize(w, AffineScheme(4, 64), dtype, "rtn")
    assert info.value.row == 211


def test_the_kernel_refuses_mismatched_buffers():
    w = np.zeros(128, dtype=np.float32)
    packed = np.zeros(16, dtype=np.uint32)
    scales = np.zeros(2, dtype=np.float32)
    with pytest.raises(ValueError, match="packed buffer"):
        backend._affine.quantize(w, 0, 0, 4, 64, 0, packed[:15], scales, scales.copy())
    with pytest.raises(ValueError, match="group size"):
        backend._affine.quantize(w, 0, 0, 4, 48, 0, packed, scales, scales.copy())
    with pytest.raises(ValueError, match="bits"):
        backend._affine.quantize(w, 0, 0, 7, 64, 0, packed, scales, scales.copy())


def test_switching_the_kernel_off_gives_the_same_bytes(monkeypatch):
    rng = np.random.default_rng(3)
    w = hard_weights(rng, 40, 256).astype(ml_dtypes.bfloat16)
    scheme = AffineScheme(4, 64)
    for method in ("rtn", "mse", "mse-zero"):
        native, err_native = backend.quantize(w, scheme, "bfloat16", method)
        monkeypatch.setenv(backend.NATIVE_ENV, "0")
        assert not backend.native_available()
        assert backend.active_backend(method).startswith(("mlx", "numpy"))
        fallback, err_fallback = backend.quantize(w, scheme, "bfloat16", method)
        monkeypatch.delenv(backend.NATIVE_ENV)
        assert_same(native, fallback)
        assert err_native == err_fallback
