"""The reference forward pass: the supported architectures in plain numpy, float32.

This is the yardstick every other backend is compared with, and the CPU fallback: it depends on
nothing but numpy (whose BLAS uses every core) and reads weights from any `TensorSource` — an
original checkpoint, or an MLX folder dequantized (see `runtime.artifact`).

The llama family as Hugging Face defines it: token embedding; per block RMSNorm → attention with
rotary embeddings (rotate-half layout, theta and scaling from the config) and grouped KV heads
under a causal mask → residual → RMSNorm → SwiGLU MLP → residual; final RMSNorm; output head
(the embedding when tied). qwen2 adds q/k/v biases, qwen3 per-head RMSNorms on q and k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..archs import arch_for
from ..errors import MlxedgeError
from ..model import TensorSource


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return (x * scale.astype(np.float32)) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_inv_freq(config: dict, head_dim: int) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, with the config's scaling applied.

    Supports no scaling, "linear" and "llama3" (Llama 3.1/3.2); any other type is refused rather
    than silently computed wrong.
    """
    theta = float(config.get("rope_theta", 10000.0))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = config.get("rope_scaling") or {}
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
    raise MlxedgeError(
        f"rope scaling {kind!r} is not supported by the reference forward pass",
        fix="supported: no scaling, 'linear', 'llama3'",
    )


class ReferenceModel:
    """A llama-family model held as float32 numpy arrays.

    Args:
        config: the model's config.json contents.
        weights: tensor name -> array (any float dtype; converted to float32 once).
    """

    def __init__(self, config: dict, weights: dict[str, np.ndarray]) -> None:
        self.arch = arch_for(config, "config.json")
        c = config
        self.n_layers = int(c["num_hidden_layers"])
        self.n_heads = int(c["num_attention_heads"])
        self.n_kv = int(c.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(c.get("head_dim") or c["hidden_size"] // self.n_heads)
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        window = c.get("sliding_window")
        self.window = int(window) if window and c.get("use_sliding_window", True) else None
        self.inv_freq = rope_inv_freq(c, self.head_dim)
        self.vocab_size = int(c["vocab_size"])

        def take(name: str) -> np.ndarray:
            return np.ascontiguousarray(weights.pop(name), dtype=np.float32)

        self.embed = take("model.embed_tokens.weight")
        self.head = self.embed if self.arch.tied else take("lm_head.weight")
        self.norm = take("model.norm.weight")
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            layer = {
                "in_norm": take(p + "input_layernorm.weight"),
                "post_norm": take(p + "post_attention_layernorm.weight"),
                # q, k, v (and gate, up) as one matrix each: one GEMM instead of three.
                "qkv": np.concatenate(
                    [take(p + f"self_attn.{x}_proj.weight") for x in "qkv"], axis=0
                ),
                "o": take(p + "self_attn.o_proj.weight"),
                "gate_up": np.concatenate(
                    [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], axis=0
                ),
                "down": take(p + "mlp.down_proj.weight"),
            }
            if p + "self_attn.q_proj.bias" in weights:
                layer["qkv_bias"] = np.concatenate(
                    [take(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
                )
            if p + "self_attn.q_norm.weight" in weights:
                layer["q_norm"] = take(p + "self_attn.q_norm.weight")
                layer["k_norm"] = take(p + "self_attn.k_norm.weight")
            self.layers.append(layer)

    @classmethod
    def from_source(cls, config: dict, source: TensorSource) -> ReferenceModel:
        """Read every tensor the architecture needs from `source` (as float32)."""
        arch = arch_for(config, "config.json")
        names = arch.expected_tensors()
        available = {i.name for i in source.infos()}
        names += [n for n in available if n.endswith(".bias") and n not in names]
        missing = [n for n in names if n not in available]
        if missing:
            raise MlxedgeError(
                f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}",
                fix="use a complete checkpoint of the model",
            )
        return cls(config, {n: source.read(n).astype(np.float32, copy=False) for n in names})

    def _rotate(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def _attention(self, layer: dict, x: np.ndarray, cos, sin, mask) -> np.ndarray:
        L = x.shape[0]
        qkv = x @ layer["qkv"].T
        if "qkv_bias" in layer:
            qkv += layer["qkv_bias"]
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q = qkv[:, :nq].reshape(L, self.n_heads, self.head_dim).transpose(1, 0, 2)
        k = qkv[:, nq : nq + nk].reshape(L, self.n_kv, self.head_dim).transpose(1, 0, 2)
        v = qkv[:, nq + nk :].reshape(L, self.n_kv, self.head_dim).transpose(1, 0, 2)
        if "q_norm" in layer:
            q = _rms_norm(q, layer["q_norm"], self.eps)
            k = _rms_norm(k, layer["k_norm"], self.eps)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        group = self.n_heads // self.n_kv
        q = q.reshape(self.n_kv, group * L, self.head_dim)  # heads sharing a KV head together
        scores = (q @ k.transpose(0, 2, 1)).reshape(self.n_kv, group, L, L)
        scores *= np.float32(1.0 / math.sqrt(self.head_dim))
        scores += mask
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores.reshape(self.n_kv, group * L, L) @ v  # (n_kv, group * L, head_dim)
        out = out.reshape(self.n_heads, L, self.head_dim).transpose(1, 0, 2).reshape(L, -1)
        return out @ layer["o"].T

    def _mlp(self, layer: dict, x: np.ndarray) -> np.ndarray:
        gate_up = x @ layer["gate_up"].T
        inter = gate_up.shape[1] // 2
        return (_silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ layer["down"].T

    def logits(self, ids: Sequence[int], first: int = 0) -> np.ndarray:
        """Next-token logits at positions first..len(ids)-1 (float32, (len(ids) - first, vocab)).

        Positions before `first` are computed (they are context) but skip the output head.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("ids must be a non-empty 1-D sequence")
        if ids.min() < 0 or ids.max() >= self.embed.shape[0]:
            raise ValueError(f"token ids must lie in [0, {self.embed.shape[0]})")
        L = len(ids)
        angles = np.arange(L, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        cos = np.concatenate([np.cos(angles)] * 2, axis=-1)
        sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
        pos = np.arange(L)
        blocked = pos[None, :] > pos[:, None]
        if self.window is not None:
            blocked |= pos[None, :] <= pos[:, None] - self.window
        mask = np.where(blocked, np.float32(-np.inf), np.float32(0))
        x = self.embed[ids]
        for layer in self.layers:
            x = x + self._attention(layer, _rms_norm(x, layer["in_norm"], self.eps), cos, sin, mask)
            x = x + self._mlp(layer, _rms_norm(x, layer["post_norm"], self.eps))
        x = _rms_norm(x[first:], self.norm, self.eps)
        return x @ self.head.T


class ReferenceBackend:
    """The numpy reference as a `Backend` (weights read on first use)."""

    name = "reference"
    device = "numpy, cpu"
    tolerance = None  # it is the yardstick
    token_budget = None

    def __init__(self, model) -> None:
        self._model = model
        self._ref: ReferenceModel | None = None

    def logits(self, ids: np.ndarray, first: int = 0) -> np.ndarray:
        if self._ref is None:
            self._ref = ReferenceModel.from_source(self._model.config, self._model.weights)
        return self._ref.logits(ids, first)
