"""Mistral: the llama decoder with a sliding attention window on every block.

Hugging Face (MistralConfig) applies `sliding_window` to every layer when it is set, and defaults
it to 4096 when the config does not say; Mistral-7B-v0.2 and later state `null` (full attention).
mlx-lm runs Mistral with its llama class and llama.cpp with its llama architecture, neither with a
window: beyond `sliding_window` tokens they differ from Hugging Face, and the reference here
follows Hugging Face. In GGUF a Mistral model is a "llama" model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .llama import Llama


class Mistral(Llama):
    """model_type "mistral"."""

    model_type = "mistral"
    hf_class = "MistralForCausalLM"
    defaults: ClassVar[dict[str, Any]] = Llama.defaults | {
        "max_position_embeddings": 4096 * 32,
    }

    def _windows(self, n_layers: int) -> tuple[int | None, ...]:
        window = self.config.get("sliding_window", 4096)  # MistralConfig's default
        return (self._int("sliding_window", window) if window else None,) * n_layers

    def _biases(self) -> tuple[bool, bool, bool]:
        return False, False, False
