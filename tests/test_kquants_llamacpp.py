"""K-quant writers against llama.cpp's own quantizer, byte for byte.

llama.cpp is reached through the ggml library that `llama-cpp-python` (the `llamacpp` extra)
builds: `ggml_quantize_chunk` with no importance matrix runs llama.cpp's reference quantizers,
the ones llama-quantize uses.
"""

from __future__ import annotations

import numpy as np
import pytest
from llamacpp_util import llama_cpp_quantize

from mlxedge.quant.ggml import quantize_rows

pytestmark = pytest.mark.llamacpp


def hard_rows(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((32, 512)).astype(np.float32)
    x *= rng.uniform(1e-3, 4, (32, 1)).astype(np.float32)
    x[0] = 0  # all-zero super-blocks
    x[1, :16] = 0  # one all-zero sub-block
    x[2] = 0.3  # constant
    x[3, 7] = 80  # an outlier
    x[4] **= 3  # heavy tails
    x[5, :256] = 1e-20  # below llama.cpp's GROUP_MAX_EPS everywhere
    return x


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_bytes_equal_llama_cpp(name):
    x = hard_rows(np.random.default_rng(11))
    np.testing.assert_array_equal(quantize_rows(x, name), llama_cpp_quantize(x, name))


@pytest.fixture(scope="module")
def smollm2_ffn_down() -> list[np.ndarray]:
    from mlxedge.source import resolve

    weights = resolve("smollm2").weights
    return [weights.read(f"model.layers.{i}.mlp.down_proj.weight") for i in (0, 14, 29)]


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_of_real_weights_equal_llama_cpp(smollm2_ffn_down, name):
    # The anchor is the error ratio against llama.cpp's quantizer on ffn_down tensors
    # (mean <= 1.0, none above 1.02); identical bytes make every ratio exactly 1.
    for w in smollm2_ffn_down:
        w = np.asarray(w, dtype=np.float32)
        np.testing.assert_array_equal(quantize_rows(w, name), llama_cpp_quantize(w, name))
