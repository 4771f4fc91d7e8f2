"""ggml block types: bytes identical to gguf-py's quantizer, values identical to its dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from mlxedge.quant import ggml as ggml_blocks
from mlxedge.quant.ggml import TYPES, dequantize_rows, quantize_rows


def hard_rows(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((48, 256)).astype(np.float32)
    x *= rng.uniform(1e-3, 5, (48, 1)).astype(np.float32)
    x[0] = 0  # all-zero blocks
    x[1] = 0.25  # constant
    x[2, :32] = np.linspace(-1, 1, 32)  # exact halves after scaling
    x[3, 5] = -60  # a negative outlier sets the signed max
    x[4, :32] = 0.49999997  # the classic roundf trap
    x[5, 40] = 1e-8
    return x


LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


@pytest.mark.parametrize("name", LEGACY)
def test_bytes_equal_gguf_py(name):
    x = hard_rows(np.random.default_rng(0))
    ours = quantize_rows(x, name)
    theirs = quants.quantize(x, GGMLQuantizationType[name])
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    assert TYPES[name].type_id == GGMLQuantizationType[name].value


@pytest.mark.parametrize("name", LEGACY)
def test_dequantize_equals_gguf_py(name):
    x = hard_rows(np.random.default_rng(1))
    data = quantize_rows(x, name)
    ours = dequantize_rows(data, name, x.shape[1])
    theirs = quants.dequantize(data, GGMLQuantizationType[name])
    np.testing.assert_array_equal(ours, theirs)
    # and it is a quantizer: error well below the weights' own scale
    err = np.abs(ours - x).max(axis=1)
    assert (err <= np.abs(x).max(axis=1) * 0.5 + 1e-6).all()


def test_rows_must_divide_into_blocks():
    with pytest.raises(ValueError, match="multiples of 32"):
        quantize_rows(np.zeros((2, 48), np.float32), "Q4_0")


def test_round_half_away_from_zero():
    a = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997], dtype=np.float32)
    np.testing.assert_array_equal(
        ggml_blocks._round_half_away(a), np.array([1, 2, 3, -1, -3, 0, 0], np.float32)
    )


K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_dequantize_equals_gguf_py(name):
    # Random bytes exercise every bit of every field; the float16 scales are set to finite values.
    t = TYPES[name]
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (64, t.type_size), dtype=np.uint8)
    scale_at = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
    for at in scale_at[name]:
        d = rng.uniform(-0.1, 0.1, 64).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(64, 2)
    ours = dequantize_rows(blocks.reshape(4, -1), name, 16 * t.block_size)
    theirs = quants.dequantize(blocks.reshape(4, -1), GGMLQuantizationType[name])
    np.testing.assert_array_equal(ours, theirs)
    assert t.type_id == GGMLQuantizationType[name].value


def test_every_type_round_trips_with_the_error_its_bits_allow():
    # Gaussian rows: relative RMS error below 2^(1 - bits) for every type, ordered by bits, and
    # each K-quant better than the legacy type of the same width.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    bits = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5,
            "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}  # fmt: skip
    assert set(bits) == set(TYPES)
    err = {}
    for name, b in bits.items():
        y = dequantize_rows(quantize_rows(x, name), name, x.shape[1])
        err[name] = float(np.sqrt(((y - x) ** 2).mean() / (x**2).mean()))
        assert err[name] < 2.0 ** (1 - b), (name, err[name])
    ladder = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    assert all(err[a] > err[b] for a, b in zip(ladder, ladder[1:], strict=False))
    assert err["Q4_K"] < err["Q4_1"] < err["Q4_0"]
    assert err["Q5_K"] < err["Q5_1"] < err["Q5_0"]
