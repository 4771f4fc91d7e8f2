"""Phi-3 beyond the table-driven tests (which run it with the other architectures, from ARCHS):
the fused projections in GGUF and back, and its config errors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from config_errors import assert_quantize_refuses
from tiny_models import edit_weights, make_tiny_model

from mlxedge.cli import main
from mlxedge.runtime.reference import ReferenceModel
from mlxedge.source import resolve


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def longrope(folder, short, long):
    """Make the tiny model a long-context one: 16k positions over an original 4k, longrope; its
    queries and keys sharper than random weights give, so that positions (and rope) matter."""

    def sharpen(weights):
        for k, v in weights.items():
            if k.endswith("qkv_proj.weight"):
                v[: 64 + 32] *= 8  # q (4 heads of 16) and k (2 heads of 16)

    edit_weights(folder, sharpen)
    config = json.loads((folder / "config.json").read_text()) | {
        "max_position_embeddings": 16384,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": list(short),
                         "long_factor": list(long)},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return config


FACTORS = np.random.default_rng(3).uniform(1, 3, (2, 8)).round(4)  # head_dim 16: 8 frequencies


def test_longrope_with_one_set_of_factors_equals_mlx_lm(tmp_path):
    """mlx-lm always applies the long factors: with both sets equal, its model and the
    reference compute the same thing (the factors and the attention factor)."""
    from test_reference import mlx_logits

    folder = make_tiny_model(tmp_path / "m", "phi3", dtype="float32")
    config = longrope(folder, FACTORS[0], FACTORS[0])
    model = resolve(str(folder))
    assert model.arch.spec.attention_scale != 0.25  # sqrt(1 + ln 4 / ln 4096)^2 / sqrt(16)
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], 48)
    ours = ReferenceModel.from_source(model.config, model.weights).logits(ids)
    assert np.abs(ours - mlx_logits(folder, ids)).max() <= 1e-4
    plain = ReferenceModel.from_source(config | {"rope_scaling": None}, model.weights)
    assert np.abs(plain.logits(ids) - ours).max() > 1e-2  # the scaling is what was compared


@pytest.mark.llamacpp
def test_longrope_runs_in_llama_cpp_as_in_the_reference(tmp_path):
    """llama.cpp, like Hugging Face, takes the short factors within the original context."""
    from llamacpp_util import logits as llama_cpp_logits

    folder = make_tiny_model(tmp_path / "m", "phi3", dtype="float32")
    config = longrope(folder, FACTORS[0], FACTORS[1])
    path = tmp_path / "p.gguf"
    assert run("export", "gguf", folder, "--type", "F32", "-o", path).exit_code == 0
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names
    model = resolve(str(folder))
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], 24)
    ours = ReferenceModel.from_source(model.config, model.weights).logits(ids)
    assert np.abs(ours - llama_cpp_logits(path, [int(i) for i in ids])).max() <= 1e-3
    swapped = config | {"rope_scaling": config["rope_scaling"] | {"short_factor": list(FACTORS[1])}}
    other = ReferenceModel.from_source(swapped, model.weights).logits(ids)
    assert np.abs(other - ours).max() > 1e-2  # which factors were used shows
    result = run("import", path, "-o", tmp_path / "back")
    assert result.exit_code == 2 and "rope_factors" in result.output


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_round_trip_keeps_the_fused_projections(tmp_path, tied):
    folder = make_tiny_model(tmp_path / "hf", "phi3", dtype="float32", tied=tied)
    path = tmp_path / "p.gguf"
    assert run("export", "gguf", folder, "--type", "F32", "-o", path).exit_code == 0
    shapes = {t.name: tuple(t.shape) for t in gguf.GGUFReader(path).tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (64, 64 + 2 * 32)  # q, then k and v (2 KV heads)
    assert shapes["blk.0.ffn_up.weight"] == (64, 2 * 128)  # gate, then up
    assert "blk.0.attn_q.weight" not in shapes and "blk.0.ffn_gate.weight" not in shapes
    back = tmp_path / "back"
    assert run("import", path, "-o", back).exit_code == 0
    a, b = resolve(str(folder)), resolve(str(back))
    assert b.config["model_type"] == "phi3" and b.arch.spec.tied is tied
    assert "head_dim" not in b.config  # Phi3Config derives it
    for info in a.weights.infos():
        assert np.array_equal(a.weights.read(info.name), b.weights.read(info.name)), info.name


@pytest.mark.parametrize("edit,message", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8,
                       "short_factor": [1.0] * 7}}, "short_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"intermediate_size": None}, "intermediate_size"),
])  # fmt: skip
def test_a_bad_config_is_one_clear_error(tmp_path, edit, message):
    assert_quantize_refuses(tmp_path, "phi3", edit, message)
