"""llama.cpp through llama-cpp-python, for the tests that prove our GGUF files in it.

Where the package is missing a test skips, except in CI (CI=true), where it fails: a green CI run
must mean llama.cpp really ran.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest


def llama_cpp():
    """The llama_cpp module, or a skip (a failure under CI=true)."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("llama-cpp-python is not installed in CI", pytrace=False)
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    return llama_cpp


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
