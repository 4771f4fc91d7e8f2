"""Gemma 2: the Llama decoder reshaped by Google — RMSNorms that scale by 1 + w; the embeddings
scaled by sqrt(hidden); a norm after attention and one after the MLP as well as before each; a
GeLU (tanh approximation) gate; the attention scaled by `query_pre_attn_scalar`^-1/2; sliding-window
layers (every other one, from the first) interleaved with global ones; attention scores and the
logits soft-capped (cap * tanh(x / cap)); the head tied to the embedding.

In GGUF ("gemma2") the norms are stored as 1 + w, as llama.cpp's converter writes them
(`TensorEntry.gguf_offset`); q/k rows keep Hugging Face's order (NeoX rotary); which layers slide
travels as `gemma2.attention.sliding_window_pattern` (one flag per layer). llama.cpp derives the
attention scale from the geometry instead of reading it, so a model whose scale differs from its
rule is refused rather than exported wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import gguf
import numpy as np

from ..errors import MlxedgeError
from .llama import _GGUF_FIX, Llama, gguf_positive_number
from .ops import Ops, Value
from .spec import ModelSpec, Role, TensorEntry

SLIDING, FULL = "sliding_attention", "full_attention"  # Hugging Face's `layer_types`
GELU_TANH = ("gelu_pytorch_tanh",)  # GeLU's tanh approximation, as Hugging Face names it


class Gemma2(Llama):
    """model_type "gemma2"."""

    model_type = "gemma2"
    hf_class = "Gemma2ForCausalLM"
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    gguf_permuted_qk = False
    float32_residual = True  # the residual stream of trained Gemmas exceeds float16's range
    # Gemma2Config's defaults
    defaults = Llama.defaults | {
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    # llama.cpp's 27B model type, whose attention scale is 1/sqrt(hidden / heads) instead of
    # 1/sqrt(head_dim), is recognised by its layer count.
    llama_cpp_27b_layers: ClassVar[int] = 46
    # Soft-capping of the attention scores is part of the family (llama.cpp and mlx-lm always
    # apply it): required. Gemma 3 has none.
    attn_softcap_required: ClassVar[bool] = True
    # mlx-lm's gemma2 always uses the embedding as the head, and llama.cpp's ignores output.weight
    tied_only: ClassVar[bool] = True
    # what llama.cpp assumes when a file lacks the sliding window / its pattern (every n-th global)
    llama_cpp_default_window: ClassVar[int | None] = 4096
    llama_cpp_default_pattern: ClassVar[int] = 2

    # ----------------------------------------------------------------------------- the spec

    def _head_dim(self) -> int:
        return self._int("head_dim")  # Gemma2Config's default is 256, whatever the width

    def _activation(self) -> str:
        act = self._get("hidden_activation")
        if act not in GELU_TANH:
            raise self._bad("hidden_activation", act, f"not supported ({GELU_TANH[0]} is)")
        return "gelu_tanh"

    def _biases(self) -> tuple[bool, bool, bool]:
        if self._bool("attention_bias"):
            raise self._bad("attention_bias", True, f"not supported for {self.model_type}")
        return False, False, False

    def _is_sliding(self, layer: int) -> bool:
        """Hugging Face's rule when the config has no `layer_types`: even layers slide."""
        return layer % 2 == 0

    def _stated(self, key: str) -> Any:
        """The config's value, null included (null turns a feature off); the default if absent."""
        return self.config[key] if key in self.config else self.defaults.get(key)

    def _windows(self, n_layers: int) -> tuple[int | None, ...]:
        if self._stated("sliding_window") is None:
            return (None,) * n_layers
        window = self._int("sliding_window")
        types = self.config.get("layer_types")
        if types is None:
            return tuple(window if self._is_sliding(i) else None for i in range(n_layers))
        if not isinstance(types, list) or len(types) != n_layers or set(types) - {SLIDING, FULL}:
            raise self._bad("layer_types", types, f"not {n_layers} of {SLIDING!r} / {FULL!r}")
        return tuple(window if t == SLIDING else None for t in types)

    def _softcap(self, key: str) -> float | None:
        return None if self._stated(key) is None else self._float(key)

    def _spec(self) -> ModelSpec:
        spec = super()._spec()
        if not spec.tied and self.tied_only:
            raise self._bad("tie_word_embeddings", False,
                            "not supported: mlx-lm and llama.cpp run Gemma 2 with the embedding "
                            "as its head")  # fmt: skip
        attn_cap = self._softcap("attn_logit_softcapping")
        if (attn_cap is None) == self.attn_softcap_required:
            raise self._bad("attn_logit_softcapping", attn_cap,
                            "required for gemma2" if attn_cap is None else
                            f"not supported for {self.model_type} (mlx-lm and llama.cpp do not "
                            "apply it)")  # fmt: skip
        return dataclasses.replace(
            spec,
            norm_offset=1.0,
            embedding_multiplier=float(np.float32(math.sqrt(spec.hidden_size))),
            attention_multiplier=self._float("query_pre_attn_scalar") ** -0.5,
            attn_softcap=attn_cap,
            final_softcap=self._softcap("final_logit_softcapping"),
        )

    # ----------------------------------------------------------------------- the tensor table

    def _entry(self, name: str, shape, role: Role, layer: int | None = None) -> TensorEntry:
        entry = super()._entry(name, shape, role, layer)
        # llama.cpp's converter stores every Gemma norm as 1 + w, what the norm multiplies by
        return dataclasses.replace(entry, gguf_offset=1.0) if role == Role.NORM else entry

    def _entries(self):
        """Llama's table with a norm before and one after the MLP."""
        d = (self.spec.hidden_size,)
        for e in super()._entries():
            yield e
            p = f"model.layers.{e.layer}."
            if e.name == p + "post_attention_layernorm.weight":
                yield self._entry(p + "pre_feedforward_layernorm.weight", d, Role.NORM, e.layer)
            if e.name == p + "mlp.down_proj.weight":
                yield self._entry(p + "post_feedforward_layernorm.weight", d, Role.NORM, e.layer)

    # ----------------------------------------------------------------------- the forward pass

    def _norm(self, ops: Ops, x: Value, weight: str) -> Value:
        return ops.rms_norm(x, weight, self.spec.rms_norm_eps, self.spec.norm_offset)

    def block(self, ops: Ops, i: int, x: Value, context: dict) -> Value:
        s, p = self.spec, f"model.layers.{i}."
        h = self._norm(ops, x, p + "input_layernorm.weight")
        q, k, v = self.heads(ops, *(ops.linear(h, p + f"self_attn.{n}_proj") for n in "qkv"))
        if s.qk_norm:
            q = self._norm(ops, q, p + "self_attn.q_norm.weight")
            k = self._norm(ops, k, p + "self_attn.k_norm.weight")
        out = ops.linear(self.attend(ops, i, q, k, v, context), p + "self_attn.o_proj")
        x = ops.add(x, self._norm(ops, out, p + "post_attention_layernorm.weight"))
        h = self._norm(ops, x, p + "pre_feedforward_layernorm.weight")
        gate = ops.linear(h, p + "mlp.gate_proj")
        up = ops.linear(h, p + "mlp.up_proj")
        out = ops.linear(ops.mul(ops.gelu_tanh(gate), up), p + "mlp.down_proj")
        return ops.add(x, self._norm(ops, out, p + "post_feedforward_layernorm.weight"))

    # ------------------------------------------------------------------------ configs written

    def output_config(self) -> dict:
        """Every value the forward uses, written out: mlx-lm's model classes default several of
        them differently from Hugging Face's config classes (its gemma2 query_pre_attn_scalar is
        144, its gemma3_text sliding window 512)."""
        s = self.spec
        sliding = [w for w in s.windows if w]
        return super().output_config() | {
            "head_dim": s.head_dim,
            "num_key_value_heads": s.n_kv_heads,
            "rms_norm_eps": s.rms_norm_eps,
            "rope_theta": s.rope_theta,
            "max_position_embeddings": s.max_position_embeddings,
            "query_pre_attn_scalar": self._get("query_pre_attn_scalar"),
            "hidden_activation": self._get("hidden_activation"),
            "attn_logit_softcapping": s.attn_softcap,
            "final_logit_softcapping": s.final_softcap,
            "sliding_window": sliding[0] if sliding else None,
        }

    # ---------------------------------------------------------------------------------- GGUF

    def add_gguf_hyperparameters(self, writer: gguf.GGUFWriter) -> None:
        super().add_gguf_hyperparameters(writer)
        s = self.spec
        self._check_llama_cpp_attention_scale()
        if s.attn_softcap is not None:
            writer.add_attn_logit_softcapping(s.attn_softcap)
        if s.final_softcap is not None:
            writer.add_final_logit_softcapping(s.final_softcap)
        sliding = sorted({w for w in s.windows if w})
        if len(sliding) > 1:
            raise MlxedgeError(f"sliding windows of {sliding} tokens: GGUF holds one size",
                               path=self.where)  # fmt: skip
        if sliding:
            writer.add_sliding_window(sliding[0])
        # one flag per layer: llama.cpp's defaults (every 2nd, every 6th layer global) otherwise
        writer.add_sliding_window_pattern([w is not None for w in s.windows])
        writer.add_rope_freq_base_swa(s.local_rope_theta or s.rope_theta)

    def _check_llama_cpp_attention_scale(self) -> None:
        s = self.spec
        if s.n_layers == self.llama_cpp_27b_layers:
            used, rule = 1 / math.sqrt(s.hidden_size // s.n_heads), "hidden_size / heads"
        else:
            used, rule = 1 / math.sqrt(s.head_dim), "head_dim"
        if abs(s.attention_scale - used) > 1e-6 * used:
            raise MlxedgeError(
                f"query_pre_attn_scalar {self._get('query_pre_attn_scalar')} is not {rule}, the "
                f"value llama.cpp's {self.gguf_arch_name} always uses for a model of "
                f"{s.n_layers} layers",
                path=self.where,
                fix="export this model to MLX or Core ML instead; llama.cpp would compute it wrong",
            )

    @classmethod
    def attention_bias_from_gguf(cls, shapes: dict) -> dict:
        return {"attention_bias": False}

    @classmethod
    def config_from_gguf(cls, meta: dict, shapes: dict, path) -> dict:
        config = super().config_from_gguf(meta, shapes, path)
        del config["hidden_act"]
        arch = cls.gguf_arch_name_of()
        n_layers, head_dim = config["num_hidden_layers"], config["head_dim"]
        is_27b = n_layers == cls.llama_cpp_27b_layers
        config |= {
            "hidden_activation": GELU_TANH[0],
            "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"]
            if is_27b else head_dim,
        }  # fmt: skip
        keys = gguf.Keys
        for name, template in (
            ("attn_logit_softcapping", keys.LLM.ATTN_LOGIT_SOFTCAPPING),
            ("final_logit_softcapping", keys.LLM.FINAL_LOGIT_SOFTCAPPING),
        ):
            key = template.format(arch=arch)
            value = meta.get(key, cls.defaults.get(name))
            config[name] = None if value is None else gguf_positive_number(key, value, path)
        config |= cls._windows_from_gguf(meta, n_layers, path)
        cls._rope_local_from_gguf(config, path)
        return config

    @classmethod
    def _windows_from_gguf(cls, meta: dict, n_layers: int, path) -> dict[str, Any]:
        """`sliding_window` and `layer_types` from the file, llama.cpp's defaults where absent."""
        arch = cls.gguf_arch_name_of()
        key = gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch)
        window = meta.get(key, cls.llama_cpp_default_window)
        if window is None or window == 0:
            return {"sliding_window": None}
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
            raise MlxedgeError(f"metadata key {key} is {window!r:.40}, not a whole number",
                               path=path, fix=_GGUF_FIX)  # fmt: skip
        pattern_key = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)
        pattern = meta.get(pattern_key, cls.llama_cpp_default_pattern)
        if isinstance(pattern, list):
            if len(pattern) != n_layers or not all(isinstance(f, bool) for f in pattern):
                raise MlxedgeError(f"metadata key {pattern_key} is not {n_layers} flags",
                                   path=path, fix=_GGUF_FIX)  # fmt: skip
            flags = pattern
        elif isinstance(pattern, (int, np.integer)) and not isinstance(pattern, bool):
            n = int(pattern)  # llama.cpp's rule: the last of every n layers is global
            flags = [n == 0 or i % n < n - 1 for i in range(n_layers)]
        else:
            raise MlxedgeError(f"metadata key {pattern_key} is {pattern!r:.40}",
                               path=path, fix=_GGUF_FIX)  # fmt: skip
        rope_key = gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=arch)
        out: dict[str, Any] = {
            "sliding_window": int(window),
            "layer_types": [SLIDING if f else FULL for f in flags],
        }
        if meta.get(rope_key) is not None:
            out["rope_local_base_freq"] = gguf_positive_number(rope_key, meta[rope_key], path)
        return out

    @classmethod
    def _rope_local_from_gguf(cls, config: dict, path) -> None:
        """Gemma 2 has one rotary base: a file whose sliding layers use another is refused."""
        local = config.pop("rope_local_base_freq", None)
        if local is not None and local != config["rope_theta"]:
            raise MlxedgeError(
                f"the sliding layers' rotary base ({local}) differs from the global one "
                f"({config['rope_theta']}), which Gemma 2 cannot express",
                path=path,
            )
