"""The quality gate is set from the model and the artifact's own storage (its plain twin): a
damaged artifact fails and the report names the damaged tensor; sound artifacts pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import save_file
from tiny_models import make_tiny_model

from mlxedge.cli import main
from mlxedge.formats.gguf.reader import open_gguf
from mlxedge.twin import GATE_FLOOR, GATE_MULTIPLE, diagnose


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def crosscheck(artifact, reference, *extra) -> tuple[int, list[dict]]:
    result = run("crosscheck", artifact, "--reference", reference, "--windows", 2, "--ctx", 128,
                 "--backends", "reference", "--json", *extra)  # fmt: skip
    return result.exit_code, json.loads(result.output)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", dtype="float32")


def scale_tensor(folder: Path, name: str, factor: float) -> None:
    (shard,) = [p for p in folder.glob("*.safetensors") if name in safe_open(p, "numpy").keys()]
    with safe_open(shard, "numpy") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name] * np.float32(factor)
    save_file(tensors, shard, metadata=metadata)


@pytest.mark.parametrize("method", ["rtn", "mse", "mse-zero"])
def test_sound_mlx_folders_pass_against_their_twin(tiny, tmp_path, method):
    out = tmp_path / "q4"
    assert run("quantize", tiny, "-o", out, "--method", method).exit_code == 0
    code, (row,) = crosscheck(out, tiny)
    assert code == 0 and row["passed"], row
    assert row["twin_kl"] > 0 and row["ceiling"].startswith(f"{GATE_MULTIPLE:g} x plain twin")
    assert row["max_kl"] == pytest.approx(GATE_MULTIPLE * row["twin_kl"] + GATE_FLOOR)
    if method == "rtn":  # the twin is the artifact itself
        assert row["quality"]["kl_mean"] == pytest.approx(row["twin_kl"], rel=1e-6)


def test_a_doubled_down_proj_scale_fails_and_is_named(tiny, tmp_path):
    out = tmp_path / "q4"
    assert run("quantize", tiny, "-o", out).exit_code == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    scale_tensor(damaged, "model.layers.1.mlp.down_proj.scales", 2.0)
    code, (row,) = crosscheck(damaged, tiny)
    assert code == 1 and row["fidelity_ok"] and not row["quality_ok"], row
    assert row["quality"]["kl_mean"] > row["max_kl"]
    assert row["suspects"][0]["name"] == "model.layers.1.mlp.down_proj.weight"
    result = run("crosscheck", damaged, "--reference", tiny, "--windows", 2, "--ctx", 128,
                 "--backends", "reference")  # fmt: skip
    assert (
        "model.layers.1.mlp.down_proj.weight" in result.output and "FAIL quality" in result.output
    )


def test_a_gguf_with_doubled_block_scales_fails_and_is_named(tiny, tmp_path):
    path = tmp_path / "tiny-q4_0.gguf"
    assert run("export", "gguf", tiny, "--type", "Q4_0", "-o", path).exit_code == 0
    code, (row,) = crosscheck(path, tiny)
    assert code == 0 and row["passed"]  # its twin is llama.cpp's quantizer: the same bytes
    assert row["quality"]["kl_mean"] == pytest.approx(row["twin_kl"], rel=1e-6)
    tensor = open_gguf(path).tensors["blk.0.ffn_down.weight"]
    assert tensor.type.name == "Q4_0"
    data = bytearray(path.read_bytes())
    blocks = np.frombuffer(data, np.uint8, tensor.n_bytes, tensor.offset).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16) * np.float16(2)  # each block's scale, doubled
    blocks = blocks.copy()
    blocks[:, :2] = d.view(np.uint8).reshape(-1, 2)
    data[tensor.offset : tensor.offset + tensor.n_bytes] = blocks.tobytes()
    path.write_bytes(bytes(data))
    code, (row,) = crosscheck(path, tiny)
    assert code == 1 and not row["quality_ok"], row
    assert row["suspects"][0]["name"] == "model.layers.0.mlp.down_proj.weight"


def test_an_explicit_ceiling_replaces_the_twin(tiny, tmp_path):
    out = tmp_path / "q4"
    assert run("quantize", tiny, "-o", out).exit_code == 0
    code, (row,) = crosscheck(out, tiny, "--max-kl", "1e-9")
    assert code == 1 and row["max_kl"] == 1e-9 and row["ceiling"] == "--max-kl"
    assert row["twin_kl"] is None


def test_diagnosis_ranks_by_error_relative_to_the_twin():
    rng = np.random.default_rng(0)
    original = {n: rng.standard_normal((8, 32)).astype(np.float32) for n in "abc"}
    twin = {n: w + np.float32(0.01) for n, w in original.items()}
    artifact = dict(twin)
    artifact["b"] = original["b"] + np.float32(0.05)  # 25 times the twin's squared error
    artifact["c"] = original["c"] + np.float32(0.012)  # 1.44 times: not named
    (suspect,) = diagnose(original, artifact, twin)
    assert suspect.name == "b" and suspect.ratio == pytest.approx(25, rel=1e-3)


@pytest.mark.slow
def test_smollm2_with_one_o_proj_scaled_up_fails(tmp_path):
    out = tmp_path / "q4"
    assert run("quantize", "smollm2", "--dtype", "float32", "-o", out).exit_code == 0
    code, (row,) = crosscheck(out, "smollm2")
    assert code == 0 and row["passed"], row
    scale_tensor(out, "model.layers.10.self_attn.o_proj.scales", 2.0)
    code, (row,) = crosscheck(out, "smollm2")
    assert code == 1 and not row["quality_ok"], row
    assert row["suspects"][0]["name"] == "model.layers.10.self_attn.o_proj.weight"
