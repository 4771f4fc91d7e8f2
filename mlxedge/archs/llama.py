"""Llama (and Llama 2/3, SmolLM, TinyLlama...): the base llama-family decoder, no extras."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LlamaFamily


@dataclass(frozen=True)
class Llama(LlamaFamily):
    """model_type "llama"."""

    model_type = "llama"

    def extra_layer_tensors(self) -> tuple[str, ...]:
        # Some llama checkpoints carry projection biases (attention_bias / mlp_bias).
        extras: tuple[str, ...] = ()
        if self.config.get("attention_bias"):
            extras += tuple(f"self_attn.{p}_proj.bias" for p in "qkvo")
        if self.config.get("mlp_bias"):
            extras += tuple(f"mlp.{p}_proj.bias" for p in ("gate", "up", "down"))
        return extras
