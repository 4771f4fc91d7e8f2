"""The per-tensor types of each llama.cpp mix, against the types llama-quantize itself picks.

llama-quantize converts an F32 GGUF we write; every tensor of its output must have the type our
plan gives the same model. Two small models cover the rules: a tied llama with grouped-query
attention (n_head / n_head_kv = 4) and rows that divide into 256, and an untied qwen2 whose
hidden size (320) does not, so its projections take llama.cpp's fall-back types; and a granite
(llama.cpp's own architecture, with the same per-tensor rules), an untied olmo2, a tied Gemma 2,
an untied Gemma 3 (one KV head) and a Phi-3, whose fused attn_qkv takes attn_v's rules.
"""

from __future__ import annotations

import gguf
import pytest
from llamacpp_util import quantize_file
from tiny_models import make_tiny_model

from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf.mixes import MIXES, mix_named
from mlxedge.formats.gguf.writer import plan_tensors, write_gguf
from mlxedge.source import resolve

MIX_NAMES = [m for m in MIXES if m not in ("F32", "F16", "BF16")]
MODELS = {
    "llama-gqa4-tied": dict(arch="llama", hidden=256, heads=8, kv_heads=2, intermediate=512),
    "qwen2-320-untied": dict(arch="qwen2", hidden=320, heads=5, kv_heads=5, intermediate=768,
                             tied=False),
    "granite-gqa2-tied": dict(arch="granite", hidden=256, heads=4, kv_heads=2, intermediate=512),
    "olmo2-untied": dict(arch="olmo2", hidden=256, heads=4, kv_heads=4, intermediate=512,
                         tied=False),
    "gemma2-tied": dict(arch="gemma2", hidden=256, heads=4, kv_heads=2, intermediate=512),
    "gemma3-untied": dict(arch="gemma3_text", hidden=256, heads=4, kv_heads=1, intermediate=512,
                          tied=False),
    "phi3-fused-qkv": dict(arch="phi3", hidden=256, heads=4, kv_heads=4, intermediate=512,
                           tied=False),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(MODELS))
def f32_gguf(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    spec = dict(MODELS[request.param])
    folder = make_tiny_model(tmp / "hf", spec.pop("arch"), layers=16, vocab=512,
                             dtype="float32", **spec)  # fmt: skip
    model = resolve(str(folder))
    path = tmp / "f32.gguf"
    write_gguf(model, path, "F32")
    return model, path


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.llamacpp
@pytest.mark.parametrize("mix", MIX_NAMES)
def test_mix_types_equal_llama_quantize(f32_gguf, mix, tmp_path):
    model, f32 = f32_gguf
    quantize_file(f32, tmp_path / "q.gguf", mix)
    theirs = _types(tmp_path / "q.gguf")
    plans, _ = plan_tensors(model, mix_named(mix))
    ours = {p.name: p.ggml_type for p in plans}
    assert ours == theirs


@pytest.mark.llamacpp
@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K"])
def test_pure_types_equal_llama_quantize_pure(f32_gguf, mix, tmp_path):
    model, f32 = f32_gguf
    quantize_file(f32, tmp_path / "q.gguf", mix, pure=True)
    plans, _ = plan_tensors(model, mix_named(mix), pure=True)
    assert {p.name: p.ggml_type for p in plans} == _types(tmp_path / "q.gguf")


def test_unknown_type_lists_the_valid_ones():
    with pytest.raises(MlxedgeError) as e:
        mix_named("Q4_K_X")
    assert "Q4_K_M" in str(e.value) and "Q8_0" in str(e.value)
