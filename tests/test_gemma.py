"""Gemma 2 and 3 beyond the table-driven tests (which run gemma2 and gemma3_text with the other
architectures, from ARCHS): the 1 + w norms in GGUF both ways, Gemma 2's sliding layers in
llama.cpp, the multimodal gemma3 wrapper read as its language model, the float32 residual stream
of the Core ML program, sliding layers' smaller caches, and the config errors."""

from __future__ import annotations

import json
import logging

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from config_errors import assert_quantize_refuses
from tiny_models import edit_weights, make_tiny_gemma3, make_tiny_model

from mlxedge.archs import arch_for
from mlxedge.cli import main
from mlxedge.formats.hf import HFCheckpoint
from mlxedge.recommend import kv_cache_bytes
from mlxedge.runtime.reference import ReferenceModel
from mlxedge.source import resolve


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ids_for(config: dict, n: int = 24) -> np.ndarray:
    return np.random.default_rng(0).integers(0, config["vocab_size"], n)


# --------------------------------------------------------------------------------- GGUF

CASES = [("gemma2", True), ("gemma3_text", True), ("gemma3_text", False)]


@pytest.mark.parametrize("arch,tied", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_gguf_stores_norms_as_one_plus_w_and_imports_them_back(tmp_path, arch, tied):
    folder = make_tiny_model(tmp_path / "hf", arch, dtype="float32", tied=tied)
    path = tmp_path / "g.gguf"
    assert run("export", "gguf", folder, "--type", "F32", "-o", path).exit_code == 0
    reader = gguf.GGUFReader(path)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    src = resolve(str(folder))
    w = src.weights.read("model.layers.0.post_feedforward_layernorm.weight")
    np.testing.assert_array_equal(stored["blk.0.post_ffw_norm.weight"], w + np.float32(1))
    assert ("output.weight" in stored) is not tied

    back = tmp_path / "back"
    result = run("import", path, "-o", back)
    assert result.exit_code == 0, result.output
    imported = resolve(str(back))
    a, b = src.arch.spec, imported.arch.spec
    for field in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "windows", "tied",
                  "attention_scale", "attn_softcap", "final_softcap", "local_rope_theta",
                  "rope_theta", "norm_offset", "embedding_multiplier"):  # fmt: skip
        assert getattr(a, field) == getattr(b, field), field
    for i in range(a.n_layers):  # each layer's rotary frequencies, scaling included
        np.testing.assert_array_equal(a.inv_freq(i), b.inv_freq(i))
    for e in src.arch.tensors():
        ours, theirs = src.weights.read(e.name), imported.weights.read(e.name)
        if e.gguf_offset:  # (w + 1) - 1 in float32: one rounding of w + 1 off, at most 2^-24
            assert np.abs(theirs - ours).max() <= 2.0**-24, e.name
        else:
            np.testing.assert_array_equal(theirs, ours, err_msg=e.name)


@pytest.mark.llamacpp
def test_gemma2_sliding_layers_run_in_llama_cpp_as_in_the_reference(tmp_path):
    from llamacpp_util import logits as llama_cpp_logits

    folder = make_tiny_model(tmp_path / "hf", "gemma2", dtype="float32")
    config = json.loads((folder / "config.json").read_text()) | {"sliding_window": 8}
    (folder / "config.json").write_text(json.dumps(config))
    model = resolve(str(folder))
    assert model.arch.spec.windows == (8, None)  # Hugging Face's rule: even layers slide
    path = tmp_path / "g.gguf"
    assert run("export", "gguf", folder, "--type", "F32", "-o", path).exit_code == 0
    ids = ids_for(config)
    ours = ReferenceModel.from_source(model.config, model.weights).logits(ids)
    assert np.abs(ours - llama_cpp_logits(path, [int(i) for i in ids])).max() <= 1e-3
    unwindowed = ReferenceModel.from_source(config | {"sliding_window": 4096}, model.weights)
    assert np.abs(unwindowed.logits(ids) - ours).max() > 1e-2  # the window is what llama.cpp ran


def test_an_attention_scale_llama_cpp_would_not_use_is_refused(tmp_path):
    folder = make_tiny_model(tmp_path / "hf", "gemma3_text", dtype="float32")
    config = json.loads((folder / "config.json").read_text()) | {"query_pre_attn_scalar": 100}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "g.gguf"
    result = run("export", "gguf", folder, "--type", "F32", "-o", out)
    assert result.exit_code == 2 and "query_pre_attn_scalar" in result.output
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))
    # the MLX folder carries it (mlx-lm reads it)
    assert run("quantize", folder, "-o", tmp_path / "q").exit_code == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["query_pre_attn_scalar"] == 100


# ------------------------------------------------------------------- the gemma3 wrapper


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_multimodal_wrapper_is_read_as_its_language_model(tmp_path, tied, caplog):
    from mlx_lm import generate, load
    from test_reference import mlx_logits

    wrapper = make_tiny_gemma3(tmp_path / "mm", tied=tied)
    text = make_tiny_model(tmp_path / "text", "gemma3_text", dtype="float32", tied=tied)
    with caplog.at_level(logging.WARNING):
        model = resolve(str(wrapper))
    assert "the vision tower (2 tensors) is left out" in caplog.text
    assert model.config["model_type"] == "gemma3_text" and model.arch.spec.tied is tied
    assert model.arch.spec == resolve(str(text)).arch.spec
    ids = ids_for(model.config, 40)
    ours = ReferenceModel.from_source(model.config, model.weights).logits(ids)
    assert np.abs(ours - mlx_logits(wrapper, ids)).max() <= 1e-4  # mlx-lm's gemma3 wrapper

    out = tmp_path / "q"
    result = run("quantize", wrapper, "-o", out, "--bits", 4, "--group-size", 32)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "text_config" not in config
    names = {i.name for i in HFCheckpoint.from_folder(out).infos()}
    assert not any(n.startswith(("vision_tower", "language_model")) for n in names)
    mlx_model, tokenizer = load(str(out))  # strict: every tensor where gemma3_text wants it
    assert generate(mlx_model, tokenizer, prompt="hello", max_tokens=3)


def test_recommend_reads_a_wrapper_config(tmp_path):
    wrapper = make_tiny_gemma3(tmp_path / "mm")
    result = run("recommend", wrapper, "--memory", "1GB", "--context", 256, "--json")
    assert result.exit_code == 0, result.output


# -------------------------------------------------------------------------------- Core ML


def test_the_core_ml_residual_stream_is_float32_and_survives_what_float16_cannot(tmp_path):
    """A residual stream beyond float16's range (embeddings of 1e4, times sqrt(64)): the package
    still equals the reference, because its residual ops are float32, while its projections are
    float16."""
    from test_coreml import assert_interp_crosscheck_passes

    from mlxedge.runtime.coreml_interp import Program, _dtype_name

    folder = make_tiny_model(tmp_path / "m", "gemma3_text", dtype="float32", tied=False, layers=1)

    def loud(weights):
        weights["model.embed_tokens.weight"] *= 4e5  # |x| up to ~3e4 stored, ~2.4e5 scaled

    edit_weights(folder, loud)
    out = tmp_path / "c"
    assert run("export", "coreml", folder, "-o", out, "--context", 64, "--method", "rtn",
               "--bits", 8).exit_code == 0  # fmt: skip
    program = Program(next(out.glob("*.mlpackage")))
    kinds = {}
    for op in program.function.operations:
        kinds.setdefault((op.op_type, op.name.startswith("fp32_")), set()).add(
            _dtype_name(op.outputs[0]))  # fmt: skip
    assert kinds[("add", True)] == {"fp32"} and kinds[("linear", False)] == {"fp16"}
    assert_interp_crosscheck_passes(out, folder)


# ------------------------------------------------------------------------------ recommend


def test_sliding_layers_cache_only_their_window():
    config = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 320, "sliding_window": 512}  # fmt: skip
    per_token = 2 * 2 * 16 * 2  # K and V, 2 KV heads, 16 dims, float16
    # five sliding layers hold 512 tokens, the sixth the whole context
    assert kv_cache_bytes(config, 8192) == (5 * 512 + 8192) * per_token
    assert kv_cache_bytes(config, 256) == 6 * 256 * per_token


# ------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("arch,edit,message", [
    ("gemma2", {"tie_word_embeddings": False}, "tie_word_embeddings"),
    ("gemma2", {"attn_logit_softcapping": None}, "attn_logit_softcapping"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3_text", {"layer_types": ["full_attention"]}, "layer_types"),
    ("gemma3_text", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("gemma3_text", {"head_dim": None, "hidden_size": None}, "hidden_size"),
])  # fmt: skip
def test_a_bad_config_is_one_clear_error(tmp_path, arch, edit, message):
    # a null soft-cap turns it off (absent takes Gemma 2's default): nulls are written as such
    assert_quantize_refuses(tmp_path, arch, edit, message, keep_nulls=True)


def test_gemma_windows_follow_hugging_face():
    base = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
            "num_attention_heads": 4, "vocab_size": 300, "sliding_window": 8}  # fmt: skip
    assert arch_for(base | {"model_type": "gemma2"}).spec.windows == (8, None) * 3
    assert arch_for(base | {"model_type": "gemma3_text"}).spec.windows == (8,) * 5 + (None,)
    pattern = arch_for(base | {"model_type": "gemma3_text", "sliding_window_pattern": 3})
    assert pattern.spec.windows == (8, 8, None) * 2 and pattern.sliding_window_pattern() == 3
    types = ["full_attention", "sliding_attention"] * 3
    assert arch_for(base | {"model_type": "gemma3_text", "layer_types": types}).spec.windows == (
        None, 8) * 3  # fmt: skip
