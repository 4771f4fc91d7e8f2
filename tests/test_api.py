"""The public API: every stage reachable from `import mlxedge`, and the CLI's start stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tiny_models import make_tiny_model

import mlxedge


def test_the_pipeline_through_the_public_api(tmp_path):
    src = make_tiny_model(tmp_path / "tiny", "qwen2", dtype="float32")
    model = mlxedge.resolve(str(src))
    report = mlxedge.quantize(model, tmp_path / "q4", mlxedge.QuantOptions(bits=4, group_size=32))
    assert report.bits_per_weight < 8 and (tmp_path / "q4" / "config.json").is_file()
    gguf_report = mlxedge.export_gguf(model, tmp_path / "m.gguf", "Q8_0")
    assert gguf_report.mix == "Q8_0" and (tmp_path / "m.gguf").stat().st_size > 0
    artifacts = [mlxedge.resolve(str(tmp_path / "q4")), mlxedge.resolve(str(tmp_path / "m.gguf"))]
    text = mlxedge.load_text(None)
    rows = mlxedge.crosscheck(artifacts, model, text, ("reference",), ctx=64, max_windows=2)
    assert [r.artifact for r in rows] == ["q4", "m"] and all(r.passed for r in rows)
    assert np.isfinite([r.quality["kl_mean"] for r in rows]).all()
    with pytest.raises(AttributeError):
        mlxedge.no_such_stage  # noqa: B018


def test_importing_the_package_loads_no_numerics():
    heavy = "('numpy', 'mlx', 'gguf')"
    code = f"import sys, mlxedge; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
