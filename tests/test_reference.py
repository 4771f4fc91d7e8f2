"""The numpy reference forward pass against mlx-lm's model classes."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model
from tiny_models import ARCH_CASES, ARCH_IDS, llama_1b_config, make_tiny_model

from mlxedge.archs import arch_for
from mlxedge.cli import main
from mlxedge.formats.hf import HFCheckpoint
from mlxedge.runtime.reference import ReferenceModel
from mlxedge.source import resolve

TOLERANCE = 1e-4  # max |logit difference| in float32 (issue 3)


def mlx_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    model, _ = load_model(folder)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(ids.astype(np.int32))[None])[0].astype(mx.float32))


def tiny(tmp_path: Path, arch: str, tied: bool) -> Path:
    # qwen3 with a head_dim other than hidden // heads, as Qwen3-0.6B has.
    head_dim = 32 if arch == "qwen3" else None
    return make_tiny_model(tmp_path / arch, arch, tied=tied, dtype="float32", head_dim=head_dim)


def ids_for(config: dict, n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config["vocab_size"], n)


@pytest.mark.parametrize("arch,tied", ARCH_CASES, ids=ARCH_IDS)
def test_reference_equals_mlx_lm(tmp_path, arch, tied):
    folder = tiny(tmp_path, arch, tied)
    config = json.loads((folder / "config.json").read_text())
    ref = ReferenceModel.from_source(config, HFCheckpoint.from_folder(folder))
    ids = ids_for(config)
    ours, theirs = ref.logits(ids), mlx_logits(folder, ids)
    assert ours.shape == theirs.shape == (len(ids), config["vocab_size"])
    assert np.abs(ours - theirs).max() <= TOLERANCE
    # `first` skips the head for context positions but changes nothing else. Not bit for bit:
    # the head is then an 8-row GEMM instead of a 48-row one, and BLAS picks its kernel (and its
    # summation order) by shape and CPU. A wrong offset would move logits by O(1), not 1e-6.
    np.testing.assert_allclose(ref.logits(ids, first=40), ours[40:], rtol=0, atol=1e-5)


def test_the_comparison_can_fail(tmp_path):
    # A reference with a wrong rotary theta must fall outside the tolerance, or the test above
    # would prove nothing about rotary embeddings.
    folder = tiny(tmp_path, "llama", True)
    config = json.loads((folder / "config.json").read_text())
    wrong = ReferenceModel.from_source(
        config | {"rope_theta": 10000.0}, HFCheckpoint.from_folder(folder)
    )
    ids = ids_for(config)
    assert np.abs(wrong.logits(ids) - mlx_logits(folder, ids)).max() > 10 * TOLERANCE


def test_llama3_rope_scaling_matches_mlx_lm():
    from mlx_lm.models.rope_utils import Llama3RoPE

    config = llama_1b_config()
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope = Llama3RoPE(head_dim, base=config["rope_theta"], scaling_config=config["rope_scaling"])
    theirs = 1.0 / np.array(rope._freqs)
    ours = arch_for(config).spec.inv_freq()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert not np.allclose(ours, arch_for(config | {"rope_scaling": None}).spec.inv_freq())


def test_unknown_rope_scaling_is_refused():
    from mlxedge.errors import MlxedgeError

    config = llama_1b_config() | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(MlxedgeError, match="yarn"):
        arch_for(config).spec.inv_freq()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reference_runs_a_quantized_mlx_folder_like_mlx_lm(tmp_path, arch):
    folder = tiny(tmp_path, arch, tied=False)
    out = tmp_path / "q"
    args = [
        "quantize",
        str(folder),
        "-o",
        str(out),
        "--bits",
        "4",
        "--group-size",
        "32",
        "--dtype",
        "float32",
    ]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    model = resolve(str(out))
    assert model.kind == "mlx" and model.bits == 4
    ref = ReferenceModel.from_source(model.config, model.weights)
    ids = ids_for(model.config)
    assert np.abs(ref.logits(ids) - mlx_logits(out, ids)).max() <= TOLERANCE
