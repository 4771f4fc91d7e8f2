"""llama.cpp through llama-cpp-python, for the tests that prove our GGUF files in it, and
llama.cpp's own test data (see `llamacpp_data.py`, which `make install` runs).

Where the package or the data is missing a test skips, except in CI (CI=true), where it fails: a
green CI run must mean llama.cpp really ran.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from llamacpp_data import DATA_DIR, is_complete

from mlxedge.quant.ggml import TYPES


def skip_or_fail(reason: str):
    """Skip with `reason`; under CI=true fail, since a skip would hide that llama.cpp never ran."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a llama.cpp test may not skip)", pytrace=False)
    pytest.skip(reason)


def llama_cpp():
    """The llama_cpp module, or a skip (a failure under CI=true)."""
    try:
        import llama_cpp
    except ImportError:
        skip_or_fail("llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    return llama_cpp


def llama_cpp_data() -> Path:
    """llama.cpp's test vocabularies and llama-vocab.cpp, as `make install` unpacked them."""
    if not is_complete(DATA_DIR):
        skip_or_fail(f"llama.cpp's test data is not in {DATA_DIR} (run `make install`)")
    return DATA_DIR


def logits(path: Path, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    """llama.cpp's next-token logits for every position of `ids`, with a float32 KV cache."""
    lc = llama_cpp()
    llm = lc.Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
        type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32,
    )  # fmt: skip
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def quantize_file(src: Path, dst: Path, mix: str, pure: bool = False) -> None:
    """llama-quantize's own conversion of a GGUF file to `mix` (e.g. "Q4_K_M"), no imatrix."""
    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    ftype = "LLAMA_FTYPE_ALL_F32" if mix == "F32" else f"LLAMA_FTYPE_MOSTLY_{mix}"
    params.ftype = getattr(lc, ftype)
    params.nthread = 2
    params.pure = pure
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({mix}) failed with {rc}"


def libggml() -> ctypes.CDLL:
    """The ggml library llama-cpp-python ships (the one with `ggml_quantize_chunk`)."""
    lib_dir = Path(llama_cpp().__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "libggml.so", "libggml.dylib"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            if hasattr(lib, "ggml_quantize_chunk"):
                return lib
    pytest.fail(f"no ggml library with ggml_quantize_chunk under {lib_dir}")


def llama_cpp_quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's reference quantizer (`ggml_quantize_chunk`, no imatrix) of the rows of `x`."""
    fn = libggml().ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    t = TYPES[type_name]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, cols // t.block_size * t.type_size), dtype=np.uint8)
    written = fn(GGMLQuantizationType[type_name].value, x.ctypes.data, out.ctypes.data, 0, rows,
                 cols, None)  # fmt: skip
    assert written == out.nbytes
    return out
