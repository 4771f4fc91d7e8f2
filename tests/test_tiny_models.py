"""The generated model folders are real models: independent loaders read them and generate."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from safetensors import safe_open
from tiny_models import (
    ARCH_CASES,
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    SPECIAL_TOKENS,
    TOKENIZER_VOCAB_SIZE,
    hf_tensor_shapes,
    llama_1b_config,
    make_llama_1b_shape,
    make_tiny_model,
    write_model_folder,
)
from transformers import AutoConfig, AutoTokenizer

CASES = ARCH_CASES


def _stored_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every tensor in every shard of ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                meta = f.get_slice(name)
                out[name] = (tuple(meta.get_shape()), meta.get_dtype())
    return out


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        (arch, tied): make_tiny_model(
            root / f"{arch}-{'tied' if tied else 'untied'}", arch, tied=tied
        )
        for arch, tied in CASES
    }


@pytest.mark.parametrize("arch,tied", CASES)
def test_mlx_lm_loads_and_generates(tiny_folders, arch: str, tied: bool) -> None:
    # mlx_lm.load is strict: a missing, extra or misshapen tensor raises here.
    model, tokenizer = mlx_lm.load(str(tiny_folders[arch, tied]))
    steps = list(mlx_lm.stream_generate(model, tokenizer, prompt="hello", max_tokens=5))
    assert 1 <= len(steps) <= 5
    assert all(0 <= s.token < TOKENIZER_VOCAB_SIZE for s in steps)
    assert len(steps) == 5 or steps[-1].token == EOS_TOKEN_ID
    text = mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=5)
    assert isinstance(text, str) and text


@pytest.mark.parametrize("arch,tied", CASES)
def test_tensor_names_follow_hugging_face(tiny_folders, arch: str, tied: bool) -> None:
    folder = tiny_folders[arch, tied]
    config = json.loads((folder / "config.json").read_text())
    stored = _stored_tensors(folder)
    assert {n: s for n, (s, _) in stored.items()} == hf_tensor_shapes(config)
    assert {dt for _, dt in stored.values()} == {"BF16"}
    assert ("lm_head.weight" in stored) is not tied
    assert ("model.layers.1.self_attn.q_proj.bias" in stored) is (arch == "qwen2")
    assert ("model.layers.1.self_attn.k_norm.weight" in stored) is (
        arch in ("qwen3", "olmo2", "gemma3_text"))  # fmt: skip
    # OLMo 2 normalizes outputs, not inputs (Hugging Face's Olmo2DecoderLayer); Gemma both
    assert ("model.layers.1.input_layernorm.weight" in stored) is (arch != "olmo2")
    assert ("model.layers.1.post_feedforward_layernorm.weight" in stored) is (
        arch in ("olmo2", "gemma2", "gemma3_text"))  # fmt: skip
    assert ("model.layers.1.pre_feedforward_layernorm.weight" in stored) is arch.startswith(
        "gemma")  # fmt: skip


@pytest.mark.parametrize("arch,tied", CASES)
def test_transformers_reads_config_and_tokenizer(tiny_folders, arch: str, tied: bool) -> None:
    folder = tiny_folders[arch, tied]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == arch
    assert config.tie_word_embeddings is tied
    assert config.vocab_size >= TOKENIZER_VOCAB_SIZE

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == TOKENIZER_VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    text = "hello wörld 🙂 <|im_end|>"
    ids = tokenizer(text).input_ids
    assert ids[-1] == EOS_TOKEN_ID  # special tokens are single ids, not spelled out in bytes
    assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_weights_are_random_with_expected_scale(tiny_folders) -> None:
    weights = mx.load(str(tiny_folders["qwen3", False] / "model.safetensors"))
    q = np.array(weights["model.layers.0.self_attn.q_proj.weight"].astype(mx.float32))
    norm = np.array(weights["model.layers.0.input_layernorm.weight"].astype(mx.float32))
    assert abs(q.std() - 0.02) < 0.002 and abs(q.mean()) < 0.002
    assert abs(norm.mean() - 1.0) < 0.01 and norm.std() > 0


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", "qwen2", seed=3)
    b = make_tiny_model(tmp_path / "b", "qwen2", seed=3)
    c = make_tiny_model(tmp_path / "c", "qwen2", seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("dtype,stored", [("float16", "F16"), ("float32", "F32")])
def test_other_dtypes(tmp_path: Path, dtype: str, stored: str) -> None:
    folder = make_tiny_model(tmp_path / dtype, "llama", dtype=dtype)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == dtype
    assert {dt for _, dt in _stored_tensors(folder).values()} == {stored}
    model, tokenizer = mlx_lm.load(str(folder))
    assert mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=2)


def test_qwen3_head_dim_wider_than_hidden_over_heads(tmp_path: Path) -> None:
    # Qwen3-0.6B has head_dim 128 with hidden 1024 and 16 heads; q_proj is then wider than hidden.
    folder = make_tiny_model(tmp_path / "q3", "qwen3", head_dim=32)
    shapes = {n: s for n, (s, _) in _stored_tensors(folder).items()}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 32, 64)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (32,)
    model, tokenizer = mlx_lm.load(str(folder))
    assert mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=2)


def test_sharded_folder_has_index_and_loads(tmp_path: Path) -> None:
    from tiny_models import hf_config

    config = hf_config(
        "llama", tied=False, dtype="bfloat16", hidden=64, layers=2, heads=4, kv_heads=2,
        intermediate=128, vocab=TOKENIZER_VOCAB_SIZE,
    )  # fmt: skip
    folder = write_model_folder(tmp_path / "sharded", config, max_shard_bytes=64 * 1024)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    stored = _stored_tensors(folder)
    assert set(index["weight_map"]) == set(stored) == set(hf_tensor_shapes(config))
    total = sum(int(np.prod(s)) * 2 for s, _ in stored.values())
    assert index["metadata"]["total_size"] == total
    model, tokenizer = mlx_lm.load(str(folder))
    assert mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=2)


def test_llama_1b_shape_matches_llama_3_2_1b() -> None:
    config = llama_1b_config()
    shapes = hf_tensor_shapes(config)
    # Llama-3.2-1B's published parameter count (tied embedding counted once).
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_235_814_400
    assert shapes["model.layers.15.self_attn.k_proj.weight"] == (512, 2048)
    assert shapes["model.embed_tokens.weight"] == (128256, 2048)
    assert "lm_head.weight" not in shapes
    assert config["rope_theta"] == 500000.0 and config["head_dim"] == 64


def test_invalid_arguments_name_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        make_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        make_tiny_model(tmp_path, "llama", dtype="int8")
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        make_tiny_model(tmp_path, "llama", vocab=len(SPECIAL_TOKENS))


@pytest.mark.slow
@pytest.mark.slow  # writes 2.5 GB
def test_llama_1b_shape_folder(tmp_path: Path) -> None:
    folder = make_llama_1b_shape(tmp_path / "llama1b")
    config = json.loads((folder / "config.json").read_text())
    stored = _stored_tensors(folder)
    assert {n: s for n, (s, _) in stored.items()} == hf_tensor_shapes(config)
    assert {dt for _, dt in stored.values()} == {"BF16"}
    # lazy: check that mlx_lm accepts every name and shape without reading 2.5 GB.
    model, _ = mlx_lm.load(str(folder), lazy=True)
    assert model.args.hidden_size == 2048
