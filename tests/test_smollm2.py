"""The real default model, SmolLM2-135M-Instruct from its GGUF: quantized, loaded, run in mlx-lm."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm import generate, load

from mlxedge.cli import main
from mlxedge.source import resolve


@pytest.fixture(scope="module")
def smol_q4(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "q4"
    # float32 scales: MLX's CPU backend runs bfloat16 quantized matmuls far slower
    args = ["quantize", "smollm2", "-o", str(out), "--bits", "4", "--group-size", "64",
            "--dtype", "float32", "--recipe", "uniform", "--method", "rtn"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_smollm2_quantizes_with_the_expected_size(smol_q4):
    out, report = smol_q4
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    # 4 bits + two float32 values per 64 weights = 5 bits, plus float32 norms
    assert "134,515,008 parameters, 5.00" in report


def test_smollm2_codes_equal_mx_quantize_of_the_imported_weights(smol_q4):
    out, _ = smol_q4
    source = resolve("smollm2")
    got = mx.load(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        w = mx.array(source.weights.read(f"{name}.weight"))
        q, s, b = mx.quantize(w, group_size=64, bits=4, stream=mx.cpu)
        assert mx.array_equal(q, got[f"{name}.weight"]).item()
        assert mx.array_equal(s, got[f"{name}.scales"]).item()


def test_smollm2_loads_in_mlx_lm_and_answers(smol_q4):
    out, _ = smol_q4
    model, tokenizer = load(str(out))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = generate(model, tokenizer, prompt=prompt, max_tokens=10)
    assert len(tokenizer.encode(text, add_special_tokens=False)) >= 3
    assert text.strip()
