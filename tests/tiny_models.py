"""Generated Hugging Face model folders with random weights, for tests and benchmarks.

A folder written here has what a Hub checkpoint of the same ``model_type`` has: ``config.json``
with the keys transformers 4.x writes for that class, safetensors under the Hugging Face tensor
names (sharded with an index json when large), and a byte-level BPE tokenizer that
``transformers.AutoTokenizer`` and ``mlx_lm.load`` read offline. The weights are random, so
outputs are meaningless, but every consumer that accepts a real checkpoint accepts these.

Everything is a function of the arguments and the seed: the same call writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "gemma2", "gemma3_text", "phi3")
# Whether the head may be untied, per architecture (mlx-lm and llama.cpp run Gemma 2 tied only).
TIES = {arch: (True, False) for arch in ARCHS} | {"gemma2": (True,)}
# (arch, tied) of every head each architecture allows, and the ids tests show them by
ARCH_CASES = [(arch, tied) for arch in ARCHS for tied in TIES[arch]]
ARCH_IDS = [f"{a}-{'tied' if t else 'untied'}" for a, t in ARCH_CASES]
DTYPES = ("bfloat16", "float16", "float32")

# Written into every JSON file instead of the installed version so that the bytes do not depend on
# the environment; a 4.x version because those write ``torch_dtype`` (5.x writes ``dtype``, and
# mlx_lm.convert only reads ``torch_dtype``).
TRANSFORMERS_VERSION = "4.51.3"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_BYTE_TOKENS = 256
N_MERGES = 61
# 256 byte tokens + 61 merges + 3 special tokens: a multiple of 64, so quantizers with group size
# 32 or 64 never meet a ragged vocabulary dimension.
TOKENIZER_VOCAB_SIZE = N_BYTE_TOKENS + N_MERGES + len(SPECIAL_TOKENS)
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
BOS_TOKEN_ID = TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(BOS_TOKEN)
PAD_TOKEN_ID = BOS_TOKEN_ID
EOS_TOKEN_ID = TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(EOS_TOKEN)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text the BPE merges are learned from; fixed so that the tokenizer is the same on every machine.
MERGE_CORPUS = (
    "hello world, hello there. The quick brown fox jumps over the lazy dog. "
    "In the beginning the model was small, and the tests were fast. "
    "Quantization maps weights to integers in groups; the scale and the bias of each group "
    "restore them. Then the tokenizer splits the text into tokens, and the model predicts "
    "the next token, one at a time, until it writes the end of the text. "
)

WEIGHT_STD = 0.02
# Safetensors shards of a generated model are at most this large (HF's own default is larger; a
# smaller one makes the 1B-shape model exercise the sharded-index path).
DEFAULT_MAX_SHARD_BYTES = 1 << 30

_MX_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def make_tiny_model(
    folder: Path,
    arch: str,
    *,
    tied: bool = True,
    dtype: str = "bfloat16",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = TOKENIZER_VOCAB_SIZE,
    head_dim: int | None = None,
) -> Path:
    """Write a small Hugging Face model folder with random weights.

    Args:
        folder: Output folder; created if missing, files in it are overwritten.
        arch: Hugging Face ``model_type``, one of ``ARCHS``.
        tied: Whether ``lm_head`` shares the embedding (``tie_word_embeddings``); when False the
            folder holds a separate ``lm_head.weight``.
        dtype: Storage dtype of every tensor and the config's ``torch_dtype``, one of ``DTYPES``.
        seed: Seed of the weights; the same arguments give byte-identical files.
        hidden: ``hidden_size``.
        layers: ``num_hidden_layers``.
        heads: ``num_attention_heads``.
        kv_heads: ``num_key_value_heads``.
        intermediate: ``intermediate_size``.
        vocab: ``vocab_size``; at least ``TOKENIZER_VOCAB_SIZE``. A larger value pads the
            embedding like many Hub models, but generation may then sample ids the tokenizer
            cannot decode.
        head_dim: Per-head width; defaults to ``hidden // heads``. qwen3 and llama may use another
            value (Qwen3-0.6B does), qwen2 may not (its modelling code derives it).

    Returns:
        ``folder``.

    Raises:
        ValueError: On an unknown ``arch`` or ``dtype``, a vocabulary smaller than the tokenizer's,
            or inconsistent head sizes.
    """
    config = hf_config(
        arch,
        tied=tied,
        dtype=dtype,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        head_dim=head_dim,
    )
    return write_model_folder(folder, config, seed=seed)


def make_llama_1b_shape(
    folder: Path,
    dtype: str = "bfloat16",
    seed: int = 0,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a model with Llama-3.2-1B's config and tensor shapes and random weights.

    1.24 billion parameters (2.5 GB in bfloat16), written in shards of at most ``max_shard_bytes``
    with a ``model.safetensors.index.json``. Tensors are generated one at a time and only the
    current shard is held in memory. About half a minute on two cores.

    Args:
        folder: Output folder; created if missing.
        dtype: Storage dtype, one of ``DTYPES``.
        seed: Seed of the weights.
        max_shard_bytes: Largest shard size in bytes (a single larger tensor gets its own shard).

    Returns:
        ``folder``.
    """
    return write_model_folder(
        folder, llama_1b_config(dtype), seed=seed, max_shard_bytes=max_shard_bytes
    )


def llama_1b_config(dtype: str = "bfloat16") -> dict[str, Any]:
    """Return Llama-3.2-1B's ``config.json`` with this module's tokenizer ids.

    Args:
        dtype: The ``torch_dtype`` to record, one of ``DTYPES``.

    Returns:
        The config as a dict.
    """
    config = hf_config(
        "llama",
        tied=True,
        dtype=dtype,
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        vocab=128256,
        head_dim=64,
    )
    config["max_position_embeddings"] = 131072
    config["rope_scaling"] = {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    return config


def hf_config(
    arch: str,
    *,
    tied: bool,
    dtype: str,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    head_dim: int | None = None,
) -> dict[str, Any]:
    """Return the ``config.json`` that transformers 4.x writes for ``arch`` with these sizes.

    The key set of each architecture follows that version's config class (``LlamaConfig``,
    ``MistralConfig``, ``Qwen2Config``, ``Qwen3Config``); other values follow the family's
    small Hub checkpoints (Llama-3.2-1B, Mistral-7B-v0.3, Qwen2.5-0.5B, Qwen3-0.6B).

    Args:
        arch: One of ``ARCHS``.
        tied: ``tie_word_embeddings``.
        dtype: ``torch_dtype``, one of ``DTYPES``.
        hidden: ``hidden_size``.
        layers: ``num_hidden_layers``.
        heads: ``num_attention_heads``.
        kv_heads: ``num_key_value_heads``.
        intermediate: ``intermediate_size``.
        vocab: ``vocab_size``.
        head_dim: Per-head width, ``hidden // heads`` when None.

    Returns:
        The config as a dict.

    Raises:
        ValueError: On an unknown ``arch`` or ``dtype``, a vocabulary smaller than the tokenizer's,
            or inconsistent head sizes.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid choices: {', '.join(DTYPES)}")
    if vocab < TOKENIZER_VOCAB_SIZE:
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {TOKENIZER_VOCAB_SIZE}")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
        head_dim = hidden // heads
    elif arch in ("qwen2", "granite", "olmo2", "phi3") and head_dim * heads != hidden:
        raise ValueError(f"{arch} derives head_dim as hidden // heads; it cannot be set")

    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 2048,
        "model_type": arch,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab,
    }
    if arch == "llama":
        config |= {
            "attention_bias": False,
            "head_dim": head_dim,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 500000.0,
        }
    elif arch == "granite":
        # granite-3.x-style multipliers, away from 1 so that each one shows
        config |= {
            "attention_bias": False,
            "attention_multiplier": 0.0078125,
            "embedding_multiplier": 12.0,
            "logits_scaling": 8.0,
            "mlp_bias": False,
            "residual_multiplier": 0.22,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000000.0,
        }
    elif arch == "olmo2":
        config |= {
            "attention_bias": False,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 500000.0,
        }
    elif arch in ("gemma2", "gemma3_text"):
        # Gemma2Config's / Gemma3TextConfig's keys. The attention scale is head_dim's, the rule
        # llama.cpp applies; the soft-caps (Gemma 2) are set where random weights' scores and
        # logits reach, so that they change the result; Gemma 3's sliding layers (the first of
        # every two, 16 tokens) reach less far than the tests' sequences, and its global layers
        # have a scaled rotary base of their own, as Gemma 3 4B's have.
        config |= {
            "attention_bias": False,
            "head_dim": head_dim,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "pad_token_id": PAD_TOKEN_ID,
            "query_pre_attn_scalar": head_dim,
            "rms_norm_eps": 1e-06,
        }
        if arch == "gemma2":
            config |= {
                "attn_logit_softcapping": 0.05,
                "cache_implementation": "hybrid",
                "final_logit_softcapping": 0.5,
                "max_position_embeddings": 8192,
                "rope_theta": 10000.0,
                "sliding_window": 4096,
            }
        else:
            config |= {
                "attn_logit_softcapping": None,
                "final_logit_softcapping": None,
                "max_position_embeddings": 32768,
                "rope_local_base_freq": 10000.0,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "rope_theta": 1000000.0,
                "sliding_window": 16,
                "sliding_window_pattern": 2,
            }
    elif arch == "phi3":
        # Phi-3-mini-4k-instruct's values (its 2047-token window reaches beyond the tests)
        config |= {
            "attention_bias": False,
            "embd_pdrop": 0.0,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "pad_token_id": PAD_TOKEN_ID,
            "resid_pdrop": 0.0,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "sliding_window": 2047,
        }
    elif arch == "mistral":
        config |= {
            "head_dim": head_dim,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
        }
    else:
        # qwen2 has no attention_bias key: its q/k/v projections always carry biases.
        config |= {
            "max_window_layers": layers,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000.0,
            "sliding_window": None if arch == "qwen3" else 2048,
            "use_sliding_window": False,
        }
        if arch == "qwen3":
            config |= {"attention_bias": False, "head_dim": head_dim}
    return dict(sorted(config.items()))


def hf_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Return every tensor of a checkpoint of ``config``, in the order Hugging Face stores them:
    the architecture module's own tensor table, so a new architecture gets tiny models for free
    (mlx-lm's strict ``load`` and llama.cpp stay the independent judges of the result).

    Args:
        config: A config from ``hf_config`` (or a Hub ``config.json`` of one of ``ARCHS``).

    Returns:
        Mapping of Hugging Face tensor name to shape (PyTorch layout: ``(out, in)`` for linears).
    """
    from mlxedge.archs import arch_for

    return {e.name: e.shape for e in arch_for(config).tensors()}


def edit_weights(folder: Path, edit) -> None:
    """Change a single-file tiny model's weights in place: ``edit`` gets every tensor as a
    writable float numpy array (name -> array) and changes the dict or its arrays."""
    path = folder / "model.safetensors"
    weights = {k: np.array(v) for k, v in mx.load(str(path)).items()}
    edit(weights)
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in weights.items()})


def make_tiny_gemma3(folder: Path, *, tied: bool = True, dtype: str = "float32", seed: int = 0,
                     **sizes: int) -> Path:  # fmt: skip
    """Write a multimodal Gemma 3 folder (``Gemma3ForConditionalGeneration``): the language model
    of ``make_tiny_model(..., "gemma3_text", ...)`` under ``language_model.*`` with its config as
    ``text_config``, beside a stand-in vision tower (two tensors) that a text model leaves out.

    Args:
        folder: Output folder; created if missing.
        tied: ``tie_word_embeddings`` of the language model.
        dtype: Storage dtype, one of ``DTYPES``.
        seed: Seed of the weights.
        **sizes: ``hidden``, ``layers``, ... as ``hf_config`` takes them.

    Returns:
        ``folder``.
    """
    args = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                vocab=TOKENIZER_VOCAB_SIZE) | sizes  # fmt: skip
    text = hf_config("gemma3_text", tied=tied, dtype=dtype, **args)
    outer = ("architectures", "bos_token_id", "eos_token_id", "torch_dtype", "transformers_version")
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "image_token_index": PAD_TOKEN_ID,
        "mm_tokens_per_image": 4,
        "model_type": "gemma3",
        "text_config": {k: v for k, v in text.items() if k not in outer},
        "torch_dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "vision_config": {"hidden_size": 16, "image_size": 8, "model_type": "siglip_vision_model",
                          "num_hidden_layers": 1, "patch_size": 4},
        "vocab_size": args["vocab"],  # mlx-lm's gemma3 takes it from here (default 262208)
    }  # fmt: skip
    shapes = {"language_model." + n: shape for n, shape in hf_tensor_shapes(text).items()}
    shapes |= {
        "multi_modal_projector.mm_input_projection_weight": (16, args["hidden"]),
        "vision_tower.vision_model.embeddings.patch_embedding.weight": (16, 3, 4, 4),
    }
    return write_model_folder(folder, config, seed=seed, shapes=shapes, norm_offset=1.0)


def write_model_folder(
    folder: Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    shapes: dict[str, tuple[int, ...]] | None = None,
    norm_offset: float | None = None,
) -> Path:
    """Write config, random weights, tokenizer and generation config for ``config`` into ``folder``.

    Args:
        folder: Output folder; created if missing.
        config: A config from ``hf_config`` or ``llama_1b_config``.
        seed: Seed of the weights.
        max_shard_bytes: Largest safetensors shard in bytes.
        shapes: The tensors to write; the config's architecture's table when None.
        norm_offset: What the norms add to their weights; the architecture's when None.

    Returns:
        ``folder``.
    """
    from mlxedge.archs import arch_for

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", config)
    if norm_offset is None:
        norm_offset = arch_for(config).spec.norm_offset
    _write_weights(folder, hf_tensor_shapes(config) if shapes is None else shapes,
                   config["torch_dtype"], seed, max_shard_bytes, norm_offset)  # fmt: skip
    _write_tokenizer(folder)
    _write_json(
        folder / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "transformers_version": TRANSFORMERS_VERSION,
        },
    )
    return folder


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    # The layout save_pretrained uses, so diffs against Hub files stay small.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...],
                   norm_offset: float = 0.0) -> np.ndarray:  # fmt: skip
    """Draw one tensor: norms scaling by about 1 (as trained models have: w near 1, or near 0
    where the norm scales by 1 + w), everything else N(0, 0.02²)."""
    # float32 draws are about twice as fast as float64 ones and are all the 1B model needs.
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= WEIGHT_STD
    if name.endswith("norm.weight"):
        x += 1.0 - norm_offset
    return x


def _plan_shards(
    shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_bytes: int
) -> list[list[str]]:
    """Split tensor names, in order, into consecutive shards of at most ``max_shard_bytes``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: str,
    seed: int,
    max_shard_bytes: int,
    norm_offset: float = 0.0,
) -> None:
    """Generate and write tensors shard by shard, holding at most one shard in memory."""
    mx_dtype = _MX_DTYPES[dtype]
    shards = _plan_shards(shapes, mx_dtype.size, max_shard_bytes)
    # One generator drawn in a fixed tensor order: the weights depend only on seed and shapes.
    rng = np.random.default_rng(seed)
    # safetensors' reader in transformers insists on this metadata; save_pretrained writes it.
    metadata = {"format": "pt"}
    if len(shards) == 1:
        mx.save_safetensors(
            str(folder / "model.safetensors"),
            dict(_generate(rng, shapes, mx_dtype, norm_offset)),
            metadata,
        )
        return

    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        shard = dict(_generate(rng, {n: shapes[n] for n in names}, mx_dtype, norm_offset))
        mx.save_safetensors(str(folder / filename), shard, metadata)
        del shard
        weight_map |= dict.fromkeys(names, filename)
    total_size = sum(int(np.prod(s)) * mx_dtype.size for s in shapes.values())
    _write_json(
        folder / "model.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": weight_map},
    )


def _generate(
    rng: np.random.Generator,
    shapes: dict[str, tuple[int, ...]],
    mx_dtype: mx.Dtype,
    norm_offset: float = 0.0,
) -> Iterator[tuple[str, mx.array]]:
    for name, shape in shapes.items():
        x = mx.array(_random_tensor(rng, name, shape, norm_offset)).astype(mx_dtype)
        # Evaluate now so the float32 copy is freed before the next tensor is drawn.
        mx.eval(x)
        yield name, x


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair.

    Ties go to the lexicographically smallest pair so that the result never depends on dict or
    hash order.
    """
    counts: dict[tuple[str, ...], int] = {}
    for word in words:
        key = tuple(word)
        counts[key] = counts.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, count in counts.items():
            for pair in pairwise(symbols):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            raise ValueError("merge corpus too small for the requested number of merges")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in counts.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        counts = merged
    return merges


def build_tokenizer() -> Tokenizer:
    """Return the byte-level BPE tokenizer of every generated model.

    Ids 0..255 are the bytes, then ``N_MERGES`` merges learned from ``MERGE_CORPUS``, then the
    special tokens ``SPECIAL_TOKENS``: ``TOKENIZER_VOCAB_SIZE`` tokens. Any text encodes (every
    byte has a token), as with GPT-2, Llama-3 and Qwen tokenizers.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [w for w, _ in pre_tokenizer.pre_tokenize_str(MERGE_CORPUS)]
    merges = _learn_merges(words, N_MERGES)
    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(N_BYTE_TOKENS)}
    for a, b in merges:
        vocab[a + b] = len(vocab)

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    assert tokenizer.get_vocab_size() == TOKENIZER_VOCAB_SIZE
    return tokenizer


def _write_tokenizer(folder: Path) -> None:
    tokenizer = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "bos_token": BOS_TOKEN,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS_TOKEN,
            "extra_special_tokens": {},
            "model_max_length": 2048,
            "pad_token": PAD_TOKEN,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": None,
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
        },
    )


def hub_cache_snapshot(cache: Path, model: Path, repo: str = "org/tiny") -> Path:
    """`model` laid out as huggingface_hub stores a download: snapshot files are relative links
    into the repository's blobs/ folder, and refs/main names the snapshot."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for f in sorted(model.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo_dir / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    return snap
