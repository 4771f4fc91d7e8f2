"""GGUF export, proven in llama.cpp: F32 files reproduce the reference forward pass."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny_models import make_tiny_model

from mlxedge.formats.gguf_export import write_gguf
from mlxedge.runtime.artifact import open_model
from mlxedge.runtime.reference import ReferenceModel

pytestmark = pytest.mark.llamacpp


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("llama-cpp-python is not installed in CI", pytrace=False)
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,  # float32 KV cache
    )  # fmt: skip
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_f32_export_equals_the_reference_in_llama_cpp(tmp_path, arch, tied):
    folder = make_tiny_model(tmp_path / arch, arch, tied=tied, dtype="float32",
                             head_dim=32 if arch == "qwen3" else None)  # fmt: skip
    model = open_model(str(folder))
    out = tmp_path / "model.gguf"
    write_gguf(out, arch, model.config, model.weights, model.tokenizer_json,
               model.tokenizer_config, "F32")  # fmt: skip
    ids = [int(i) for i in np.random.default_rng(0).integers(0, model.config["vocab_size"], 24)]
    ours = ReferenceModel.from_source(model.config, model.weights).logits(np.array(ids))
    theirs = llama_cpp_logits(out, ids)
    assert np.abs(ours - theirs).max() <= 1e-3  # the bound for F32 with a float32 cache


@pytest.mark.parametrize("block_type", ["Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_llama_cpp_loads_and_runs_every_block_type(tmp_path, block_type):
    folder = make_tiny_model(tmp_path / "m", "llama", dtype="float32", hidden=256,
                             intermediate=512, heads=4, kv_heads=2, vocab=512)  # fmt: skip
    model = open_model(str(folder))
    out = tmp_path / "model.gguf"
    write_gguf(out, "m", model.config, model.weights, model.tokenizer_json,
               model.tokenizer_config, block_type)  # fmt: skip
    logits = llama_cpp_logits(out, list(range(10, 30)))
    assert logits.shape == (20, 512) and np.isfinite(logits).all() and logits.std() > 0
