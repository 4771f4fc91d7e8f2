"""Phi-3 (Phi-3 mini/medium, Phi-3.5 mini, Phi-4 mini): the Llama decoder with its projections
fused — one `qkv_proj` (queries, keys, values stacked) and one `gate_up_proj` (gate, then up) —
and the head size hidden / heads. Sliding windows follow Hugging Face (every layer, when the
config sets `sliding_window`).

Phi-3's long-context rope scaling ("longrope", older "su": Phi-3 mini 128k, Phi-3.5 mini) divides
each rotary frequency by a factor — the short factors up to `original_max_position_embeddings`
tokens, the long ones beyond, as Hugging Face chooses per sequence — and scales queries and keys
by an attention factor, folded here into the attention scale. The reference uses the short
factors, so it is the model up to that length (4096 tokens). llama.cpp chooses by its context
size the same way; mlx-lm applies the long factors at every length, so an MLX folder of such a
model differs from it on shorter prompts (a warning says so).

In GGUF ("phi3") the fused tensors are `attn_qkv` (which llama.cpp's mixes treat as attn_v) and a
double-height `ffn_up`; q/k rows keep Hugging Face's order (NeoX rotary); longrope travels as
`rope_factors_long` / `rope_factors_short` tensors and `phi3.rope.scaling.attn_factor`.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import gguf
import numpy as np

from ..errors import MlxedgeError
from .llama import Llama
from .ops import Ops, Value
from .spec import ModelSpec, Role, TensorEntry

log = logging.getLogger(__name__)
_FACTORS = {"long": "rope_factors_long.weight", "short": "rope_factors_short.weight"}


class Phi3(Llama):
    """model_type "phi3"."""

    model_type = "phi3"
    hf_class = "Phi3ForCausalLM"
    gguf_arch = gguf.MODEL_ARCH.PHI3
    gguf_permuted_qk = False
    # Phi3Config's defaults
    defaults = Llama.defaults | {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
    rope_kinds = ("longrope", "su")

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
        spec = super()._spec()
        if not self._longrope(spec):
            return spec
        for key in ("short_factor", "long_factor"):
            factors = spec.rope_scaling.get(key)
            if (
                not isinstance(factors, list)
                or len(factors) != spec.head_dim // 2
                or not all(
                    isinstance(f, (int, float)) and math.isfinite(f) and f > 0 for f in factors
                )
            ):
                raise self._bad(f"rope_scaling.{key}", factors,
                                f"not {spec.head_dim // 2} positive numbers")  # fmt: skip
        m = self.attention_factor(spec)
        return dataclasses.replace(spec, attention_multiplier=m * m / math.sqrt(spec.head_dim))

    @staticmethod
    def _longrope(spec: ModelSpec) -> bool:
        scaling = spec.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type")) in ("longrope", "su")

    def _original_context(self) -> int:
        key = "original_max_position_embeddings"
        if self.config.get(key) is None and (self.config.get("rope_scaling") or {}).get(key):
            return self._int(key, self.config["rope_scaling"][key])
        return self._int(key, self.config.get(key) or 4096)

    def attention_factor(self, spec: ModelSpec) -> float:
        """What longrope scales queries and keys by: the config's `attention_factor`, else
        sqrt(1 + ln(s) / ln(original)) for s = max_position_embeddings / original (1 if s <= 1)."""
        stated = spec.rope_scaling.get("attention_factor")
        if stated is not None:
            return float(stated)
        original = self._original_context()
        s = spec.max_position_embeddings / original
        return 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(original))

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
        qkv = ops.split(ops.linear(h, p + "self_attn.qkv_proj"), (q_width, kv_width, kv_width))
        attended = self.attend(ops, i, *self.heads(ops, *qkv), context)
        x = ops.add(x, ops.linear(attended, p + "self_attn.o_proj"))
        h = ops.rms_norm(x, p + "post_attention_layernorm.weight", s.rms_norm_eps)
        gate, up = ops.split(ops.linear(h, p + "mlp.gate_up_proj"), (s.intermediate_size,) * 2)
        return ops.add(x, ops.linear(ops.mul(ops.silu(gate), up), p + "mlp.down_proj"))

    def output_config(self) -> dict:
        if self._longrope(self.spec):
            log.warning("%s: mlx-lm applies Phi-3's long rope factors at every length, so the MLX "
                        "folder differs from the model on prompts under %d tokens (GGUF and Core "
                        "ML do not)", self.where, self._original_context())  # fmt: skip
        return super().output_config() | {
            "num_key_value_heads": self.spec.n_kv_heads,
            "rms_norm_eps": self.spec.rms_norm_eps,
            "rope_theta": self.spec.rope_theta,
            "max_position_embeddings": self.spec.max_position_embeddings,
        }

    def add_gguf_hyperparameters(self, writer: gguf.GGUFWriter) -> None:
        super().add_gguf_hyperparameters(writer)
        writer.add_rope_scaling_orig_ctx_len(self._original_context())

    def _add_gguf_rope_scaling(self, writer: gguf.GGUFWriter) -> None:
        if not self._longrope(self.spec):
            return super()._add_gguf_rope_scaling(writer)
        writer.add_rope_scaling_attn_factors(self.attention_factor(self.spec))

    def gguf_computed_tensors(self) -> list[tuple[str, np.ndarray]]:
        """longrope's factors, as llama.cpp's converter writes them (float32, one per
        frequency); llama.cpp picks the long ones when its context exceeds the original."""
        if not self._longrope(self.spec):
            return []
        scaling = self.spec.rope_scaling
        return [(name, np.asarray(scaling[f"{which}_factor"], dtype=np.float32))
                for which, name in _FACTORS.items()]  # fmt: skip

    def gguf_entry(self, gguf_name: str, path) -> TensorEntry:
        if gguf_name in _FACTORS.values():
            raise MlxedgeError(
                f"tensor {gguf_name} (Phi-3's long-context rope factors): importing them is not "
                "supported yet",
                path=path,
                fix="convert the original Hugging Face model instead",
            )
        return super().gguf_entry(gguf_name, path)

    @classmethod
    def attention_bias_from_gguf(cls, shapes: dict) -> dict:
        return {}

    @classmethod
    def config_from_gguf(cls, meta: dict, shapes: dict, path) -> dict:
        config = super().config_from_gguf(meta, shapes, path)
        config.pop("head_dim", None)  # Phi3Config derives it
        return config
