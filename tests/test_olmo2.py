"""OLMo 2 beyond the table-driven tests (which run it with the other architectures, from ARCHS):
the GGUF round trip, where a tied model's head is written as its own tensor because llama.cpp's
olmo2 loader requires output.weight, and its config errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from config_errors import assert_quantize_refuses
from tiny_models import make_tiny_model

from mlxedge.cli import main
from mlxedge.source import resolve


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_round_trip(tmp_path, tied):
    folder = make_tiny_model(tmp_path / "hf", "olmo2", dtype="float32", tied=tied)
    path = tmp_path / "o.gguf"
    assert run("export", "gguf", folder, "--type", "F32", "-o", path).exit_code == 0
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" in names and "blk.0.attn_q_norm.weight" in names
    assert "blk.0.attn_norm.weight" not in names  # no pre-norms
    back = tmp_path / "back"
    assert run("import", path, "-o", back).exit_code == 0
    a, b = resolve(str(folder)), resolve(str(back))
    assert b.config["model_type"] == "olmo2"
    # the head written for llama.cpp comes back as a head of its own: the same values, untied
    assert b.config["tie_word_embeddings"] is False
    for info in a.weights.infos():
        assert np.array_equal(a.weights.read(info.name), b.weights.read(info.name)), info.name
    if tied:
        assert np.array_equal(b.weights.read("lm_head.weight"),
                              a.weights.read("model.embed_tokens.weight"))  # fmt: skip


@pytest.mark.parametrize("edit,message", [
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": None}, "hidden_size"),
])  # fmt: skip
def test_a_bad_config_is_one_clear_error(tmp_path, edit, message):
    assert_quantize_refuses(tmp_path, "olmo2", edit, message)
