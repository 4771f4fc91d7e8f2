"""Phi-3 (Phi-3 mini/medium, Phi-3.5 mini, Phi-4 mini): the Llama decoder with its projections
fused — one `qkv_proj` (queries, keys, values stacked) and one `gate_up_proj` (gate, then up) —
and the head size hidden / heads. Sliding windows follow Hugging Face (every layer, when the
config sets `sliding_window`).

In GGUF ("phi3") the fused tensors are `attn_qkv` (which llama.cpp's mixes treat as attn_v) and a
double-height `ffn_up`; q/k rows keep Hugging Face's order (NeoX rotary). Phi-3's own rope
scaling ("longrope"/"su", the 128k models) is refused for now: mlx-lm always applies the long
factors while Hugging Face and llama.cpp switch by context length, so no single reference would
match both runtimes.
"""

from __future__ import annotations

import gguf

from ..errors import MlxedgeError
from .llama import Llama
from .ops import Ops, Value
from .spec import ModelSpec, Role


class Phi3(Llama):
    """model_type "phi3"."""

    model_type = "phi3"
    hf_class = "Phi3ForCausalLM"
    gguf_arch = gguf.MODEL_ARCH.PHI3
    gguf_permuted_qk = False
    # Phi3Config's defaults
    defaults = Llama.defaults | {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096}

    def _head_dim(self) -> int:
        return self._derived_head_dim()

    def _biases(self) -> tuple[bool, bool, bool]:
        return False, False, False

    def _windows(self, n_layers: int) -> tuple[int | None, ...]:
        if self.config.get("sliding_window") is None:
            return (None,) * n_layers
        return (self._int("sliding_window"),) * n_layers

    def _spec(self) -> ModelSpec:
        factor = self.config.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise self._bad("partial_rotary_factor", factor, "not supported (1.0 is)")
        scaling = self.config.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind in ("longrope", "su"):
            raise MlxedgeError(
                f"rope scaling {kind!r} (Phi-3's long-context models) is not supported yet",
                path=self.where,
                fix="use a 4k-context Phi-3 (no rope_scaling)",
            )
        return super()._spec()

    def _entries(self):
        s = self.spec
        entry = self._entry
        d, ff = s.hidden_size, s.intermediate_size
        qkv_rows = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
        yield entry("model.embed_tokens.weight", (s.vocab_size, d), Role.EMBEDDING)
        for i in range(s.n_layers):
            p = f"model.layers.{i}."
            yield entry(p + "input_layernorm.weight", (d,), Role.NORM, i)
            yield entry(p + "self_attn.qkv_proj.weight", (qkv_rows, d), Role.LINEAR, i)
            yield entry(p + "self_attn.o_proj.weight", (d, s.n_heads * s.head_dim), Role.LINEAR, i)
            yield entry(p + "post_attention_layernorm.weight", (d,), Role.NORM, i)
            yield entry(p + "mlp.gate_up_proj.weight", (2 * ff, d), Role.LINEAR, i)
            yield entry(p + "mlp.down_proj.weight", (d, ff), Role.LINEAR, i)
        yield entry("model.norm.weight", (d,), Role.NORM)
        if not s.tied:
            yield entry("lm_head.weight", (s.vocab_size, d), Role.HEAD)

    def block(self, ops: Ops, i: int, x: Value, context: dict) -> Value:
        s, p = self.spec, f"model.layers.{i}."
        h = ops.rms_norm(x, p + "input_layernorm.weight", s.rms_norm_eps)
        q_width, kv_width = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        q, k, v = ops.split(ops.linear(h, p + "self_attn.qkv_proj"), (q_width, kv_width, kv_width))
        q = ops.split_heads(q, s.n_heads, s.head_dim)
        k = ops.split_heads(k, s.n_kv_heads, s.head_dim)
        v = ops.split_heads(v, s.n_kv_heads, s.head_dim)
        rope = self.rope_of(context, i)
        q, k = ops.rope(q, rope), ops.rope(k, rope)
        attended = ops.attention(i, q, k, v, context["masks"][s.windows[i]], s.attention_scale)
        x = ops.add(x, ops.linear(ops.merge_heads(attended), p + "self_attn.o_proj"))
        h = ops.rms_norm(x, p + "post_attention_layernorm.weight", s.rms_norm_eps)
        gate, up = ops.split(ops.linear(h, p + "mlp.gate_up_proj"), (s.intermediate_size,) * 2)
        return ops.add(x, ops.linear(ops.mul(ops.silu(gate), up), p + "mlp.down_proj"))

    def output_config(self) -> dict:
        return super().output_config() | {
            "num_key_value_heads": self.spec.n_kv_heads,
            "rms_norm_eps": self.spec.rms_norm_eps,
            "rope_theta": self.spec.rope_theta,
            "max_position_embeddings": self.spec.max_position_embeddings,
        }

    def add_gguf_hyperparameters(self, writer: gguf.GGUFWriter) -> None:
        super().add_gguf_hyperparameters(writer)
        writer.add_rope_scaling_orig_ctx_len(
            int(self.config.get("original_max_position_embeddings")
                or self.spec.max_position_embeddings)
        )  # fmt: skip

    @classmethod
    def attention_bias_from_gguf(cls, shapes: dict) -> dict:
        return {}

    @classmethod
    def config_from_gguf(cls, meta: dict, shapes: dict, path) -> dict:
        config = super().config_from_gguf(meta, shapes, path)
        config.pop("head_dim", None)  # Phi3Config derives it
        return config
