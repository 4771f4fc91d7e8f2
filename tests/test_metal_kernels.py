"""Our Metal kernels (affine rtn, mse, mse-zero; llama.cpp's legacy blocks; dequantize), executed
on Linux from the very text MLX generates for a Mac, compared bit for bit with the numpy
specification (`mlxedge/quant/schemes.py`, `mlxedge/quant/ggml.py`); see tests/metal_harness.py.

The harness can fail: copies of a kernel with a bug put in (packing, rounding, lane order, a
removed barrier) are caught, and so is a text using what the Metal Shading Language lacks.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
if shutil.which("g++") is None and os.environ.get("CI") != "true":  # CI must run the harness
    pytest.skip("the kernel harness compiles with g++, which this machine lacks",
                allow_module_level=True)  # fmt: skip

from metal_harness import Harness, metal_violations  # noqa: E402

from mlxedge.quant import ggml  # noqa: E402
from mlxedge.quant.metal import (  # noqa: E402
    AFFINE_DEQUANT,
    AFFINE_RTN,
    AFFINE_RTN_COALESCED,
    AFFINE_SEARCH,
    GGML_LEGACY,
    GGML_LEGACY_DEQUANT,
    LEGACY_TYPES,
    KernelSpec,
    affine_dequant_launch,
    affine_rtn_coalesced_launch,
    affine_rtn_launch,
    affine_search_launch,
    ggml_legacy_dequant_launch,
    ggml_legacy_launch,
    header,  # noqa: E402
)
from mlxedge.quant.schemes import STORAGE_DTYPES, SUPPORTED_BITS, AffineScheme, quantize  # noqa: E402

GROUPS = (32, 64, 128)
DTYPES = ("float32", "float16", "bfloat16")
CASES = [(b, g, d) for b in SUPPORTED_BITS for g in GROUPS for d in DTYPES]
ROWS, COLS = 37, 384  # 444 groups of 32 in threadgroups of 32: the last one partial


def weights(rows: int, cols: int, g: int, bits: int, seed: int = 0) -> np.ndarray:
    """Random rows, then the groups the rule treats specially: all zero, constant, one outlier,
    all negative, and exact ties (half-integer codes on a unit grid)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    flat = w.reshape(-1, g)
    flat[1] = 0.0
    flat[2] = 0.75
    flat[3, 5] = 40.0  # a single outlier
    flat[4] = -np.abs(flat[4]) - 0.5
    top = min((1 << bits) - 1, 63)  # ties stay exact in bfloat16 below 64
    ties = np.arange(g, dtype=np.float32) % top + 0.5
    ties[0], ties[1] = 0.0, float((1 << bits) - 1)
    flat[5] = ties
    flat[6] = -ties
    return w


def _launch(w: np.ndarray, bits: int, g: int, dtype: str):
    return affine_rtn_launch(mx.array(w), bits, g, dtype, threadgroup=32)


def _inputs(w: np.ndarray, g: int, dtype: str) -> list[np.ndarray]:
    stored = w.astype(STORAGE_DTYPES[dtype]).reshape(-1)
    return [stored, np.array(stored.size // g, np.uint32)]


@pytest.fixture(scope="module")
def harness() -> Harness:
    w = np.zeros((ROWS, COLS), np.float32)
    return Harness([(AFFINE_RTN, _launch(w, b, g, d)) for b, g, d in CASES])


@pytest.mark.parametrize("bits,group_size,dtype", CASES)
def test_affine_rtn_kernel_equals_the_specification(harness, bits, group_size, dtype):
    i = CASES.index((bits, group_size, dtype))
    for seed in (0, 1):
        w = weights(ROWS, COLS, group_size, bits, seed)
        codes, scales, biases = harness.run(i, _inputs(w, group_size, dtype),
                                            _launch(w, bits, group_size, dtype))  # fmt: skip
        qt = quantize(w, AffineScheme(bits, group_size), dtype, "rtn")
        assert np.array_equal(codes.view(np.uint32), qt.weight.reshape(-1).view(np.uint32))
        for got, want in ((scales, qt.scales), (biases, qt.biases)):
            assert np.array_equal(got.view(np.uint8), want.reshape(-1).view(np.uint8))


def _broken(find: str, replace: str) -> KernelSpec:
    assert find in AFFINE_RTN.source
    return KernelSpec(AFFINE_RTN.name, AFFINE_RTN.inputs, AFFINE_RTN.outputs,
                      AFFINE_RTN.source.replace(find, replace))  # fmt: skip


@pytest.mark.parametrize("what,find,replace", [
    ("an off-by-one in the packing", "<< filled;", "<< (filled + 1);"),
    ("ties rounded away from zero", "float q = metal::rint(", "float q = metal::round("),
    ("the edge thread skipped", "if (g >= n_groups) {", "if (g + 1 >= n_groups) {"),
])  # fmt: skip
def test_a_broken_kernel_is_caught(what, find, replace):
    bits, g, dtype = 4, 32, "float16"
    w = weights(ROWS, COLS, g, bits)
    harness = Harness([(_broken(find, replace), _launch(w, bits, g, dtype))])
    codes, scales, biases = harness.run(0, _inputs(w, g, dtype), _launch(w, bits, g, dtype))
    qt = quantize(w, AffineScheme(bits, g), dtype, "rtn")
    assert not _same(qt, codes, scales), what


def _same(qt, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray | None = None) -> bool:
    """A kernel's codes and scales (and biases, when given) equal the specification's, byte for
    byte."""
    pairs = [(codes, qt.weight), (scales, qt.scales)]
    if biases is not None:
        pairs.append((biases, qt.biases))
    return all(
        np.array_equal(got.view(np.uint8), want.reshape(-1).view(np.uint8)) for got, want in pairs
    )


@pytest.mark.parametrize("construct", [
    "std::max(lo, hi)", "float* t = new float[4];", "double d = 0;", "static float s = 0;",
    "printf(\"%f\", lo);", "try { } catch (...) { }",
])  # fmt: skip
def test_text_outside_metal_is_refused(construct):
    first = "    uint g = thread_position_in_grid.x;"
    text = AFFINE_RTN.source.replace(first, f"    {construct}\n{first}")
    assert metal_violations(text)
    spec = KernelSpec(AFFINE_RTN.name, AFFINE_RTN.inputs, AFFINE_RTN.outputs, text)
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match="Metal lacks"):
        Harness([(spec, _launch(w, 4, 32, "float32"))])


def test_recursion_is_refused_and_a_plain_helper_is_not():
    helper = "inline float twice(float v) {\n    return v + v;\n}\n"
    recursive = "inline float down(float v) {\n    return v > 1.0f ? down(v - 1.0f) : v;\n}\n"
    assert metal_violations(helper + "float y = twice(1.0f);") == []
    assert metal_violations(recursive + "float y = down(3.0f);") == ["recursion (down)"]


def test_our_kernels_pass_the_metal_checks():
    for spec in (AFFINE_RTN, AFFINE_RTN_COALESCED, AFFINE_SEARCH, GGML_LEGACY, AFFINE_DEQUANT,
                 GGML_LEGACY_DEQUANT):  # fmt: skip
        assert metal_violations(header() + spec.source) == [], spec.name


def test_the_harness_runs_mlx_generated_text():
    """The text compiled is MLX's: its signature, template arguments and attributes."""
    from mlxedge.quant.metal import generated_source

    text = generated_source(AFFINE_RTN, _launch(np.zeros((4, 64), np.float32), 4, 32,
                                                "bfloat16"))  # fmt: skip
    assert "[[kernel]] void custom_kernel_affine_quantize_rtn" in text
    assert "const device bfloat16_t* w [[buffer(0)]]" in text
    assert "const constant uint32_t& n_groups [[buffer(1)]]" in text
    assert "uint3 thread_position_in_grid [[thread_position_in_grid]]" in text
    assert AFFINE_RTN.source.strip() in text


# --- llama.cpp's legacy blocks ----------------------------------------------------------------

LEGACY = tuple(LEGACY_TYPES)
LEGACY_ROWS, LEGACY_COLS = 23, 256  # 184 blocks in threadgroups of 32: the last one partial


def legacy_rows(seed: int) -> np.ndarray:
    """Random rows, then blocks of all zeros, negative zeros, a constant, one outlier, all
    negative, and exact ties of Q8_0's rounding (amax 127: codes are the values themselves)."""
    x = np.random.default_rng(seed).standard_normal((LEGACY_ROWS, LEGACY_COLS)).astype(np.float32)
    blocks = x.reshape(-1, 32)
    blocks[1] = 0.0
    blocks[2] = -0.0
    blocks[3] = 0.3
    blocks[4, 7] = -25.0
    blocks[5] = -np.abs(blocks[5])
    blocks[6] = np.arange(32, dtype=np.float32) - 15.5
    blocks[6, 0] = 127.0
    return x


@pytest.fixture(scope="module")
def legacy_harness() -> Harness:
    x = np.zeros((LEGACY_ROWS, LEGACY_COLS), np.float32)
    return Harness([(GGML_LEGACY, ggml_legacy_launch(mx.array(x), t, threadgroup=32))
                    for t in LEGACY])  # fmt: skip


@pytest.mark.parametrize("type_name", LEGACY)
def test_legacy_block_kernel_writes_llamacpps_bytes(legacy_harness, type_name):
    for seed in (0, 1):
        x = legacy_rows(seed)
        launch = ggml_legacy_launch(mx.array(x), type_name, threadgroup=32)
        inputs = [x.reshape(-1), np.array(x.size // 32, np.uint32)]
        (blocks,) = legacy_harness.run(LEGACY.index(type_name), inputs, launch)
        want = ggml.TYPES[type_name].quantize(x.reshape(-1, 32))  # the numpy specification
        assert np.array_equal(blocks, want.reshape(-1)), type_name


def test_a_broken_legacy_kernel_is_caught():
    """Q5_0's high bits shifted one element along: caught on the same inputs."""
    find = "byte |= ((q[8 * k + j] >> 4) & 1u) << j;"
    assert find in GGML_LEGACY.source
    wrong = find.replace("<< j", "<< ((j + 1) & 7)")
    broken = KernelSpec(GGML_LEGACY.name, GGML_LEGACY.inputs, GGML_LEGACY.outputs,
                        GGML_LEGACY.source.replace(find, wrong))  # fmt: skip
    x = legacy_rows(0)
    launch = ggml_legacy_launch(mx.array(x), "Q5_0", threadgroup=32)
    inputs = [x.reshape(-1), np.array(x.size // 32, np.uint32)]
    (blocks,) = Harness([(broken, launch)]).run(0, inputs)
    assert not np.array_equal(blocks, ggml.TYPES["Q5_0"].quantize(x.reshape(-1, 32)).reshape(-1))


# --- dequantize -------------------------------------------------------------------------------


def _mx(a: np.ndarray):
    import ml_dtypes

    if a.dtype == ml_dtypes.bfloat16:
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


@pytest.fixture(scope="module")
def dequant_harness() -> Harness:
    instances = []
    for b, g, d in CASES:
        qt = quantize(np.zeros((ROWS, COLS), np.float32), AffineScheme(b, g), d, "rtn")
        instances.append((AFFINE_DEQUANT, affine_dequant_launch(
            _mx(qt.weight), _mx(qt.scales), _mx(qt.biases), b, g, threadgroup=32)))  # fmt: skip
    return Harness(instances)


@pytest.mark.parametrize("bits,group_size,dtype", CASES)
def test_affine_dequantize_kernel_equals_the_specification(dequant_harness, bits, group_size,
                                                           dtype):  # fmt: skip
    from mlxedge.quant.schemes import dequantize

    qt = quantize(weights(ROWS, COLS, group_size, bits), AffineScheme(bits, group_size), dtype,
                  "mse")  # fmt: skip
    inputs = [qt.weight.reshape(-1), qt.scales.reshape(-1), qt.biases.reshape(-1),
              np.array(qt.scales.size, np.uint32)]  # fmt: skip
    (w,) = dequant_harness.run(CASES.index((bits, group_size, dtype)), inputs)
    assert np.array_equal(w.view(np.uint32), dequantize(qt).reshape(-1).view(np.uint32))


@pytest.mark.parametrize("type_name", LEGACY)
def test_legacy_dequantize_kernel_equals_the_specification(type_name):
    x = legacy_rows(0)
    blocks = ggml.TYPES[type_name].quantize(x.reshape(-1, 32)).reshape(-1)
    launch = ggml_legacy_dequant_launch(mx.array(blocks), type_name, threadgroup=32)
    (got,) = Harness([(GGML_LEGACY_DEQUANT, launch)]).run(
        0, [blocks, np.array(blocks.size // LEGACY_TYPES[type_name][1], np.uint32)]
    )
    want = ggml.TYPES[type_name].dequantize(blocks.reshape(-1, LEGACY_TYPES[type_name][1]))
    assert np.array_equal(got.view(np.uint32), want.reshape(-1).astype(np.float32).view(np.uint32))


# --- the squared-error searches ---------------------------------------------------------------

SEARCH_CASES = [(m, b, g, d) for m in ("mse", "mse-zero") for b, g, d in CASES]
SEARCH_ROWS, SEARCH_COLS = 9, 384  # 108 groups of 32 in threadgroups of 32: the last partial


@pytest.fixture(scope="module")
def search_harness() -> Harness:
    w = np.zeros((SEARCH_ROWS, SEARCH_COLS), np.float32)
    return Harness([(AFFINE_SEARCH, affine_search_launch(mx.array(w), b, g, d, m, threadgroup=32))
                    for m, b, g, d in SEARCH_CASES])  # fmt: skip


@pytest.mark.parametrize("method,bits,group_size,dtype", SEARCH_CASES)
def test_search_kernel_equals_the_specification(search_harness, method, bits, group_size, dtype):
    i = SEARCH_CASES.index((method, bits, group_size, dtype))
    w = weights(SEARCH_ROWS, SEARCH_COLS, group_size, bits, seed=2)
    launch = affine_search_launch(mx.array(w), bits, group_size, dtype, method, threadgroup=32)
    codes, scales, biases = search_harness.run(i, _inputs(w, group_size, dtype), launch)
    qt = quantize(w, AffineScheme(bits, group_size), dtype, method)
    assert np.array_equal(codes.view(np.uint32), qt.weight.reshape(-1).view(np.uint32))
    for got, want in ((scales, qt.scales), (biases, qt.biases)):
        assert np.array_equal(got.view(np.uint8), want.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("method,what,find,replace", [
    ("mse", "the least-squares lanes summed in another order",
     "float sqw = lane_total(lane);", "float sqw = ((lane[0] + lane[1]) + (lane[2] + lane[3]))"
     " + ((lane[4] + lane[5]) + (lane[6] + lane[7]));"),
    ("mse-zero", "ties (not strict improvements) accepted", "if (err < best_err) {",
     "if (err <= best_err) {"),
    ("mse-zero", "one shrink fraction changed", "{0.0f, 0.05f, 0.12f}", "{0.0f, 0.05f, 0.125f}"),
])  # fmt: skip
def test_a_broken_search_kernel_is_caught(method, what, find, replace):
    bits, g, dtype = 3, 64, "float32"
    assert find in AFFINE_SEARCH.source
    broken = KernelSpec(AFFINE_SEARCH.name, AFFINE_SEARCH.inputs, AFFINE_SEARCH.outputs,
                        AFFINE_SEARCH.source.replace(find, replace))  # fmt: skip
    w = np.random.default_rng(5).standard_normal((64, 256)).astype(np.float32)
    launch = affine_search_launch(mx.array(w), bits, g, dtype, method)
    codes, scales, biases = Harness([(broken, launch)]).run(0, _inputs(w, g, dtype))
    qt = quantize(w, AffineScheme(bits, g), dtype, method)
    assert not _same(qt, codes, scales, biases), what


# --- threadgroup memory and barriers: the coalesced rtn kernel ---------------------------------


@pytest.fixture(scope="module")
def coalesced_harness() -> Harness:
    w = np.zeros((ROWS, COLS), np.float32)
    return Harness([(AFFINE_RTN_COALESCED, affine_rtn_coalesced_launch(mx.array(w), b, g, d))
                    for b, g, d in CASES])  # fmt: skip


@pytest.mark.parametrize("bits,group_size,dtype", CASES)
def test_coalesced_rtn_kernel_equals_the_specification(coalesced_harness, bits, group_size, dtype):
    w = weights(ROWS, COLS, group_size, bits, seed=3)
    launch = affine_rtn_coalesced_launch(mx.array(w), bits, group_size, dtype)
    i = CASES.index((bits, group_size, dtype))
    codes, scales, biases = coalesced_harness.run(i, _inputs(w, group_size, dtype)[:1], launch)
    qt = quantize(w, AffineScheme(bits, group_size), dtype, "rtn")
    assert np.array_equal(codes.view(np.uint32), qt.weight.reshape(-1).view(np.uint32))
    for got, want in ((scales, qt.scales), (biases, qt.biases)):
        assert np.array_equal(got.view(np.uint8), want.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("what,nth", [("the barrier before the words are assembled", -1),
                                      ("the barrier after the partial extremes", 0)])  # fmt: skip
def test_a_removed_barrier_is_caught(what, nth):
    barrier = "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
    text = AFFINE_RTN_COALESCED.source
    at = [i for i in range(len(text)) if text.startswith(barrier, i)][nth]
    spec = AFFINE_RTN_COALESCED
    broken = KernelSpec(spec.name, spec.inputs, spec.outputs, text[:at] + text[at + len(barrier) :])
    bits, g, dtype = 4, 128, "float16"
    w = weights(ROWS, COLS, g, bits, seed=4)
    launch = affine_rtn_coalesced_launch(mx.array(w), bits, g, dtype)
    codes, scales, _ = Harness([(broken, launch)]).run(0, _inputs(w, g, dtype)[:1])
    qt = quantize(w, AffineScheme(bits, g), dtype, "rtn")
    assert not _same(qt, codes, scales), what
