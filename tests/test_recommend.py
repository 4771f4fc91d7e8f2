"""`mlxedge recommend`: exact sizes, budget, ranking, bad input."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from tiny_models import ARCHS, llama_1b_config, make_tiny_model

from mlxedge.cli import main
from mlxedge.errors import MlxedgeError
from mlxedge.formats.hf import HFCheckpoint
from mlxedge.quant.recipes import QuantOptions
from mlxedge.recommend import (
    kv_cache_bytes,
    parse_memory,
    quality_table,
    recommend,
    weights_bytes,
)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_memory_amounts():
    assert parse_memory("8GB") == parse_memory("8GiB") == parse_memory("8g") == 8 * 2**30
    assert parse_memory("6000MB") == 6000 * 2**20
    assert parse_memory("1.5 GB") == int(1.5 * 2**30)
    with pytest.raises(MlxedgeError, match="8GB"):
        parse_memory("lots")


@pytest.mark.parametrize("recipe", ["uniform", "mixed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_planned_size_is_the_written_size(tmp_path, arch, recipe):
    folder = make_tiny_model(tmp_path / "m", arch, tied=arch != "llama", dtype="bfloat16")
    out = tmp_path / "q"
    result = run("quantize", folder, "-o", out, "--bits", 3, "--group-size", 32, "--recipe", recipe)
    assert result.exit_code == 0, result.output
    ckpt = HFCheckpoint.from_folder(out)
    written = sum(
        math.prod(i.shape) * (2 if i.dtype in ("bfloat16", "float16") else 4) for i in ckpt.infos()
    )
    config = json.loads((folder / "config.json").read_text())
    assert weights_bytes(config, QuantOptions(bits=3, group_size=32, recipe=recipe)) == written


def test_kv_cache_of_llama_1b():
    # 16 layers x K and V x 8 KV heads x 64 dims x 4096 tokens x 2 bytes = 128 MiB
    assert kv_cache_bytes(llama_1b_config(), 4096) == 128 * 2**20


def test_recommendations_fit_and_are_ranked():
    config = llama_1b_config()
    budget = parse_memory("1GB")
    choices = recommend(config, budget, 4096)
    assert choices, "a 1B model fits 1 GiB at 4 bits or below"
    assert all(c.total_bytes <= budget for c in choices)
    kls = [c.kl for c in choices if c.kl is not None]
    assert kls == sorted(kls)
    assert {c.bits for c in choices} <= {2, 3, 4, 5, 6}  # 8 bits needs ~1.2 GiB
    assert any(not c.measured for c in choices if c.bits in (5, 6))
    measured = {
        (r["bits"], r["group_size"], r["recipe"], r["method"]) for r in quality_table()["settings"]
    }
    for c in choices:
        if c.measured:
            assert (c.bits, c.group_size, c.recipe, c.method) in measured


def test_cli_lists_settings_and_refuses_an_impossible_budget(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama", dtype="bfloat16")
    result = run("recommend", folder, "--memory", "1GB", "--context", 256, "--json", "--top", 3)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 3 and rows[0]["command"].startswith(f"mlxedge quantize {folder} --bits ")
    result = run("recommend", folder, "--memory", "10KB")
    assert result.exit_code == 2 and "fits" in result.output
