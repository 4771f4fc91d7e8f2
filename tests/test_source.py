"""The one loader: every kind of MODEL becomes one `Model` with the right kind, path and parts."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny_models import hub_cache_snapshot, make_tiny_model

from mlxedge import source
from mlxedge.cli import main
from mlxedge.errors import MlxedgeError
from mlxedge.runtime import BackendUnavailable, make_backend
from mlxedge.source import resolve


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", dtype="float32")


def test_a_hub_id_is_its_snapshot_folder_not_the_builtin_model(tiny, tmp_path, monkeypatch):
    snap = hub_cache_snapshot(tmp_path / "hub", tiny)
    monkeypatch.setattr(source, "_download", lambda repo, revision: snap)
    model = resolve("org/tiny")
    assert (model.kind, model.path, model.name, model.base_model) == ("hf", snap, "tiny",
                                                                      "org/tiny")  # fmt: skip
    assert model.folder == snap and model.gguf is None
    with pytest.raises(BackendUnavailable, match="runs GGUF files"):
        make_backend("llamacpp", model)  # not SmolLM2's file, evaluated in its place
    result = CliRunner().invoke(
        main,
        [
            "crosscheck",
            "org/tiny",
            "--reference",
            "org/tiny",
            "--backends",
            "llamacpp",
            "--ctx",
            "64",
            "--json",
        ],
    )
    rows = json.loads(result.output)
    assert rows[0]["skipped"] and "runs GGUF files" in rows[0]["skipped"]


def test_every_kind_of_input_is_one_model(tiny, tmp_path):
    from mlxedge.default_model import default_model_path

    run = CliRunner().invoke
    assert run(main, ["quantize", str(tiny), "-o", str(tmp_path / "q")]).exit_code == 0
    gguf_file = tmp_path / "t.gguf"
    assert (
        run(main, ["export", "gguf", str(tiny), "-o", str(gguf_file), "--type", "Q8_0"]).exit_code
        == 0
    )
    kinds = {
        "hf": (resolve(str(tiny)), tiny, None),
        "mlx": (resolve(str(tmp_path / "q")), tmp_path / "q", 4),
        "gguf": (resolve(str(gguf_file)), gguf_file, 8),
        "builtin": (resolve("smollm2"), default_model_path(), None),
    }
    for kind, (model, path, bits) in kinds.items():
        assert (model.kind, model.path, model.bits) == (kind, path, bits), kind
        assert model.arch.spec.n_layers == model.config["num_hidden_layers"]
        assert model.tokenizer.raw is not None and model.tokenizer.json["model"]
        assert model.weights.infos()
    assert kinds["mlx"][0].quantization["bits"] == 4
    assert kinds["hf"][0].quantization is None


def test_quantizing_an_mlx_folder_is_refused(tiny, tmp_path):
    run = CliRunner().invoke
    assert run(main, ["quantize", str(tiny), "-o", str(tmp_path / "q")]).exit_code == 0
    with pytest.raises(MlxedgeError, match="already-quantized MLX folder"):
        from mlxedge.formats.mlx import quantize_to_mlx
        from mlxedge.quant.recipes import QuantOptions

        quantize_to_mlx(resolve(str(tmp_path / "q")), tmp_path / "again", QuantOptions())
    assert not (tmp_path / "again").exists()
