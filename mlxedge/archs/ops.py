"""The operations an architecture's forward pass is written against.

Each architecture writes its decoder once, as calls on an `Ops`; an executor supplies them:
numpy for the reference (`runtime/numpy_ops.py`), a recording executor in the tests, and next
coremltools' MIL builder for Core ML. So that a graph builder with symbolic sequence lengths can
run the same forward:

- values are opaque: a forward never looks at a shape or a value, and branches only on its spec;
- parameters are named, not passed (`linear(x, "model.layers.0.mlp.up_proj")`): the executor
  looks them up (numpy reads arrays, a graph builder makes constants, a recorder checks shapes,
  calibration observes the layer's input);
- positions are an explicit input; rotary angles are looked up from them (`rope_tables`), and
  masks are built from them (`causal_mask`);
- the KV cache is the executor's: `attention` is given the layer index, and an executor with a
  cache reads and writes it there.

Activations are (tokens, features) — one sequence, no batch axis; heads are (heads, tokens, dim).
"""

from __future__ import annotations

from typing import Any, Protocol

Value = Any  # an executor's tensor: a numpy array, a MIL variable, a recorded shape


class Ops(Protocol):
    def embedding(self, table: str, ids: Value) -> Value:
        """Rows `ids` of the named table: (tokens, features)."""
        ...

    def linear(self, x: Value, module: str, bias: bool = False) -> Value:
        """x @ W.T (+ b) with the module's `.weight` (out, in) and, when `bias`, its `.bias`."""
        ...

    def rms_norm(self, x: Value, weight: str, eps: float, offset: float = 0.0) -> Value:
        """RMSNorm over the last axis, scaled by offset + the named weight (Gemma's 1 + w)."""
        ...

    def split_heads(self, x: Value, n_heads: int, head_dim: int) -> Value:
        """(tokens, heads * dim) -> (heads, tokens, dim)."""
        ...

    def merge_heads(self, x: Value) -> Value:
        """(heads, tokens, dim) -> (tokens, heads * dim)."""
        ...

    def rope_tables(self, positions: Value, inv_freq: Any) -> Value:
        """cos and sin of every position's rotary angles, looked up for `positions` (an opaque
        pair the executor hands back to `rope`); `inv_freq` is a constant numpy array."""
        ...

    def rope(self, x: Value, tables: Value) -> Value:
        """Rotate (heads, tokens, dim) by the angles in `tables`, Hugging Face's rotate-half."""
        ...

    def causal_mask(self, positions: Value, window: int | None) -> Value:
        """The additive mask of causal attention, keys older than `window` tokens blocked."""
        ...

    def attention(
        self,
        layer: int,
        q: Value,
        k: Value,
        v: Value,
        mask: Value,
        scale: float,
        soft_cap: float | None = None,
    ) -> Value:
        """softmax(s + mask) v with s = q k^T * scale, or cap * tanh(s / cap) when `soft_cap`
        is a cap (Gemma 2); KV heads shared by groups of query heads; block `layer`'s cache
        (where the executor keeps one) is read and written here."""
        ...

    def silu(self, x: Value) -> Value: ...

    def gelu_tanh(self, x: Value) -> Value:
        """GeLU's tanh approximation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
        ...

    def soft_cap(self, x: Value, cap: float) -> Value:
        """cap * tanh(x / cap): x squashed into (-cap, cap)."""
        ...

    def split(self, x: Value, sizes: tuple[int, ...]) -> list[Value]:
        """x cut along its last axis into parts of these widths (a fused projection's parts)."""
        ...

    def mul(self, a: Value, b: Value) -> Value: ...

    def scale(self, x: Value, factor: float) -> Value:
        """x times a constant (float32)."""
        ...

    def add(self, a: Value, b: Value) -> Value: ...

    def tail(self, x: Value, first: int) -> Value:
        """Rows first.. of (tokens, features): positions before `first` skip the output head."""
        ...
