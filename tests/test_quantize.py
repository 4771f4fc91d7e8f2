"""`mlxedge quantize` end to end: every architecture, recipes, determinism, and bad input."""

from __future__ import annotations

import errno
import json
import math
import re
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm import generate, load
from tiny_models import ARCH_CASES, ARCH_IDS, ARCHS, edit_weights, make_tiny_model

from mlxedge.cli import main
from mlxedge.formats import safetensors
from mlxedge.formats.hf import HFCheckpoint
from mlxedge.quant.recipes import QuantOptions, more_bits, uses_more_bits


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        (arch, tied): make_tiny_model(root / f"{arch}-{tied}", arch, tied=tied, dtype="bfloat16")
        for arch, tied in ARCH_CASES
    }


@pytest.mark.parametrize("arch,tied", ARCH_CASES, ids=ARCH_IDS)
def test_every_architecture_quantizes_loads_and_generates(models, tmp_path, arch, tied):
    out = tmp_path / "q"
    result = run(
        "quantize", models[arch, tied], "-o", out, "--bits", 4, "--group-size", 32,
        "--recipe", "uniform", "--method", "rtn",  # what mx.quantize alone makes, checked below
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["tie_word_embeddings"] is tied
    model, tokenizer = load(str(out))
    o_proj = model.model.layers[0].self_attn.o_proj  # every architecture has one
    assert isinstance(o_proj, nn.QuantizedLinear) and o_proj.bits == 4
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    if not tied:
        assert isinstance(model.lm_head, nn.QuantizedLinear)
    # the stored codes are what mx.quantize makes of the source weight
    src = mx.load(str(models[arch, tied] / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    expect, _, _ = mx.quantize(src[f"{name}.weight"], group_size=32, bits=4, stream=mx.cpu)
    got = mx.load(str(out / "model.safetensors"))[f"{name}.weight"]
    assert mx.array_equal(expect, got).item()
    text = generate(model, tokenizer, prompt="hello", max_tokens=4)
    assert isinstance(text, str) and len(tokenizer.encode(text, add_special_tokens=False)) >= 1


def test_mixed_recipe_writes_per_layer_config_that_mlx_lm_applies(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", tied=True, layers=8, dtype="float32")
    out = tmp_path / "q"
    result = run("quantize", src, "-o", out, "--bits", 3, "--recipe", "mixed", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    quant = json.loads((out / "config.json").read_text())["quantization"]
    boosted = [i for i in range(8) if uses_more_bits(i, 8)]
    assert boosted == [0, 3, 6, 7]  # i < 1, i >= 7, (i - 1) % 3 == 2
    for i in range(8):
        for proj in ("self_attn.v_proj", "mlp.down_proj"):
            key = f"model.layers.{i}.{proj}"
            assert (key in quant) == (i in boosted)
        assert f"model.layers.{i}.self_attn.q_proj" not in quant
    # the tied embedding is the output head: it gets the head's bits too
    assert quant["model.embed_tokens"] == {"group_size": 64, "bits": 5, "mode": "affine"}
    model, _ = load(str(out))
    assert model.model.layers[3].self_attn.v_proj.bits == 5
    assert model.model.layers[2].self_attn.v_proj.bits == 3
    assert model.model.embed_tokens.bits == 5


def test_more_bits_rule():
    assert [more_bits(b) for b in (2, 3, 4, 5, 6, 8)] == [4, 5, 6, 8, 8, 8]


def test_overrides_last_match_wins_and_keep_float(tmp_path):
    src = make_tiny_model(tmp_path / "m", "qwen2", tied=True, dtype="float32")
    out = tmp_path / "q"
    result = run(
        "quantize", src, "-o", out, "--dtype", "float32",
        "--override", r"model\.layers\.\d+\.mlp\..*=8",
        "--override", r"model\.layers\.1\.mlp\.up_proj=2:32",
        "--override", r"model\.layers\.0\.self_attn\.o_proj=16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["model.layers.0.mlp.up_proj"]["bits"] == 8
    assert quant["model.layers.1.mlp.up_proj"] == {"group_size": 32, "bits": 2, "mode": "affine"}
    weights = mx.load(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.o_proj.scales" not in weights
    assert weights["model.layers.0.self_attn.o_proj.weight"].dtype == mx.float32
    model, _ = load(str(out))
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)
    assert model.model.layers[1].mlp.up_proj.bits == 2


def test_bits_per_weight_counts_every_byte(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", tied=True, dtype="bfloat16")
    out = tmp_path / "q"
    assert run("quantize", src, "-o", out).exit_code == 0
    params = sum(math.prod(i.shape) for i in HFCheckpoint.from_folder(src).infos())
    written = sum(math.prod(i.shape) * np.dtype(i.dtype).itemsize
                  for i in HFCheckpoint.from_folder(out).infos())  # fmt: skip
    card = (out / "README.md").read_text()
    assert f"| bits per weight | {written * 8 / params:.3f} |" in card


def test_indivisible_tensors_stay_float_and_are_reported(tmp_path):
    # hidden 96 is not a multiple of 64: every projection reading the hidden state stays float
    src = make_tiny_model(tmp_path / "m", "llama", hidden=96, heads=4, kv_heads=2, dtype="float32")
    out = tmp_path / "q"
    result = run("quantize", src, "-o", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "kept in float" in result.output and "not a multiple of group size 64" in result.output
    weights = mx.load(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.scales" in weights  # 128 wide: quantized
    assert "model.layers.0.self_attn.q_proj.scales" not in weights
    load(str(out))


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_rerun_is_byte_identical(tmp_path, method):
    src = make_tiny_model(tmp_path / "m", "qwen3", tied=False, dtype="bfloat16")
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run("quantize", src, "-o", out, "--method", method).exit_code == 0
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert "README.md" in files and "tokenizer.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert str(tmp_path) not in (a / "README.md").read_text()


def test_mse_lowers_the_reported_error(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", tied=True, dtype="bfloat16")
    errs = {}
    for method in ("rtn", "mse"):
        out = tmp_path / method
        assert run("quantize", src, "-o", out, "--method", method, "--bits", 3).exit_code == 0
        card = (out / "README.md").read_text()
        errs[method] = float(card.split("| mean relative RMS error | ")[1].split(" ")[0])
    assert errs["mse"] < errs["rtn"]


# --- bad input: one clear error naming the file, exit code 2, nothing left behind -------------


def _corrupt(src: Path, how: str) -> Path:
    st = src / "model.safetensors"
    data = st.read_bytes()
    if how == "truncated":
        st.write_bytes(data[: len(data) // 2])
    elif how == "header-claims-more":
        st.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    elif how == "garbage-header":
        (n,) = struct.unpack("<Q", data[:8])
        st.write_bytes(data[:8] + b"\xff" * n + data[8 + n :])
    return st


@pytest.mark.parametrize("how", ["truncated", "header-claims-more", "garbage-header"])
def test_corrupt_safetensors(tmp_path, how):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")
    bad = _corrupt(src, how)
    out = tmp_path / "out"
    result = run("quantize", src, "-o", out)
    assert result.exit_code == 2
    assert str(bad) in result.output and "error:" in result.output
    assert not out.exists() and not _leftovers(tmp_path)


def test_nan_weight(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")

    def poison(weights):
        weights["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan

    edit_weights(src, poison)
    out = tmp_path / "out"
    result = run("quantize", src, "-o", out)
    assert result.exit_code == 2
    assert "model.layers.1.mlp.up_proj.weight" in result.output and "NaN" in result.output
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--bits", "7"], "7 bits is not supported"),
        (["--group-size", "48"], "group size 48 is not supported"),
        (["--override", "lm_head"], "REGEX=BITS[:GROUP]"),
        (["--override", "(=4"], "bad regular expression"),
        (["--embed-bits", "9"], "9 bits is not supported"),
    ],
)
def test_invalid_options(tmp_path, args, expect):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")
    out = tmp_path / "out"
    result = run("quantize", src, "-o", out, *args)
    assert result.exit_code == 2 and expect in result.output
    assert not out.exists()


def test_missing_folder_and_config(tmp_path):
    result = run("quantize", tmp_path / "nowhere", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "nowhere" in result.output
    (tmp_path / "empty").mkdir()
    result = run("quantize", tmp_path / "empty", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "no config.json" in result.output
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(config))
    result = run("quantize", src, "-o", tmp_path / "out")
    assert result.exit_code == 2
    from mlxedge.archs import ARCHITECTURES, WRAPPERS

    supported = ", ".join(sorted([*ARCHITECTURES, *WRAPPERS]))
    assert "gpt_neox" in result.output and supported in result.output
    assert str(src / "config.json") in result.output


def test_already_quantized_source_is_refused(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")
    assert run("quantize", src, "-o", tmp_path / "q").exit_code == 0
    result = run("quantize", tmp_path / "q", "-o", tmp_path / "qq")
    assert result.exit_code == 2 and "already-quantized MLX folder" in result.output
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    result = run("quantize", src, "-o", tmp_path / "qq")
    assert result.exit_code == 2 and "already quantized (gptq)" in result.output
    assert not (tmp_path / "qq").exists()


def test_existing_output_needs_force(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")
    out = tmp_path / "out"
    assert run("quantize", src, "-o", out, "--bits", "8").exit_code == 0
    (out / "extra.txt").write_text("added later")
    result = run("quantize", src, "-o", out)
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "extra.txt").read_text() == "added later"
    assert run("quantize", src, "-o", out, "--force").exit_code == 0  # ours: replaced
    assert not (out / "extra.txt").exists() and (out / "config.json").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    result = run("quantize", src, "-o", mine, "--force")
    assert result.exit_code == 2 and "not written by mlxedge" in result.output
    assert (mine / "keep.txt").read_text() == "mine"


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    src = make_tiny_model(tmp_path / "m", "llama", dtype="float32")
    real_write = safetensors.SafetensorsWriter.write
    calls = {"n": 0}

    def write(self, name, array):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, array)

    monkeypatch.setattr(safetensors.SafetensorsWriter, "write", write)
    out = tmp_path / "out"
    result = run("quantize", src, "-o", out)
    assert result.exit_code == 2 and "no space left" in result.output.lower()
    assert not out.exists() and not _leftovers(tmp_path)


def test_options_validate_on_construction():
    with pytest.raises(Exception, match="recipe"):
        QuantOptions(recipe="q4_k_m")


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_row_blocks_give_identical_bytes(tmp_path, monkeypatch, method):
    """Large tensors are quantized in blocks of rows; the bytes must not depend on it."""
    from mlxedge import pipeline

    src = make_tiny_model(tmp_path / "m", "llama", tied=False, dtype="bfloat16")
    whole, blocks = tmp_path / "whole", tmp_path / "blocks"
    assert run("quantize", src, "-o", whole, "--method", method).exit_code == 0
    monkeypatch.setattr(pipeline, "BLOCK_WEIGHTS", 64 * 7)  # 7 rows a block: uneven last block
    assert run("quantize", src, "-o", blocks, "--method", method).exit_code == 0
    for name in ("model.safetensors", "config.json"):
        assert (whole / name).read_bytes() == (blocks / name).read_bytes(), name
    # The card's error figures are sums taken block by block in one run and over the whole
    # tensor in the other (another summation order): equal to the 4 digits printed, give or
    # take the last one; everything else in the card is the same text.
    number = re.compile(r"\d+\.\d{4}\b")
    cards = [(out / "README.md").read_text() for out in (whole, blocks)]
    assert number.sub("#", cards[0]) == number.sub("#", cards[1])
    figures = [[float(x) for x in number.findall(card)] for card in cards]
    assert len(figures[0]) == len(figures[1]) > 0
    assert np.allclose(figures[0], figures[1], rtol=0, atol=1.5e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_s_mlx_folder_passes_crosscheck_on_reference_and_mlx(
    models, tmp_path, arch
):
    out = tmp_path / "q"
    assert run("quantize", models[arch, True], "-o", out, "--bits", 4, "--group-size", 32,
               "--method", "rtn").exit_code == 0  # fmt: skip
    result = run("crosscheck", out, "--reference", models[arch, True], "--backends",
                 "reference,mlx", "--windows", 1, "--ctx", 32, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["backend"] for r in rows] == ["reference", "mlx"]
    assert all(r["skipped"] is None and r["passed"] and r["fidelity_ok"] for r in rows)
