"""Granite through the paths the table-driven tests do not reach on their own: the GGUF round trip
of its four multipliers (`mlxedge export gguf`, then `mlxedge import`) and its config errors.
(The reference against mlx-lm, quantize + mlx_lm.load, llama.cpp on every mix, llama-quantize's
type choices and the Core ML export run granite with the other architectures, from ARCHS.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from config_errors import assert_quantize_refuses
from tiny_models import make_tiny_model

from mlxedge.cli import main
from mlxedge.source import resolve

MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
               "logits_scaling")  # fmt: skip


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_round_trip_keeps_the_multipliers_and_the_weights(tmp_path, tied):
    folder = make_tiny_model(tmp_path / "hf", "granite", dtype="float32", tied=tied)
    gguf_file = tmp_path / "g.gguf"
    assert run("export", "gguf", folder, "--type", "F32", "-o", gguf_file).exit_code == 0
    back = tmp_path / "back"
    result = run("import", gguf_file, "-o", back)
    assert result.exit_code == 0, result.output
    original = json.loads((folder / "config.json").read_text())
    restored = json.loads((back / "config.json").read_text())
    assert restored["model_type"] == "granite"
    for key in MULTIPLIERS:
        assert restored[key] == original[key], key  # shortest decimals of exact float32 values
    assert restored["tie_word_embeddings"] is tied
    a, b = resolve(str(folder)), resolve(str(back))
    for info in a.weights.infos():
        assert np.array_equal(a.weights.read(info.name), b.weights.read(info.name)), info.name


@pytest.mark.parametrize("edit,message", [
    ({"embedding_multiplier": -1.0}, "embedding_multiplier"),
    ({"logits_scaling": 0}, "logits_scaling"),
    ({"attention_multiplier": "big"}, "attention_multiplier"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])  # fmt: skip
def test_a_bad_config_is_one_clear_error(tmp_path, edit, message):
    assert_quantize_refuses(tmp_path, "granite", edit, message)


def test_missing_multipliers_take_granites_defaults(tmp_path):
    folder = make_tiny_model(tmp_path / "hf", "granite", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    for key in MULTIPLIERS:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    spec = resolve(str(folder)).arch.spec
    assert (spec.embedding_multiplier, spec.residual_multiplier, spec.logits_scaling) == (1, 1, 1)
    assert spec.attention_scale == 1.0  # GraniteConfig's default, not 1/sqrt(head_dim)
