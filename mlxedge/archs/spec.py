"""What an architecture module says about a model: its validated spec and its tensor table.

`ModelSpec` is the config read once, with Hugging Face's defaults for the model type made
explicit (head geometry, per-layer attention window, rotary embedding, norm epsilon, biases, a
tied head). `TensorEntry` is one row of the tensor table: the Hugging Face name (which is also
mlx-lm's), shape, llama.cpp's tensor class (`Kind`: attn_q, attn_v, ffn_down, output, ...), the
GGUF name, and how its values move to and from GGUF. Everything after the architecture module —
recipes, mixes, writers, runtimes — decides from these, never from a model type or a name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import gguf
import numpy as np

from ..errors import MlxedgeError

# Upper bounds on a config's sizes: several times what the largest published models use (126
# layers, hidden 25,600, FFN 73,728, vocabulary 262,144, 128 heads, a 10M-token context), low
# enough that a damaged config fails here instead of building billions of tensor names or
# allocating terabytes.
LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "vocab_size": 1 << 22,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 32,
    "sliding_window": 1 << 32,
}

# llama.cpp's tensor classes, as gguf-py names them (MODEL_TENSOR.ATTN_V, .FFN_DOWN, .OUTPUT...).
Kind = gguf.MODEL_TENSOR


class Role(str, Enum):
    """What a tensor does, which decides whether and how it is quantized."""

    EMBEDDING = "embedding"  # token embedding; with tied weights also the output head
    HEAD = "head"  # untied output projection (lm_head)
    LINEAR = "linear"  # a projection inside a block: quantized
    NORM = "norm"  # RMSNorm weights: kept in float
    BIAS = "bias"  # projection biases: kept in float
    DROP = "drop"  # not a parameter of the model (a precomputed rotary table, a tied head's copy)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an architecture's table.

    Attributes:
        name: the Hugging Face (and mlx-lm) name, "model.layers.0.self_attn.q_proj.weight".
        shape: (out, in) for matrices, (n,) for vectors.
        kind: llama.cpp's class of the tensor (`Kind.ATTN_Q`, ...).
        role: what it does (`Role`).
        layer: the decoder block it belongs to, None outside the blocks.
        gguf_name: its name in a GGUF file, "blk.0.attn_q.weight".
        gguf_heads: rows are stored permuted for llama.cpp's rotary in groups of this many heads
            (llama's q and k projections), else None.
        gguf_offset: added to the values in a GGUF file (Gemma's norms, which compute with 1 + w
            and are stored as 1 + w the way llama.cpp's converter writes them), else 0.
    """

    name: str
    shape: tuple[int, ...]
    kind: Kind
    role: Role
    layer: int | None
    gguf_name: str
    gguf_heads: int | None = None
    gguf_offset: float = 0.0

    @property
    def module(self) -> str:
        """The module path: the name without its final `.weight` / `.bias`."""
        return self.name.rsplit(".", 1)[0]

    def to_gguf(self, values: np.ndarray) -> np.ndarray:
        """Values in the row order a GGUF file stores (llama's q/k: each head's halves as pairs)."""
        if self.gguf_offset:
            values = values + np.float32(self.gguf_offset)
        if self.gguf_heads is None:
            return values
        return _permute(values, self.gguf_heads, to_pairs=True)

    def from_gguf(self, values: np.ndarray) -> np.ndarray:
        """The inverse of `to_gguf`: values read from a GGUF file in Hugging Face's row order.
        An offset makes it one float32 rounding off (|error| <= 2^-24 * |w + offset|)."""
        if self.gguf_offset:
            values = values - np.float32(self.gguf_offset)
        if self.gguf_heads is None:
            return values
        return _permute(values, self.gguf_heads, to_pairs=False)


def _permute(rows: np.ndarray, n_head: int, to_pairs: bool) -> np.ndarray:
    """llama.cpp's q/k row permutation (halves -> pairs) or its inverse.

    Hugging Face rotates the two halves of each head, so it stores a head's rows as (2, D/2);
    llama.cpp's "norm" rotary rotates adjacent pairs, so its converter stores them as (D/2, 2).
    Works on weights (rows, in) and biases (rows,).
    """
    shape = rows.shape
    half = shape[0] // n_head // 2
    split = (n_head, 2, half) if to_pairs else (n_head, half, 2)
    return rows.reshape(*split, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class ModelSpec:
    """A config, validated, with the model type's defaults made explicit.

    Attributes:
        model_type: the Hugging Face model type.
        hidden_size, intermediate_size, vocab_size: the widths.
        n_layers: decoder blocks.
        n_heads, n_kv_heads, head_dim: attention geometry (grouped KV heads when fewer).
        rms_norm_eps: RMSNorm's epsilon.
        rope_theta: the rotary base.
        rope_scaling: the config's `rope_scaling` block, or None.
        max_position_embeddings: the context the model was trained for.
        tied: the output head is the token embedding.
        windows: per block, the sliding attention window in tokens, or None for full attention.
        qkv_bias, o_bias, mlp_bias: which projections carry biases.
        qk_norm: per-head RMSNorms on queries and keys (Qwen3, Gemma 3).
        norm_offset: RMSNorms scale by offset + w (Gemma's 1 + w; 0 elsewhere).
        activation: the MLP's gate activation ("silu", or Gemma's "gelu_tanh").
        embedding_multiplier, residual_multiplier: scale the embeddings and each residual branch
            (Granite; 1 elsewhere).
        attention_multiplier: the attention's scale in place of 1/sqrt(head_dim) (Granite).
        logits_scaling: the logits are divided by it (Granite).
        attn_softcap, final_softcap: attention scores and logits soft-capped as
            cap * tanh(x / cap) (Gemma 2), or None.
        local_rope_theta: the rotary base of sliding-window layers, which then take no rope
            scaling (Gemma 3's `rope_local_base_freq`); None: every layer uses `rope_theta`.
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tied: bool
    windows: tuple[int | None, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    activation: str = "silu"
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    norm_offset: float = 0.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    local_rope_theta: float | None = None

    def inv_freq(self, layer: int | None = None) -> np.ndarray:
        """The rotary embedding's inverse frequencies (head_dim / 2,), float32, scaling applied;
        those of block `layer` where sliding layers have a base of their own."""
        if layer is not None and self.local_rope_theta is not None and self.windows[layer]:
            return rope_inv_freq(self.local_rope_theta, None, self.head_dim)
        return rope_inv_freq(self.rope_theta, self.rope_scaling, self.head_dim)

    @property
    def attention_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return 1.0 / math.sqrt(self.head_dim)


def rope_inv_freq(theta: float, scaling: dict | None, head_dim: int) -> np.ndarray:
    """Inverse frequencies of the rotary embedding with a config's scaling applied.

    Supports no scaling, "linear", "llama3" (Llama 3.1/3.2) and Phi-3's "longrope" / "su" with
    its short factors (what Hugging Face uses up to `original_max_position_embeddings` tokens;
    the attention factor is the architecture's to apply); any other type is refused rather than
    silently computed wrong.

    Raises:
        MlxedgeError: another rope scaling type.
    """
    inv = 1.0 / float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv.astype(np.float32)
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if kind in ("longrope", "su"):
        short = np.asarray(scaling.get("short_factor"), dtype=np.float64)
        if short.shape != inv.shape:
            raise MlxedgeError(f"rope_scaling.short_factor is not {len(inv)} numbers",
                               fix="use the model's original config.json")  # fmt: skip
        return (inv / short).astype(np.float32)
    raise MlxedgeError(
        f"rope scaling {kind!r} is not supported",
        fix="supported: no scaling, 'linear', 'llama3', 'longrope'",
    )
