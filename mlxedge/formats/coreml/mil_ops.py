"""The second executor of an architecture's forward: coremltools' MIL builder instead of numpy.

`MILOps` implements `archs.ops.Ops` with `mb.*` calls inside an `mb.program`, so the program a
Core ML package holds is the same forward the reference runs, written once in `archs/`. What the
executor adds is what Core ML needs around it (see ../shared facts on Core ML):

- positions come from the shapes: `end = causalMask.shape[-1]`, `begin = end - inputIds.shape[-1]`
  (both callers' conventions: Apple's and Hugging Face's real causal mask, and swift-transformers'
  all-zero `[1, 1, 1, tokens + 1]`, one slot late); the causal mask is built in the graph and never
  trusted from the input, and cache slots never written (layer 0's key exactly zero) are masked;
- the KV cache is two float16 states `(layers, 1, kv_heads, context, head_dim)`, each read once
  and its updates chained through the layers (coremltools merges repeated `read_state` ops and
  loses writes);
- rotary angles are looked up from cos/sin tables computed in float64 and stored as float16,
  never computed in the graph (float16 angles are off by up to 1.9 at 4k positions);
- weights are named constants made by a `weight(name)` callback: block-wise constants for
  quantized tensors (`blockwise.py`), float16 otherwise; a tied head reuses the embedding's.

The graph is built in float32 (states and block-wise weights are float16 and cast at the
boundary); the converter's float16 pass then makes every op float16, as the target computes —
except, for an architecture whose activations overflow float16 (Gemma's residual stream reaches
1e5), the residual stream: embedding scale, norms and residual adds are named with `FLOAT32`
and the pass leaves them in float32 (`program.convert_program`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

MASKED = -30000.0  # additive mask value: below any float16 score, and finite
FLOAT32 = "fp32_"  # the name prefix of ops the float16 pass must leave in float32


class MILOps:
    """`archs.ops.Ops` over coremltools' MIL builder, inside an `mb.program` being built.

    Args:
        mb: coremltools' `Builder`.
        weight: the constant for a parameter name (a MIL variable, made once per name).
        key_cache, value_cache: the program's state inputs.
        begin, end: int32 scalars, the first and one-past-last cache slot of this call's tokens.
        context: the cache length (the states' fourth dimension).
        n_kv_heads, head_dim: the cache's geometry.
        float32_residual: keep the residual stream in float32 (see the module's doc).
    """

    def __init__(self, mb, weight: Callable[[str], Any], key_cache, value_cache, begin, end,
                 context: int, n_kv_heads: int, head_dim: int,
                 float32_residual: bool = False) -> None:  # fmt: skip
        self.mb = mb
        self.float32_residual = float32_residual
        self._named = 0  # ops named so far (names must be unique in a program)
        self._tables = 0  # rotary tables made so far
        self.weight = weight
        self.begin, self.end = begin, end
        self.context, self.n_kv, self.head_dim = context, n_kv_heads, head_dim
        # Each state read once; later layers take the value the previous update returned.
        self.keys = mb.read_state(input=key_cache)  # float16, like every state
        self.values = mb.read_state(input=value_cache)
        self.key_state, self.value_state = key_cache, value_cache
        self.unwritten = None  # additive (end,) mask of never-written slots, after layer 0

    # ------------------------------------------------------------------------------ helpers

    def _vector(self, *parts):
        """An int32 vector from Python ints and int32 scalars/vectors (for dynamic slices)."""
        mb = self.mb
        values = [
            mb.const(val=np.array([p], dtype=np.int32)) if isinstance(p, int) else
            (mb.expand_dims(x=p, axes=[0]) if p.rank == 0 else p)
            for p in parts
        ]  # fmt: skip
        return mb.concat(values=values, axis=0)

    def _f32(self, op: str, **inputs):
        """`mb.<op>(**inputs)`, named to stay in float32 when the residual stream does."""
        if self.float32_residual:
            self._named += 1
            inputs["name"] = f"{FLOAT32}{op}_{self._named}"
        return getattr(self.mb, op)(**inputs)

    # ---------------------------------------------------------------------------------- Ops

    def embedding(self, table: str, ids):
        return self.mb.gather(x=self.weight(table), indices=ids, axis=0)

    def linear(self, x, module: str, bias: bool = False):
        b = self.weight(module + ".bias") if bias else None
        if b is None:
            return self.mb.linear(x=x, weight=self.weight(module + ".weight"))
        return self.mb.linear(x=x, weight=self.weight(module + ".weight"), bias=b)

    def rms_norm(self, x, weight: str, eps: float, offset: float = 0.0):
        # x / sqrt(mean(x^2) + eps) without forming x^2 in float16, which overflows once |x| > 256
        # (SmolLM2's residual stream does): the L2 norm stays in range, and
        # 1 / sqrt(r^2 + eps) = rsqrt(1 + (sqrt(eps) / r)^2) / r for r = |x| / sqrt(d).
        f32 = self._f32
        d = x.shape[-1]
        root_eps = float(np.sqrt(eps))
        r = f32("mul", x=f32("reduce_l2_norm", x=x, axes=[-1], keep_dims=True),
                y=float(1 / np.sqrt(d)))  # fmt: skip
        r = f32("maximum", x=r, y=root_eps / 16)  # an all-zero row stays zero, not NaN
        ratio = f32("real_div", x=root_eps, y=r)
        inv = f32("real_div", x=f32("rsqrt", x=f32("add", x=f32("mul", x=ratio, y=ratio),
                                                     y=1.0)), y=r)  # fmt: skip
        normed = f32("mul", x=x, y=inv)
        scaled = f32("mul", x=normed, y=self.weight(weight))
        if not offset:
            return scaled
        # n * (offset + w) as n * w + offset * n: an offset added to the weight constant would be
        # folded into a new constant, and the package's weights are read back by their names
        return f32("add", x=scaled, y=normed if offset == 1 else f32("mul", x=normed, y=offset))

    def split_heads(self, x, n_heads: int, head_dim: int):
        mb = self.mb
        return mb.transpose(x=mb.reshape(x=x, shape=[-1, n_heads, head_dim]), perm=[1, 0, 2])

    def merge_heads(self, x):
        mb = self.mb
        n_heads, _, head_dim = x.shape
        return mb.reshape(x=mb.transpose(x=x, perm=[1, 0, 2]), shape=[-1, n_heads * head_dim])

    def rope_tables(self, positions, inv_freq: np.ndarray):
        angles = np.arange(self.context, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)
        # float16 values (what the package stores), held as float32 while the graph is built
        cos = np.concatenate([np.cos(angles)] * 2, axis=-1).astype(np.float16).astype(np.float32)
        sin = np.concatenate([np.sin(angles)] * 2, axis=-1).astype(np.float16).astype(np.float32)
        mb = self.mb
        self._tables += 1  # a second table (Gemma 3's sliding layers) needs names of its own
        tag = "" if self._tables == 1 else f"_{self._tables}"
        cos = mb.gather(x=mb.const(val=cos, name="rope_cos" + tag), indices=positions, axis=0)
        sin = mb.gather(x=mb.const(val=sin, name="rope_sin" + tag), indices=positions, axis=0)
        return cos, sin

    def rope(self, x, tables):
        mb = self.mb
        cos, sin = tables
        half = x.shape[-1] // 2
        first = mb.slice_by_index(x=x, begin=[0, 0, 0], end=[0, 0, half],
                                  end_mask=[True, True, False])  # fmt: skip
        second = mb.slice_by_index(x=x, begin=[0, 0, half], end=[0, 0, 0],
                                   end_mask=[True, True, True])  # fmt: skip
        rotated = mb.concat(values=[mb.mul(x=second, y=-1.0), first], axis=-1)
        return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rotated, y=sin))

    def causal_mask(self, positions, window: int | None):
        mb = self.mb
        keys = mb.range_1d(start=0, end=self.end, step=1)
        q = mb.expand_dims(x=positions, axes=[1])  # (tokens, 1)
        k = mb.expand_dims(x=keys, axes=[0])  # (1, end)
        allowed = mb.cast(x=mb.greater_equal(x=q, y=k), dtype="fp32")
        if window is not None:
            recent = mb.cast(x=mb.greater(x=k, y=mb.sub(x=q, y=window)), dtype="fp32")
            allowed = mb.mul(x=allowed, y=recent)
        return mb.mul(x=mb.sub(x=1.0, y=allowed), y=MASKED)  # (tokens, end), additive

    def _write(self, cache, layer: int, update):
        """`cache` with `update` (kv_heads, tokens, dim) written at block `layer`'s slots
        begin..end, and that block's slots 0..end read back as (kv_heads, end, dim)."""
        mb = self.mb
        update = mb.cast(x=mb.expand_dims(x=update, axes=[0, 1]), dtype="fp16")  # as the state
        written = mb.slice_update(
            x=cache,
            update=update,
            begin=self._vector(layer, 0, 0, self.begin, 0),
            end=self._vector(layer + 1, 1, self.n_kv, self.end, self.head_dim),
        )
        read = mb.slice_by_index(
            x=written,
            begin=[layer, 0, 0, 0, 0],
            end=self._vector(layer + 1, 1, self.n_kv, self.end, self.head_dim),
        )
        read = mb.cast(x=mb.reshape(x=read, shape=[self.n_kv, -1, self.head_dim]), dtype="fp32")
        return written, read

    def attention(self, layer: int, q, k, v, mask, scale: float, soft_cap=None):
        mb = self.mb
        self.keys, keys = self._write(self.keys, layer, k)
        self.keys = mb.coreml_update_state(state=self.key_state, value=self.keys)
        self.values, values = self._write(self.values, layer, v)
        self.values = mb.coreml_update_state(state=self.value_state, value=self.values)
        if self.unwritten is None:  # layer 0 has written this call's tokens: the rest are holes
            seen = mb.reduce_max(x=mb.abs(x=keys), axes=[0, 2])  # (end,)
            written = mb.cast(x=mb.greater(x=seen, y=0.0), dtype="fp32")
            self.unwritten = mb.mul(x=mb.sub(x=1.0, y=written), y=MASKED)
        n_heads = q.shape[0]
        group = n_heads // self.n_kv
        if group > 1:  # scaled_dot_product_attention does not broadcast grouped KV heads
            keys, values = (
                mb.reshape(
                    x=mb.tile(x=mb.expand_dims(x=t, axes=[1]), reps=[1, group, 1, 1]),
                    shape=[n_heads, -1, self.head_dim],
                )  # fmt: skip
                for t in (keys, values)
            )
        bias = mb.add(x=mask, y=self.unwritten)
        if soft_cap is not None:  # capped scores: the fused op cannot hold the tanh
            scores = mb.matmul(x=mb.mul(x=q, y=float(scale)), y=keys, transpose_y=True)
            scores = mb.add(x=self.soft_cap(scores, soft_cap), y=bias)
            return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=values)
        natural = 1.0 / np.sqrt(self.head_dim)  # the op's own, fixed scale
        if abs(scale - natural) > 1e-12 * natural:
            q = mb.mul(x=q, y=float(scale / natural))
        return mb.scaled_dot_product_attention(query=q, key=keys, value=values, attn_mask=bias)

    def silu(self, x):
        return self.mb.silu(x=x)

    def gelu_tanh(self, x):
        return self.mb.gelu(x=x, mode="TANH_APPROXIMATION")

    def soft_cap(self, x, cap: float):
        mb = self.mb
        return mb.mul(x=mb.tanh(x=mb.mul(x=x, y=float(1 / cap))), y=float(cap))

    def split(self, x, sizes):
        return list(self.mb.split(x=x, split_sizes=list(sizes), axis=-1))

    def mul(self, a, b):
        return self.mb.mul(x=a, y=b)

    def scale(self, x, factor: float):
        return self._f32("mul", x=x, y=np.float32(factor))

    def add(self, a, b):
        return self._f32("add", x=a, y=b)

    def tail(self, x, first: int):
        if first == 0:
            return x
        return self.mb.slice_by_index(x=x, begin=[first, 0], end=[0, 0], end_mask=[True, True])
