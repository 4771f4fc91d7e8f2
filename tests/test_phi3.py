"""Phi-3 beyond the table-driven tests (which run it with the other architectures, from ARCHS):
the fused projections in GGUF and back, and its config errors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import make_tiny_model

from mlxedge.cli import main
from mlxedge.source import resolve


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


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
                       "short_factor": [1.0] * 8}}, "longrope"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"intermediate_size": None}, "intermediate_size"),
])  # fmt: skip
def test_a_bad_config_is_one_clear_error(tmp_path, edit, message):
    folder = make_tiny_model(tmp_path / "hf", "phi3", dtype="float32")
    config = json.loads((folder / "config.json").read_text()) | edit
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                    if v is not None}))  # fmt: skip
    result = run("quantize", folder, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and "config.json" in result.output
    assert not (tmp_path / "out").exists()
