"""GGUF export, proven in llama.cpp: F32 files reproduce the reference forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llamacpp_util import logits as llama_cpp_logits
from tiny_models import ARCH_CASES, ARCH_IDS, ARCHS, edit_weights, make_tiny_model

from mlxedge.formats.gguf.mixes import MIXES
from mlxedge.formats.gguf.writer import write_gguf
from mlxedge.metrics import log_softmax
from mlxedge.runtime.llamacpp_runner import FLOAT32_TOLERANCE, QUANTIZED_TOLERANCE
from mlxedge.runtime.reference import ReferenceModel
from mlxedge.source import resolve

pytestmark = pytest.mark.llamacpp


@pytest.mark.parametrize("arch,tied", ARCH_CASES, ids=ARCH_IDS)
def test_f32_export_equals_the_reference_in_llama_cpp(tmp_path, arch, tied):
    # not named after the architecture: llama.cpp gives a model *named* "phi3" special tokens by
    # name ("<s>", "</s>", "<unk>"), which the tests' tokenizer does not have (Phi-3's has)
    folder = make_tiny_model(tmp_path / "model", arch, tied=tied, dtype="float32",
                             head_dim=32 if arch == "qwen3" else None)  # fmt: skip
    model = resolve(str(folder))
    out = tmp_path / "model.gguf"
    write_gguf(model, out, "F32")
    ids = [int(i) for i in np.random.default_rng(0).integers(0, model.config["vocab_size"], 24)]
    ours = ReferenceModel.from_source(model.config, model.weights).logits(np.array(ids))
    theirs = llama_cpp_logits(out, ids)
    assert np.abs(ours - theirs).max() <= 1e-3  # the bound for F32 with a float32 cache


def _mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    logp, logq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(logp) * (logp - logq)).sum(axis=-1).mean())


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_mix_of_every_arch_runs_in_llama_cpp_as_in_the_reference(tmp_path, arch, mix):
    """llama.cpp on the file against the numpy reference on the file's own dequantized weights,
    with the llamacpp backend's tolerances (stated in runtime/llamacpp_runner.py)."""
    folder = make_tiny_model(tmp_path / "m", arch, dtype="float32", hidden=256, intermediate=512,
                             heads=4, kv_heads=2, vocab=512, tied=arch != "mistral")  # fmt: skip
    out = tmp_path / "model.gguf"
    report = write_gguf(resolve(str(folder)), out, mix)
    assert out.stat().st_size >= report.bytes_out
    ids = list(range(10, 42))
    theirs = llama_cpp_logits(out, ids)
    own = resolve(str(out))  # the file as gguf-py dequantizes it
    ours = ReferenceModel.from_source(own.config, own.weights).logits(np.array(ids))
    assert np.isfinite(theirs).all() and theirs.std() > 0
    if mix == "F32":
        assert np.abs(ours - theirs).max() <= FLOAT32_TOLERANCE.max_abs_logit
    else:
        assert _mean_kl(ours, theirs) <= QUANTIZED_TOLERANCE.kl_mean


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"type": "linear", "factor": 2.0},
    ],
    ids=["llama3", "linear"],
)  # fmt: skip
def test_rope_scaling_is_exported_as_llama_cpp_reads_it(tmp_path, scaling):
    """Scaled rotary embeddings (llama3: a rope_freqs tensor; linear: metadata) in llama.cpp give
    the reference's logits; positions reach 40, where scaled and unscaled angles differ widely."""
    folder = make_tiny_model(tmp_path / "m", "llama", dtype="float32")

    # sharper attention than random weights give, so that positions (and rope) matter
    def sharpen(weights):
        for k, v in weights.items():
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                v *= 8

    edit_weights(folder, sharpen)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = scaling
    (folder / "config.json").write_text(json.dumps(config))
    model = resolve(str(folder))
    out = tmp_path / "model.gguf"
    write_gguf(model, out, "F32")
    ids = [int(i) for i in np.random.default_rng(1).integers(0, config["vocab_size"], 40)]
    ours = ReferenceModel.from_source(model.config, model.weights).logits(np.array(ids))
    theirs = llama_cpp_logits(out, ids)
    assert np.abs(ours - theirs).max() <= FLOAT32_TOLERANCE.max_abs_logit
    unscaled = dict(config, rope_scaling=None)
    plain = ReferenceModel.from_source(unscaled, model.weights).logits(np.array(ids))
    assert np.abs(plain - theirs).max() > 100 * FLOAT32_TOLERANCE.max_abs_logit  # it mattered
