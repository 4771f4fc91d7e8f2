"""Metrics, texts, `mlxedge eval` and `mlxedge crosscheck` (gates and exit codes)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import save_file
from tiny_models import make_tiny_model

from mlxedge.cli import main
from mlxedge.errors import MlxedgeError
from mlxedge.metrics import TokenStats, log_softmax
from mlxedge.texts import DEFAULT_TEXT, load_text, windows
from mlxedge.twin import GATE_FLOOR, GATE_MULTIPLE, backend_floor


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# --- metrics ------------------------------------------------------------------------------------


def test_identical_predictions_agree_exactly():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20, 50)).astype(np.float32)
    targets = rng.integers(0, 50, 20)
    stats = TokenStats()
    stats.add(logits, targets, logits.copy())
    s = stats.summary()
    assert s["kl_mean"] == 0 and s["kl_max"] == 0 and s["top1"] == 1 and s["max_abs_logit"] == 0
    assert s["ppl"] == pytest.approx(s["ref_ppl"])


def test_metrics_against_hand_computed_values():
    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    cand = np.log(np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]))
    targets = np.array([0, 2])
    stats = TokenStats()
    stats.add(cand, targets, ref)
    s = stats.summary()
    kl0 = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    kl1 = 0.1 * math.log(0.1 / 0.2) * 2 + 0.8 * math.log(0.8 / 0.6)
    assert s["kl_mean"] == pytest.approx((kl0 + kl1) / 2)
    assert s["kl_max"] == pytest.approx(max(kl0, kl1))
    assert s["ppl"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.6)) / 2))
    assert s["ref_ppl"] == pytest.approx(math.exp(-(math.log(0.7) + math.log(0.8)) / 2))
    assert s["top1"] == 1.0


def test_uniform_prediction_has_the_vocabulary_as_perplexity():
    stats = TokenStats()
    stats.add(np.zeros((7, 64), np.float32), np.arange(7))
    assert stats.summary()["ppl"] == pytest.approx(64)
    assert np.allclose(np.exp(log_softmax(np.zeros((1, 64)))), 1 / 64)


# --- texts --------------------------------------------------------------------------------------


def test_default_text_exists_and_is_named():
    text = load_text(None)
    assert "Python" in text.name and len(text.content) > 100_000
    assert load_text(DEFAULT_TEXT) == text


def test_windows_follow_llama_cpp():
    ids = list(range(1000, 1000 + 2600))
    w = windows(ids, 512, bos_id=7, max_windows=None, text_name="t")
    assert w.shape == (5, 512)  # whole windows only
    assert (w[:, 0] == 7).all() and w[1, 1] == 1000 + 513
    assert windows(ids, 512, None, 2, "t").shape == (2, 512)
    with pytest.raises(MlxedgeError, match="fewer than two windows"):
        windows(ids[:1000], 512, None, None, "t")


def test_bad_text_files(tmp_path):
    with pytest.raises(MlxedgeError, match="no such text file"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(MlxedgeError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MlxedgeError, match="UTF-8"):
        load_text(str(tmp_path / "latin1.txt"))


# --- eval on tiny models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", dtype="float32")


def test_eval_of_a_model_against_itself(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["hello world, the quick brown fox"] * 400))
    result = run("eval", tiny, "--reference", tiny, "--text", text, "--ctx", 64, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kl_mean"] == 0 and data["top1"] == 1 and data["max_abs_logit"] == 0
    assert data["protocol"].startswith("8 windows of 64, predictions 32-62")
    assert data["tokens"] == 8 * 31


def test_eval_bad_inputs_each_get_one_error(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    result = run("eval", tiny, "--text", short)
    assert result.exit_code == 2 and "fewer than two windows of 512" in result.output
    assert str(short) in result.output
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run("eval", tiny, "--text", empty)
    assert result.exit_code == 2 and "the text is empty" in result.output
    result = run("eval", tiny, "--reference", "smollm2")
    assert result.exit_code == 2 and "another vocabulary" in result.output


# --- SmolLM2: reference vs mlx-lm, crosscheck gates ----------------------------------------------


@pytest.fixture(scope="module")
def smollm2_q4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("x") / "smollm2-q4"
    # float32 scales: MLX's CPU backend is fast only in float32
    result = run(
        "quantize", "smollm2", "--bits", 4, "--group-size", 64, "--dtype", "float32", "-o", out
    )
    assert result.exit_code == 0, result.output
    return out


def crosscheck_rows(*args, backends: str = "reference,mlx") -> tuple[int, list[dict]]:
    result = run("crosscheck", *args, "--reference", "smollm2", "--windows", 1, "--json",
                 "--backends", backends)  # fmt: skip
    return result.exit_code, json.loads(result.output)


@pytest.mark.slow
def test_crosscheck_passes_on_a_sound_artifact(smollm2_q4):
    code, rows = crosscheck_rows(smollm2_q4, backends="reference,mlx,llamacpp")
    assert code == 0
    assert [r["backend"] for r in rows] == ["reference", "mlx", "llamacpp"]
    assert "runs GGUF files" in rows.pop()["skipped"]  # llama.cpp cannot run an MLX folder
    for r in rows:
        assert r["skipped"] is None and r["passed"] and r["quality_ok"] and r["fidelity_ok"]
        from mlxedge.runtime.mlx_runner import FLOAT32_TOLERANCE  # MLX's CPU backend

        floor = backend_floor(None if r["backend"] == "reference" else FLOAT32_TOLERANCE)
        assert r["max_kl"] == pytest.approx(GATE_MULTIPLE * r["twin_kl"] + floor)
        assert 0 < r["quality"]["kl_mean"] < r["max_kl"]
    mlx = rows[1]
    assert mlx["fidelity"]["max_abs_logit"] <= 1e-2 and mlx["quality"]["tokens"] == 63


@pytest.mark.slow
def test_crosscheck_fails_a_damaged_artifact(smollm2_q4, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(smollm2_q4, damaged)
    name = "model.layers.10.mlp.down_proj.scales"
    (shard,) = [p for p in damaged.glob("*.safetensors") if name in safe_open(p, "numpy").keys()]
    with safe_open(shard, "numpy") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name] * 2  # float32 scales: the artifact was written in float32
    save_file(tensors, shard, metadata=metadata)
    code, rows = crosscheck_rows(damaged, backends="reference")
    assert code == 1
    (row,) = rows
    assert row["fidelity_ok"] and not row["quality_ok"] and not row["passed"]
    assert row["quality"]["kl_mean"] > row["max_kl"]
    assert row["suspects"][0]["name"] == "model.layers.10.mlp.down_proj.weight"


@pytest.mark.slow
def test_reference_perplexity_equals_mlx_lm(tmp_path):
    """SmolLM2 (float32): reference vs mlx-lm perplexity within 0.5% on two windows."""
    from mlxedge.harness import evaluate
    from mlxedge.source import resolve

    folder = tmp_path / "smollm2-f32"
    assert run("import", _smollm2_gguf(), "-o", folder, "--dtype", "float32").exit_code == 0
    model = resolve(str(folder))
    text = load_text(None)
    ref = evaluate(model, None, text, 512, 2, "reference")
    from mlxedge.runtime import make_backend
    from mlxedge.runtime.mlx_runner import MLXBackend

    backend = make_backend("mlx", model)
    assert isinstance(backend, MLXBackend)
    backend.token_budget = None  # the whole protocol on MLX's CPU backend: about a minute a window
    from mlxedge.harness import bos_id, full_protocol, score
    from mlxedge.texts import tokenize

    ids = tokenize(text, model.tokenizer)
    protocol = full_protocol(ids, 512, bos_id(model), 2, text)
    theirs = score(backend, protocol).summary()
    assert ref["tokens"] == theirs["tokens"] == 2 * 255
    assert abs(ref["ppl"] / theirs["ppl"] - 1) < 0.005


def _smollm2_gguf() -> Path:
    from mlxedge.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("g") / "tiny.gguf"
    assert run("export", "gguf", tiny, "-o", out, "--type", "F32").exit_code == 0
    return out


def tiny_crosscheck(artifact, reference, backends: str, *extra) -> tuple[int, list[dict], str]:
    result = run("crosscheck", artifact, "--reference", reference, "--windows", 1, "--ctx", 128,
                 "--backends", backends, *extra)  # fmt: skip
    rows = json.loads(result.output) if "--json" in extra else []
    return result.exit_code, rows, result.output


def test_a_backend_that_cannot_run_is_skipped_with_its_reason(tiny_gguf):
    # mlx-lm loads folders, not GGUF files. Against itself the file passes: the reference row is
    # exact (KL 0), the mlx row is skipped, and skipping does not fail the run.
    code, rows, _ = tiny_crosscheck(tiny_gguf, tiny_gguf, "reference,mlx", "--json")
    assert code == 0
    ref, mlx = rows
    assert ref["passed"] and ref["quality"]["kl_mean"] == 0 and ref["quality"]["top1"] == 1
    # Its plain twin is itself (float32 stays float32): the ceiling is the floor alone.
    assert ref["twin_kl"] == 0 and ref["max_kl"] == GATE_FLOOR
    assert mlx["skipped"] and "loads model folders" in mlx["skipped"]


def test_strict_fails_when_a_backend_is_skipped(tiny_gguf):
    code, _, output = tiny_crosscheck(tiny_gguf, tiny_gguf, "reference,mlx", "--strict")
    assert code == 1 and "--strict" in output
    code, _, output = tiny_crosscheck(tiny_gguf, tiny_gguf, "reference", "--strict")
    assert code == 0, output


def test_crosscheck_memory_does_not_grow_with_the_number_of_windows(tmp_path):
    import tracemalloc

    from mlxedge.harness import crosscheck
    from mlxedge.source import resolve

    vocab = 32768  # a window of 64 tokens is 8 MiB of float32 logits per model
    folder = make_tiny_model(tmp_path / "wide", "llama", dtype="float32", vocab=vocab)
    model, text = resolve(str(folder)), load_text(None)

    def peak(windows: int) -> int:
        tracemalloc.start()
        try:
            (row,) = crosscheck([model], model, text, ("reference",), ctx=64, max_windows=windows)
            assert row.quality["tokens"] == windows * 31
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    window = 64 * vocab * 4
    # Keeping every window's logits of the original and of the artifact would add two windows
    # of logits per window; scored window by window, twelve more windows add next to nothing.
    assert peak(16) - peak(4) < 2 * window
