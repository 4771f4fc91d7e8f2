"""What the pipeline needs to know about an architecture: the role of each tensor and its layer.

Tensor names are the checkpoint's own (Hugging Face names), which are also the names mlx-lm's model
classes use, so no renaming happens between source and MLX output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from ..errors import MlxedgeError


class Role(str, Enum):
    """What a tensor does, which decides whether and how it is quantized."""

    EMBEDDING = "embedding"  # token embedding; with tied weights also the output head
    HEAD = "head"  # untied output projection (lm_head)
    LINEAR = "linear"  # a projection inside a block: quantized
    NORM = "norm"  # RMSNorm weights: kept in float
    BIAS = "bias"  # projection biases: kept in float
    DROP = (
        "drop"  # not part of the model's parameters (precomputed rotary tables, a tied head copy)
    )


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LlamaFamily:
    """The llama-style decoder (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP).

    Subclasses (one per Hugging Face `model_type`) name the extra tensors they carry and the config
    keys they require.

    Attributes:
        config: the model's config.json contents.
    """

    config: dict

    model_type: ClassVar[str] = "llama"
    required_keys: ClassVar[tuple[str, ...]] = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    )
    projections: ClassVar[tuple[str, ...]] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied(self) -> bool:
        # Hugging Face's default for these models is untied; mlx-lm's llama default is tied, so the
        # output config always states it (see `output_config`).
        return bool(self.config.get("tie_word_embeddings", False))

    def check_config(self, where: str) -> None:
        """Raise MlxedgeError naming `where` when a required config key is missing."""
        missing = [k for k in self.required_keys if k not in self.config]
        if missing:
            raise MlxedgeError(
                f"config.json lacks {', '.join(missing)}, "
                f"required for model_type {self.model_type!r}",
                path=where,
                fix="use the model's original config.json",
            )

    def role(self, name: str) -> Role:
        """The role of a tensor, by its checkpoint name."""
        if name == "model.embed_tokens.weight":
            return Role.EMBEDDING
        if name == "lm_head.weight":
            return Role.DROP if self.tied else Role.HEAD
        if name.endswith("rotary_emb.inv_freq"):
            return Role.DROP
        if name.endswith("norm.weight"):
            return Role.NORM
        module = name.rsplit(".", 1)[0]
        if any(module.endswith(p) for p in self.projections):
            return Role.LINEAR if name.endswith(".weight") else Role.BIAS
        raise MlxedgeError(
            f"tensor {name!r} is not part of a {self.model_type!r} model",
            fix="check that config.json's model_type matches the weights",
        )

    @staticmethod
    def layer_index(name: str) -> int | None:
        """Index of the decoder block a tensor belongs to, or None outside the blocks."""
        m = _LAYER.match(name)
        return int(m.group(1)) if m else None

    def expected_tensors(self) -> list[str]:
        """Names every checkpoint of this architecture must contain."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + proj + ".weight" for proj in self.projections]
            names += [p + extra for extra in self.extra_layer_tensors()]
        if not self.tied:
            names.append("lm_head.weight")
        return names

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape as the config implies it (linears as (out, in)), so that sizes can
        be planned from config.json alone, before any weights are downloaded."""
        c = self.config
        d, ff, vocab = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["vocab_size"])
        n_q = int(c["num_attention_heads"])
        n_kv = int(c.get("num_key_value_heads") or n_q)
        hd = int(c.get("head_dim") or d // n_q)
        per_layer = {
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (n_q * hd, d),
            "self_attn.k_proj.weight": (n_kv * hd, d),
            "self_attn.v_proj.weight": (n_kv * hd, d),
            "self_attn.o_proj.weight": (d, n_q * hd),
            "mlp.gate_proj.weight": (ff, d),
            "mlp.up_proj.weight": (ff, d),
            "mlp.down_proj.weight": (d, ff),
            "self_attn.q_proj.bias": (n_q * hd,),
            "self_attn.k_proj.bias": (n_kv * hd,),
            "self_attn.v_proj.bias": (n_kv * hd,),
            "self_attn.q_norm.weight": (hd,),
            "self_attn.k_norm.weight": (hd,),
        }
        shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
        if not self.tied:
            shapes["lm_head.weight"] = (vocab, d)
        for name in self.expected_tensors():
            if name not in shapes:
                shapes[name] = per_layer[name.split(".", 3)[3]]
        return shapes

    def extra_layer_tensors(self) -> tuple[str, ...]:
        """Per-block tensors beyond the llama set (biases, q/k norms)."""
        return ()

    def output_config(self) -> dict:
        """The config to write beside converted weights: the source's, defaults made explicit."""
        out = dict(self.config)
        out["tie_word_embeddings"] = self.tied
        return out
