"""Mistral: the llama layout (mlx-lm loads it with its llama class)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LlamaFamily


@dataclass(frozen=True)
class Mistral(LlamaFamily):
    """model_type "mistral"."""

    model_type = "mistral"
