"""`--kernels metal|native|numpy`: one quantizer dispatch, the same bytes from every family, and
the report says which ran. On a Mac the real Metal kernels are held to the specification here
(marked `metal`); on Linux tests/test_metal_kernels.py runs the same kernel text on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import make_tiny_model

from mlxedge.cli import main
from mlxedge.quant import backend, ggml
from mlxedge.quant.schemes import SUPPORTED_BITS, AffineScheme, quantize


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("k") / "tiny", "llama", dtype="float32")


def _weights(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))


@pytest.mark.parametrize("method", ["rtn", "mse-zero"])
def test_every_family_writes_the_same_folder_and_the_card_says_which(tiny, tmp_path, method):
    families = ["numpy"] + (["native"] if backend.native_available() else [])
    folders = {}
    for family in families:
        out = tmp_path / family
        result = run("quantize", tiny, "-o", out, "--method", method, "--kernels", family)
        assert result.exit_code == 0, result.output
        assert f"| quantized by | {family} kernels |" in (out / "README.md").read_text()
        folders[family] = _weights(out)
    assert len(set(folders.values())) == 1


def test_every_family_writes_the_same_gguf(tiny, tmp_path):
    families = ["numpy"] + (["native"] if backend.native_available() else [])
    files = []
    for family in families:
        out = tmp_path / f"{family}.gguf"
        result = run("export", "gguf", tiny, "--type", "Q5_0", "-o", out, "--kernels", family)
        assert result.exit_code == 0, result.output
        files.append(out.read_bytes())
    assert len(set(files)) == 1


def test_metal_where_there_is_none_is_a_clear_error(tiny, tmp_path):
    if backend.metal_available():
        pytest.skip("this machine has Metal")
    result = run("quantize", tiny, "-o", tmp_path / "out", "--kernels", "metal")
    assert result.exit_code == 2
    assert "needs Apple Silicon's GPU" in result.output and "--kernels native" in result.output
    assert not (tmp_path / "out").exists()


def test_verbose_says_which_ran(tiny, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mlxedge.cli", "-v", "quantize", str(tiny), "-o",
         str(tmp_path / "out"), "--kernels", "numpy"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "with numpy" in done.stderr


def test_the_default_is_the_fastest_here():
    expected = ("metal" if backend.metal_available() else
                "native" if backend.native_available() else "mlx-cpu")  # fmt: skip
    backend.set_kernels(None)
    assert backend.kernel_family("rtn") == expected


# --- on a Mac: the real kernels -----------------------------------------------------------


def test_non_finite_weights_are_refused_before_any_kernel_runs(monkeypatch):
    """The check is the dispatch's, shared by every family: a Metal kernel never sees NaN."""

    def no_kernel(*args):
        raise AssertionError("a kernel ran on non-finite weights")

    monkeypatch.setattr(backend, "kernel_family", lambda *a, **k: "metal")
    monkeypatch.setattr(backend, "_metal_quantize", no_kernel)
    for bad in (np.nan, np.inf, -np.inf):
        w = np.ones((4, 64), np.float32)
        w[2, 7] = bad
        with pytest.raises(backend.NonFiniteWeights) as err:
            backend.quantize(w, AffineScheme(4, 32), "float16", "mse")
        assert err.value.row == 2


def test_metal_kernels_that_fail_hand_over_to_native_unless_asked_for(monkeypatch, caplog):
    """Chosen by default, a Metal kernel that does not build (MLX raises) gives way to the next
    family with a warning, the same bytes; asked for with --kernels metal, it is an error."""
    from mlxedge.errors import MlxedgeError
    from mlxedge.quant import metal

    def fails(*args, **kwargs):
        raise RuntimeError("program_source:3:5: error: use of undeclared identifier")

    monkeypatch.setattr(backend, "metal_available", lambda: True)
    monkeypatch.setattr(backend, "_metal_failed", None)
    monkeypatch.setattr(metal, "call", fails)
    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    backend.set_kernels(None)
    assert backend.kernel_family("rtn") == "metal"
    got, _ = backend.quantize(w, AffineScheme(4, 64), "float16", "rtn")
    assert np.array_equal(got.weight, quantize(w, AffineScheme(4, 64), "float16", "rtn").weight)
    assert "native kernels take over" in caplog.text
    assert backend.kernel_family("rtn") != "metal"  # for the rest of the process
    try:
        backend.set_kernels("metal")
        with pytest.raises(MlxedgeError, match="Metal kernels failed"):
            backend.quantize(w, AffineScheme(4, 64), "float16", "rtn")
    finally:
        backend.set_kernels(None)


@pytest.mark.metal
@pytest.mark.parametrize("method", ["rtn", "mse", "mse-zero"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_metal_kernels_equal_the_specification_on_the_gpu(method, bits, dtype):
    w = np.random.default_rng(bits).standard_normal((96, 512)).astype(np.float32)
    w[0, :64] = -np.abs(w[0, :64]) - 0.5  # an all-negative group: where MLX's own kernel differs
    try:
        backend.set_kernels("metal")
        for g in (32, 64, 128):
            got, _ = backend.quantize(w, AffineScheme(bits, g), dtype, method)
            want = quantize(w, AffineScheme(bits, g), dtype, method)
            assert np.array_equal(got.weight, want.weight)
            assert np.array_equal(got.scales.view(np.uint8), want.scales.view(np.uint8))
            assert np.array_equal(got.biases.view(np.uint8), want.biases.view(np.uint8))
    finally:
        backend.set_kernels(None)


@pytest.mark.metal
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_the_metal_legacy_kernels_write_llamacpps_bytes_on_the_gpu(type_name):
    x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    try:
        backend.set_kernels("metal")
        got = backend.encode_ggml(x, type_name)
    finally:
        backend.set_kernels(None)
    want = ggml.TYPES[type_name].quantize(x.reshape(-1, 32)).reshape(64, -1)
    assert np.array_equal(got, want)


@pytest.mark.metal
def test_what_mlx_lm_gets_on_a_mac_differs_from_rtn_in_all_negative_groups():
    """Measures the README's statement: MLX's GPU quantizer starts its maximum at 0, so an
    all-negative group gets another scale than the CPU rule (ours) gives it."""
    import mlx.core as mx

    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    w[0, :64] = -np.abs(w[0, :64]) - 0.5
    _, scales_gpu, _ = mx.quantize(mx.array(w), group_size=64, bits=4, stream=mx.gpu)
    ours = quantize(w, AffineScheme(4, 64), "float32", "rtn")
    gpu = np.array(scales_gpu)
    assert not np.array_equal(gpu[0, 0], ours.scales[0, 0])


def test_the_metal_benchmark_refuses_to_run_without_metal():
    if backend.metal_available():
        pytest.skip("this machine has Metal: bench/metal.py runs here")
    script = Path(__file__).resolve().parents[1] / "bench" / "metal.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "needs macOS on Apple Silicon" in done.stderr
