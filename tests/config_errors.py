"""The check every architecture's config errors share: `mlxedge quantize` of a tiny model whose
config.json was edited fails with one clear error and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from tiny_models import make_tiny_model

from mlxedge.cli import main


def assert_quantize_refuses(tmp_path: Path, arch: str, edit: dict, message: str,
                            keep_nulls: bool = False) -> None:  # fmt: skip
    """Quantizing a tiny `arch` model with `edit` applied to its config exits with 2, naming
    `message` and config.json, without a traceback or an output folder. A None in `edit` removes
    the key, or is written as null with `keep_nulls` (null and absent differ for some keys)."""
    folder = make_tiny_model(tmp_path / "hf", arch, dtype="float32")
    config = json.loads((folder / "config.json").read_text()) | edit
    if not keep_nulls:
        config = {k: v for k, v in config.items() if not (k in edit and edit[k] is None)}
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["quantize", str(folder), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "config.json" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
