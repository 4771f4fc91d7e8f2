"""Granite (IBM Granite 3.x dense): the Llama decoder with four multipliers — the embeddings
scaled by `embedding_multiplier`, each residual branch by `residual_multiplier`, the attention
by `attention_multiplier` in place of 1/sqrt(head_dim), and the logits divided by
`logits_scaling`. The head size is hidden / heads. In GGUF ("granite") the multipliers travel as
`granite.embedding_scale`, `granite.residual_scale`, `granite.attention.scale` and
`granite.logit_scale`, and q/k rows are permuted as for llama.
"""

from __future__ import annotations

import dataclasses

import gguf

from ..errors import MlxedgeError
from .llama import _GGUF_FIX, Llama, gguf_positive_number
from .spec import ModelSpec

# config key -> the gguf-py key template that carries it
_MULTIPLIERS = {
    "embedding_multiplier": gguf.Keys.LLM.EMBEDDING_SCALE,
    "residual_multiplier": gguf.Keys.LLM.RESIDUAL_SCALE,
    "attention_multiplier": gguf.Keys.Attention.SCALE,
    "logits_scaling": gguf.Keys.LLM.LOGIT_SCALE,
}


class Granite(Llama):
    """model_type "granite"."""

    model_type = "granite"
    hf_class = "GraniteForCausalLM"
    gguf_arch = gguf.MODEL_ARCH.GRANITE
    # GraniteConfig's defaults
    defaults = Llama.defaults | {name: 1.0 for name in _MULTIPLIERS}

    def _head_dim(self) -> int:
        return self._derived_head_dim()

    def _spec(self) -> ModelSpec:
        spec = super()._spec()
        values = {name: self._float(name) for name in _MULTIPLIERS}
        for name, value in values.items():
            if not value > 0:
                raise self._bad(name, value, "not a positive number")
        return dataclasses.replace(spec, **values)

    def add_gguf_hyperparameters(self, writer: gguf.GGUFWriter) -> None:
        super().add_gguf_hyperparameters(writer)
        s = self.spec
        writer.add_embedding_scale(s.embedding_multiplier)
        writer.add_residual_scale(s.residual_multiplier)
        writer.add_attention_scale(s.attention_scale)
        writer.add_logit_scale(s.logits_scaling)

    @classmethod
    def config_from_gguf(cls, meta: dict, shapes: dict, path) -> dict:
        config = super().config_from_gguf(meta, shapes, path)
        config.pop("head_dim", None)  # GraniteConfig derives it
        arch = cls.gguf_arch_name_of()
        for name, template in _MULTIPLIERS.items():
            key = template.format(arch=arch)
            if meta.get(key) is None:
                raise MlxedgeError(f"missing metadata key {key}", path=path, fix=_GGUF_FIX)
            config[name] = gguf_positive_number(key, meta[key], path)  # float32: its decimal
        return config
