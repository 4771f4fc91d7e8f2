"""Qwen3: the llama layout plus per-head RMSNorms on queries and keys, and an explicit head_dim."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LlamaFamily


@dataclass(frozen=True)
class Qwen3(LlamaFamily):
    """model_type "qwen3"."""

    model_type = "qwen3"
    required_keys = LlamaFamily.required_keys + ("head_dim",)

    def extra_layer_tensors(self) -> tuple[str, ...]:
        return ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
