"""Qwen2 / Qwen2.5: the llama layout plus biases on the q, k and v projections."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LlamaFamily


@dataclass(frozen=True)
class Qwen2(LlamaFamily):
    """model_type "qwen2"."""

    model_type = "qwen2"

    def extra_layer_tensors(self) -> tuple[str, ...]:
        return ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
