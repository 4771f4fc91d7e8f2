"""Qwen3: the Qwen2 decoder without q/k/v biases, with per-head RMSNorms on queries and keys
(before the rotary), and a head size of its own (`head_dim`, 128 by default, not hidden / heads).
"""

from __future__ import annotations

import gguf

from .qwen2 import Qwen2


class Qwen3(Qwen2):
    """model_type "qwen3"."""

    model_type = "qwen3"
    hf_class = "Qwen3ForCausalLM"
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    defaults = Qwen2.defaults | {"max_position_embeddings": 40960, "head_dim": 128}

    def _head_dim(self) -> int:
        return self._int("head_dim")

    def _biases(self) -> tuple[bool, bool, bool]:
        attention = self._bool("attention_bias")
        return attention, attention, False

    def _qk_norm(self) -> bool:
        return True

    def llama_cpp_is_70b(self) -> bool:
        return False  # llama.cpp's qwen3 has no 70B type

    @classmethod
    def attention_bias_from_gguf(cls, shapes: dict) -> dict:
        return {"attention_bias": False, "mlp_bias": False}
