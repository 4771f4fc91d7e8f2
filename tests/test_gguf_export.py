"""GGUF export, proven in llama.cpp: F32 files reproduce the reference forward pass."""

from __future__ import annotations

import numpy as np
import pytest
from llamacpp_util import logits as llama_cpp_logits
from tiny_models import make_tiny_model

from mlxedge.formats.gguf_export import write_gguf
from mlxedge.formats.gguf_mix import MIXES
from mlxedge.runtime.artifact import open_model
from mlxedge.runtime.reference import ReferenceModel

pytestmark = pytest.mark.llamacpp


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_f32_export_equals_the_reference_in_llama_cpp(tmp_path, arch, tied):
    folder = make_tiny_model(tmp_path / arch, arch, tied=tied, dtype="float32",
                             head_dim=32 if arch == "qwen3" else None)  # fmt: skip
    model = open_model(str(folder))
    out = tmp_path / "model.gguf"
    write_gguf(model, out, "F32")
    ids = [int(i) for i in np.random.default_rng(0).integers(0, model.config["vocab_size"], 24)]
    ours = ReferenceModel.from_source(model.config, model.weights).logits(np.array(ids))
    theirs = llama_cpp_logits(out, ids)
    assert np.abs(ours - theirs).max() <= 1e-3  # the bound for F32 with a float32 cache


@pytest.mark.parametrize("mix", list(MIXES))
def test_llama_cpp_loads_and_runs_every_mix(tmp_path, mix):
    folder = make_tiny_model(tmp_path / "m", "llama", dtype="float32", hidden=256,
                             intermediate=512, heads=4, kv_heads=2, vocab=512)  # fmt: skip
    model = open_model(str(folder))
    out = tmp_path / "model.gguf"
    report = write_gguf(model, out, mix)
    assert out.stat().st_size >= report.nbytes
    logits = llama_cpp_logits(out, list(range(10, 30)))
    assert logits.shape == (20, 512) and np.isfinite(logits).all() and logits.std() > 0
