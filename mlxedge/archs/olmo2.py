"""OLMo 2: the Llama decoder with its norms moved — no norm before attention or the MLP; RMSNorms on
the whole query and key projections (before the heads are split and rotated); and RMSNorms on the
attention's and the MLP's outputs before each residual (`post_attention_layernorm`,
`post_feedforward_layernorm`). In GGUF ("olmo2") q/k rows keep Hugging Face's order (llama.cpp
rotates them NeoX-style).
"""

from __future__ import annotations

import gguf

from .llama import Llama
from .ops import Ops, Value
from .spec import Role


class Olmo2(Llama):
    """model_type "olmo2"."""

    model_type = "olmo2"
    hf_class = "Olmo2ForCausalLM"
    gguf_arch = gguf.MODEL_ARCH.OLMO2
    gguf_permuted_qk = False
    defaults = Llama.defaults | {"rope_theta": 10000.0, "rms_norm_eps": 1e-5}
    _pre_norms = False
    gguf_tied_fallback = False  # llama.cpp's olmo2 requires output.weight

    def _entries(self):
        s = self.spec
        q_rows, kv_rows = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        for e in super()._entries():
            yield e
            p = f"model.layers.{e.layer}."
            if e.name == p + "self_attn.v_proj.weight":
                yield self._entry(p + "self_attn.q_norm.weight", (q_rows,), Role.NORM, e.layer)
                yield self._entry(p + "self_attn.k_norm.weight", (kv_rows,), Role.NORM, e.layer)
            if e.name == p + "mlp.down_proj.weight":
                yield self._entry(p + "post_feedforward_layernorm.weight", (s.hidden_size,),
                                  Role.NORM, e.layer)  # fmt: skip

    def block(self, ops: Ops, i: int, x: Value, context: dict) -> Value:
        s, p = self.spec, f"model.layers.{i}."
        eps = s.rms_norm_eps
        q = ops.rms_norm(ops.linear(x, p + "self_attn.q_proj", s.qkv_bias),
                         p + "self_attn.q_norm.weight", eps)  # fmt: skip
        k = ops.rms_norm(ops.linear(x, p + "self_attn.k_proj", s.qkv_bias),
                         p + "self_attn.k_norm.weight", eps)  # fmt: skip
        v = ops.linear(x, p + "self_attn.v_proj", s.qkv_bias)
        attended = self.attend(ops, i, *self.heads(ops, q, k, v), context)
        out = ops.linear(attended, p + "self_attn.o_proj", s.o_bias)
        x = ops.add(x, ops.rms_norm(out, p + "post_attention_layernorm.weight", eps))
        gate = ops.linear(x, p + "mlp.gate_proj", s.mlp_bias)
        up = ops.linear(x, p + "mlp.up_proj", s.mlp_bias)
        out = ops.linear(ops.mul(ops.silu(gate), up), p + "mlp.down_proj", s.mlp_bias)
        return ops.add(x, ops.rms_norm(out, p + "post_feedforward_layernorm.weight", eps))
