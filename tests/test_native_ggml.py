"""The native ggml block quantizers (mlxedge/formats/_ggml_quants.c) against the numpy
specification in mlxedge/formats/ggml_blocks.py, byte for byte."""

from __future__ import annotations

import os

import numpy as np
import pytest
from llamacpp_util import llama_cpp_quantize

from mlxedge.quant import ggml as ggml_blocks
from mlxedge.quant.ggml import TYPES, quantize_rows

if ggml_blocks._ggml_quants is None:
    if os.environ.get("CI") == "true":
        pytest.fail(
            "the native ggml kernel did not build in CI (see the pip install log)", pytrace=False
        )
    pytest.skip(
        "the native ggml kernel is not built (no C compiler at install time)",
        allow_module_level=True,
    )

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def native(x: np.ndarray, name: str) -> np.ndarray:
    """One call of the kernel on the whole array (no threads)."""
    t = TYPES[name]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.full((rows, cols // t.block_size * t.type_size), 0xAB, dtype=np.uint8)
    ggml_blocks._ggml_quants.quantize(t.type_id, x, rows, cols, out)
    return out


def spec(x: np.ndarray, name: str) -> np.ndarray:
    """The numpy specification."""
    t = TYPES[name]
    rows, cols = x.shape
    blocks = t.quantize(np.asarray(x, dtype=np.float32).reshape(-1, t.block_size))
    return blocks.reshape(rows, cols // t.block_size * t.type_size)


def hard_rows(rng: np.random.Generator, cols: int = 1024) -> np.ndarray:
    """Rows the rounding and degenerate-case rules trip on, then random normals at many scales."""
    x = rng.standard_normal((40, cols)).astype(np.float32)
    x *= np.logspace(-6, 3, 40, dtype=np.float32)[:, None]  # random normals at several scales
    x[0] = 0  # all-zero blocks
    x[1, :16] = 0  # one all-zero sub-block (and half a legacy block)
    x[1, 256:288] = 0  # a whole zero legacy block / Q4_K sub-block
    x[2] = 0.3  # constant
    x[3] = -0.7  # negative constant
    x[4] = -np.abs(x[4])  # negative only
    x[5] = np.abs(x[5])  # positive only
    x[6, 7] = 80  # a single outlier
    x[7] = 0
    x[7, 300] = -5  # a single negative value in a zero row
    x[8] **= 3  # heavy tails
    x[9, :256] = 1e-20  # below llama.cpp's GROUP_MAX_EPS
    x[10] *= np.float32(1e-40)  # subnormals
    x[11] = 1e-42  # constant subnormal
    x[12] *= np.float32(1e4)  # huge: weighted sums overflow to Inf in the searches
    x[13] *= np.float32(1e10)  # huger
    x[14, ::2] = -x[14, 1::2]  # +-a pairs: first-on-ties for the signed maximum
    x[15] = np.round(x[15] * 4) / 4  # values on a grid: many exact halves
    x[16, ::3] = 0  # sparse
    x[17] = np.linspace(-1, 1, cols, dtype=np.float32)
    x[18, :128] = 1e-30
    x[18, 128:] *= 1e-3
    x[19] = np.float32(2.0) ** rng.integers(-20, 20, cols)  # powers of two
    return x


@pytest.mark.parametrize("name", list(TYPES))
def test_native_equals_the_specification_on_hard_rows(name):
    x = hard_rows(np.random.default_rng(7))
    with np.errstate(all="ignore"):
        want = spec(x, name)
    got = native(x, name)
    bad = np.flatnonzero((got != want).any(axis=1))
    assert bad.size == 0, f"{name}: rows {bad.tolist()} differ"


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("seed", [1, 2])
def test_native_equals_the_specification_on_random_rows(name, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((12, 768)).astype(np.float32)
    x *= rng.uniform(1e-4, 10, (12, 1)).astype(np.float32)
    x[::3] += rng.standard_t(2, (4, 768)).astype(np.float32) * 0.05  # heavy tails
    np.testing.assert_array_equal(native(x, name), spec(x, name))


@pytest.mark.parametrize("name", list(TYPES))
def test_quantize_rows_chunking_and_switch(name, monkeypatch):
    """Threaded row chunks give the specification's bytes at every row count (odd and even
    numbers of super-blocks, chunks of one row, uneven chunks), and so does MLXEDGE_NATIVE=0."""
    monkeypatch.setattr(ggml_blocks, "_NATIVE_MIN_SPLIT", 0)  # chunk even the small inputs
    rng = np.random.default_rng(3)
    cols = 256 if TYPES[name].block_size == 256 else 96
    for rows in (0, 1, 2, 3, 7, 8, 9, 17, 33):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        x *= rng.uniform(1e-3, 3, (rows, 1)).astype(np.float32)
        want = spec(x, name)
        monkeypatch.delenv(ggml_blocks.NATIVE_ENV, raising=False)
        assert ggml_blocks.native_available()
        got = quantize_rows(x, name)
        assert got.shape == want.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want, err_msg=f"{rows} rows")
        monkeypatch.setenv(ggml_blocks.NATIVE_ENV, "0")
        assert not ggml_blocks.native_available()
        np.testing.assert_array_equal(quantize_rows(x, name), want, err_msg=f"{rows} rows")


def test_quantize_rows_takes_any_float_layout():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((512, 64))
    np.testing.assert_array_equal(quantize_rows(x.T, "Q4_K"), spec(x.T, "Q4_K"))  # f64, strided


def test_native_rejects_bad_buffers():
    x = np.zeros((2, 256), np.float32)
    out = np.zeros((2, 144), np.uint8)
    quantize = ggml_blocks._ggml_quants.quantize
    with pytest.raises(ValueError, match="type id"):
        quantize(99, x, 2, 256, out)
    with pytest.raises(ValueError, match="whole number of blocks"):
        quantize(12, x, 4, 128, out)
    with pytest.raises(ValueError, match="rows \\* cols"):
        quantize(12, x, 3, 256, out)
    with pytest.raises(ValueError, match="destination"):
        quantize(12, x, 2, 256, out[:1])


@pytest.fixture(scope="module")
def smollm2_ffn_down() -> list[np.ndarray]:
    from mlxedge.source import resolve

    weights = resolve("smollm2").weights
    return [
        np.asarray(weights.read(f"model.layers.{i}.mlp.down_proj.weight"), dtype=np.float32)
        for i in (0, 14, 29)
    ]


@pytest.mark.parametrize("name", K_TYPES)
def test_native_on_real_weights(smollm2_ffn_down, name):
    """SmolLM2's ffn_down tensors: the native bytes are the specification's (first tensor only,
    the numpy quantizer is slow)."""
    first = smollm2_ffn_down[0]
    np.testing.assert_array_equal(quantize_rows(first, name), spec(first, name))


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", K_TYPES)
def test_native_on_real_weights_equals_llama_cpp(smollm2_ffn_down, name):
    """All three tensors: the native bytes are llama.cpp's reference quantizer's."""
    for w in smollm2_ffn_down:
        np.testing.assert_array_equal(quantize_rows(w, name), llama_cpp_quantize(w, name))


def test_block_quantization_follows_the_one_thread_policy(monkeypatch):
    from mlxedge import threads

    x = np.random.default_rng(9).standard_normal((256, 2048)).astype(np.float32)
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    one = quantize_rows(x, "Q4_K")
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert threads.thread_count() == 3
    three = quantize_rows(x, "Q4_K")
    if ggml_blocks.native_available():
        assert threads.pool_size() == 3  # not a fixed 2, whatever the machine
    np.testing.assert_array_equal(one, three)  # blocks are independent: the same bytes
