"""`mlxedge export gguf` / `quantize --format gguf`: MLX repacks, mix selection and bad input."""

from __future__ import annotations

import errno
import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from llamacpp_util import logits as llama_cpp_logits
from tiny_models import edit_weights, make_tiny_model

from mlxedge.cli import main
from mlxedge.formats.gguf.load import load_gguf
from mlxedge.source import resolve


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "hf", "llama", dtype="float32", hidden=256, intermediate=512,
                           heads=4, kv_heads=2, vocab=512, layers=4)  # fmt: skip


def _file_type(path) -> int:
    return int(gguf.GGUFReader(path).get_field("general.file_type").contents())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mlx_4bit_folder_repacks_losslessly(tiny, tmp_path, dtype):
    """Every 4-bit tensor of an MLX folder comes out of the GGUF (dequantized by gguf-py, as
    llama.cpp reads it) exactly as MLX dequantizes it when scales and biases are float16 values.
    bfloat16 ones are too unless tiny (float16 subnormals) or huge: those are rounded, within a
    float16 rounding of each, and the report says so."""
    mlx_dir = tmp_path / "mlx"
    args = ["--bits", 4, "--group-size", 64, "--recipe", "uniform", "--dtype", dtype]
    assert run("quantize", tiny, "-o", mlx_dir, *args).exit_code == 0
    out = tmp_path / "m.gguf"
    result = run("export", "gguf", mlx_dir, "-o", out)
    assert result.exit_code == 0, result.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {t for n, t in types.items() if "norm" not in n} == {"Q4_1"}
    assert _file_type(out) == 3  # MOSTLY_Q4_1
    ours = resolve(str(mlx_dir)).weights
    theirs = load_gguf(out).weights
    inexact = 0
    for info in ours.infos():
        scheme = ours.scheme(info.name)
        if scheme is None:
            continue
        a, b = ours.read(info.name), theirs.read(info.name)
        if dtype == "float16":
            assert np.array_equal(a, b), info.name
        else:  # |d q + m - (d' q + m')| <= |d - d'| * 15 + |m - m'|, each a float16 rounding
            qt = ours.quantized(info.name)
            s = np.abs(qt.scales.astype(np.float32)).repeat(scheme.group_size, axis=1)
            m = np.abs(qt.biases.astype(np.float32)).repeat(scheme.group_size, axis=1)
            bound = (s * 15 + m) * 2.0**-11 * 1.001
            assert (np.abs(a - b) <= bound).all(), info.name
        inexact += not np.array_equal(a, b)
    assert ("not float16 values" in result.output) == (inexact > 0)
    logits = llama_cpp_logits(out, list(range(5, 25)))
    assert np.isfinite(logits).all()


def test_mlx_mixed_folder_requantizes_what_it_cannot_repack_and_says_so(tiny, tmp_path):
    mlx_dir = tmp_path / "mlx"
    assert run("quantize", tiny, "-o", mlx_dir, "--bits", 4, "--dtype", "float16").exit_code == 0
    config = json.loads((mlx_dir / "config.json").read_text())
    sixes = [k for k, v in config["quantization"].items() if isinstance(v, dict) and v["bits"] == 6]
    assert sixes  # the mixed recipe gives some tensors 6 bits
    out = tmp_path / "m.gguf"
    result = run("export", "gguf", mlx_dir, "-o", out)
    assert result.exit_code == 0
    assert "re-quantized" in result.output and "6 bits" in result.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert "Q6_K" in types.values() and "Q4_1" in types.values()


def test_quantize_format_gguf_picks_the_mix_from_bits(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    result = run("quantize", tiny, "--format", "gguf", "--bits", 3, "-o", out)
    assert result.exit_code == 0, result.output
    assert _file_type(out) == 12  # MOSTLY_Q3_K_M
    assert "Q3_K" in result.output and "bits per weight" in result.output


def test_unknown_type_lists_the_valid_ones_and_writes_nothing(tiny, tmp_path):
    result = run("export", "gguf", tiny, "--type", "Q4_K_X", "-o", tmp_path / "m.gguf")
    assert result.exit_code == 2
    assert "Q4_K_M" in result.output and "Q6_K" in result.output
    assert not list(tmp_path.iterdir())


def test_mlx_options_are_refused_with_format_gguf(tiny, tmp_path):
    result = run("quantize", tiny, "--format", "gguf", "--group-size", 32, "-o", tmp_path / "x")
    assert result.exit_code == 2 and "--group-size" in result.output and "--type" in result.output


def test_nan_weight_names_the_tensor_and_leaves_nothing(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")

    def poison(weights):
        weights["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan

    edit_weights(src, poison)
    out = tmp_path / "o" / "m.gguf"
    result = run("export", "gguf", src, "-o", out, "--type", "Q8_0")
    assert result.exit_code == 2
    assert "model.layers.1.mlp.up_proj.weight" in result.output and "NaN" in result.output
    assert not out.exists() and not leftovers(out.parent)


def test_full_disk_leaves_nothing(tiny, tmp_path, monkeypatch):
    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def write(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
    out = tmp_path / "m.gguf"
    result = run("export", "gguf", tiny, "-o", out, "--type", "Q8_0")
    assert result.exit_code == 2 and "no space left" in result.output.lower()
    assert not out.exists() and not leftovers(tmp_path)


def test_rope_scaling_gguf_cannot_express_is_refused(tmp_path):
    src = make_tiny_model(tmp_path / "m", "qwen2", dtype="float32")
    config = json.loads((src / "config.json").read_text())
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m.gguf"
    result = run("export", "gguf", src, "-o", out, "--type", "F16")
    assert result.exit_code == 2 and "yarn" in result.output
    assert not out.exists() and not leftovers(tmp_path)


def test_existing_output_needs_force(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    args = ["export", "gguf", tiny, "-o", out, "--type", "Q8_0"]
    assert run(*args).exit_code == 0
    first = out.read_bytes()
    result = run(*args[:-1], "Q4_0")
    assert result.exit_code == 2 and "--force" in result.output and out.read_bytes() == first
    assert run(*args[:-1], "Q4_0", "--force").exit_code == 0 and out.read_bytes() != first
    out.write_bytes(b"mine")  # not ours: even --force leaves it
    result = run(*args, "--force")
    assert result.exit_code == 2 and "not written by mlxedge" in result.output
    assert out.read_bytes() == b"mine"


def test_pre_tokenizer_is_detected_and_can_be_overridden(tiny, tmp_path):
    def pre(path) -> str:
        return gguf.GGUFReader(path).get_field("tokenizer.ggml.pre").contents()

    out = tmp_path / "a.gguf"
    assert run("export", "gguf", tiny, "-o", out, "--type", "Q8_0").exit_code == 0
    assert pre(out) == "gpt-2"  # the tiny models' tokenizer is GPT-2's byte-level scheme
    out = tmp_path / "b.gguf"
    args = ["export", "gguf", tiny, "-o", out, "--type", "Q8_0", "--pre-tokenizer"]
    assert run(*args, "llama-bpe").exit_code == 0 and pre(out) == "llama-bpe"
    result = run(*args, "no-such-scheme")
    assert result.exit_code == 2 and "llama-bpe" in result.output


@pytest.mark.parametrize("mix", ["Q4_K_M", "F16", "BF16"])
def test_row_blocks_give_the_same_file(tiny, tmp_path, monkeypatch, mix):
    """Large tensors are converted in blocks of rows (memory bounded by a block): same bytes."""
    from mlxedge import pipeline

    whole = tmp_path / "whole.gguf"
    assert run("export", "gguf", tiny, "-o", whole, "--type", mix).exit_code == 0
    monkeypatch.setattr(pipeline, "BLOCK_WEIGHTS", 256 * 7)  # 7 rows a block, uneven last
    blocks = tmp_path / "blocks.gguf"
    assert run("export", "gguf", tiny, "-o", blocks, "--type", mix).exit_code == 0
    assert whole.read_bytes() == blocks.read_bytes()


def test_mlx_float_tensors_keep_their_dtype(tiny, tmp_path):
    mlx_dir = tmp_path / "mlx"
    args = ["--bits", 4, "--embed-bits", 16, "--dtype", "bfloat16", "--recipe", "uniform"]
    assert run("quantize", tiny, "-o", mlx_dir, *args).exit_code == 0
    out = tmp_path / "m.gguf"
    assert run("export", "gguf", mlx_dir, "-o", out).exit_code == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == "BF16"


def test_reexporting_a_gguf_keeps_its_pre_tokenizer_and_warns(tiny, tmp_path):
    first = tmp_path / "a.gguf"
    args = ["--type", "Q8_0", "--pre-tokenizer", "llama-bpe"]
    assert run("export", "gguf", tiny, "-o", first, *args).exit_code == 0
    second = tmp_path / "b.gguf"
    result = run("export", "gguf", first, "-o", second, "--type", "Q4_0")
    assert result.exit_code == 0, result.output
    assert "already quantized (Q8_0)" in result.output
    assert gguf.GGUFReader(second).get_field("tokenizer.ggml.pre").contents() == "llama-bpe"


def test_existing_modelfile_fails_before_any_work(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    (tmp_path / "m.Modelfile").write_text("FROM mine\n")
    result = run("export", "gguf", tiny, "-o", out, "--type", "Q8_0", "--ollama")
    assert result.exit_code == 2 and "m.Modelfile" in result.output and "--force" in result.output
    assert not out.exists()
    (tmp_path / "m.Modelfile").unlink()
    args = ("export", "gguf", tiny, "-o", out, "--type", "Q8_0", "--ollama")
    assert run(*args).exit_code == 0
    assert (tmp_path / "m.Modelfile").read_text().startswith("# written by mlxedge\nFROM ./m.gguf")
    assert run(*args, "--force").exit_code == 0  # an earlier Modelfile of ours is replaced


def test_corrupt_tokenizer_json_is_named(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")
    (src / "tokenizer.json").write_text("{not json")
    out = tmp_path / "m.gguf"
    result = run("export", "gguf", src, "-o", out, "--type", "Q8_0")
    assert result.exit_code == 2 and "tokenizer.json" in result.output and "JSON" in result.output
    assert not out.exists() and not leftovers(tmp_path)


def test_values_beyond_float16_are_refused_for_f16(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")

    def enlarge(weights):
        weights["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e5

    edit_weights(src, enlarge)
    out = tmp_path / "m.gguf"
    result = run("export", "gguf", src, "-o", out, "--type", "F16")
    assert result.exit_code == 2 and "float16" in result.output and "BF16" in result.output
    assert not out.exists() and not leftovers(tmp_path)
    assert run("export", "gguf", src, "-o", out, "--type", "BF16").exit_code == 0


def test_inspect_names_the_file_type_and_tokenizer(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    assert run("export", "gguf", tiny, "-o", out, "--type", "Q3_K_M").exit_code == 0
    result = run("inspect", out)
    assert result.exit_code == 0
    assert "file_type: Q3_K_M (12)" in result.output and "pre_tokenizer: gpt-2" in result.output


def test_a_failed_modelfile_leaves_no_gguf_behind(tiny, tmp_path, monkeypatch):
    from mlxedge.formats.gguf import writer

    def broken(*args):
        raise RuntimeError("the Modelfile could not be written")

    monkeypatch.setattr(writer, "modelfile_text", broken)
    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError, match="Modelfile"):
        run("export", "gguf", tiny, "-o", out, "--type", "Q8_0", "--ollama")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither file, no partials
