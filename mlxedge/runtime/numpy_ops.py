"""The `Ops` of the reference forward pass: plain numpy, float32, one sequence at a time.

Parameters are float32 arrays by Hugging Face name. Masks are additive (-inf where blocked),
attention subtracts the row maximum before the exponential, and grouped KV heads are handled by
folding each KV head's query heads into one matrix product, so the reference needs nothing but
numpy (whose BLAS uses every core).
"""

from __future__ import annotations

import numpy as np


class NumpyOps:
    """`archs.ops.Ops` in numpy.

    Args:
        params: every parameter the forward names, float32, by Hugging Face name.
    """

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.params = params

    def embedding(self, table: str, ids: np.ndarray) -> np.ndarray:
        return self.params[table][ids]

    def linear(self, x: np.ndarray, module: str, bias: bool = False) -> np.ndarray:
        y = x @ self.params[module + ".weight"].T
        if bias:
            y += self.params[module + ".bias"]
        return y

    def rms_norm(self, x: np.ndarray, weight: str, eps: float, offset: float = 0.0) -> np.ndarray:
        scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
        w = self.params[weight]
        return (x * scale.astype(np.float32)) * (w + np.float32(offset) if offset else w)

    def split_heads(self, x: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
        return x.reshape(x.shape[0], n_heads, head_dim).transpose(1, 0, 2)  # (H, L, D)

    def merge_heads(self, x: np.ndarray) -> np.ndarray:
        return x.transpose(1, 0, 2).reshape(x.shape[1], -1)  # (L, H * D)

    def rope_tables(self, positions: np.ndarray, inv_freq: np.ndarray):
        angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (L, D/2)
        cos = np.concatenate([np.cos(angles)] * 2, axis=-1)  # (L, D): both halves
        sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
        return cos, sin

    def rope(self, x: np.ndarray, tables) -> np.ndarray:
        cos, sin = tables
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def causal_mask(self, positions: np.ndarray, window: int | None) -> np.ndarray:
        blocked = positions[None, :] > positions[:, None]  # (queries, keys)
        if window is not None:
            blocked |= positions[None, :] <= positions[:, None] - window
        return np.where(blocked, np.float32(-np.inf), np.float32(0))

    def attention(self, layer, q, k, v, mask, scale: float, soft_cap=None) -> np.ndarray:
        n_heads, length, head_dim = q.shape
        n_kv = k.shape[0]
        group = n_heads // n_kv
        q = q.reshape(n_kv, group * length, head_dim)  # heads sharing a KV head together
        scores = (q @ k.transpose(0, 2, 1)).reshape(n_kv, group, length, -1)
        scores *= np.float32(scale)
        if soft_cap is not None:
            scores = self.soft_cap(scores, soft_cap)
        scores += mask
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores.reshape(n_kv, group * length, -1) @ v  # (n_kv, group * L, D)
        return out.reshape(n_heads, length, head_dim)

    def silu(self, x: np.ndarray) -> np.ndarray:
        return x / (1.0 + np.exp(-x))

    def gelu_tanh(self, x: np.ndarray) -> np.ndarray:
        inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))

    def soft_cap(self, x: np.ndarray, cap: float) -> np.ndarray:
        return np.tanh(x / np.float32(cap)) * np.float32(cap)

    def split(self, x: np.ndarray, sizes) -> list[np.ndarray]:
        return np.split(x, np.cumsum(sizes)[:-1], axis=-1)

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * b

    def scale(self, x: np.ndarray, factor: float) -> np.ndarray:
        return x * np.float32(factor)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def tail(self, x: np.ndarray, first: int) -> np.ndarray:
        return x[first:]
