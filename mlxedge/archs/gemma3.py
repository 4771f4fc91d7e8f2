"""Gemma 3's language model ("gemma3_text"), and the text part of the multimodal "gemma3".

Gemma 3 is Gemma 2 (`archs/gemma2.py`) with per-head RMSNorms on queries and keys, five sliding
layers to every global one (`sliding_window_pattern`, or `layer_types`), a rotary base of their
own for the sliding layers (`rope_local_base_freq`, unscaled; the global layers take `rope_theta`
and `rope_scaling`), no attention soft-capping, and a head that may be untied.

A "gemma3" checkpoint (`Gemma3ForConditionalGeneration`) wraps that language model with a vision
tower: `unwrap` reads it as the gemma3_text model it contains (its `text_config`, its
`language_model` tensors renamed) and says that the vision tower is not carried.

In GGUF ("gemma3") the sliding layers' rotary base travels as `gemma3.rope.freq_base_swa`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import gguf

from ..errors import MlxedgeError
from ..model import RenamedSource, TensorSource
from .gemma2 import Gemma2
from .spec import ModelSpec

log = logging.getLogger(__name__)


class Gemma3Text(Gemma2):
    """model_type "gemma3_text"."""

    model_type = "gemma3_text"
    hf_class = "Gemma3ForCausalLM"
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    # Gemma3TextConfig's defaults
    defaults = Gemma2.defaults | {
        "max_position_embeddings": 131072,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "sliding_window_pattern": 6,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }
    llama_cpp_27b_layers: ClassVar[int] = 62
    attn_softcap_required = False
    tied_only = False
    llama_cpp_default_window = None  # llama.cpp's gemma3: no key, no sliding layers
    llama_cpp_default_pattern = 6

    def _qk_norm(self) -> bool:
        return True

    def _is_sliding(self, layer: int) -> bool:
        """Hugging Face's rule without `layer_types`: the last of every `pattern` layers is
        global (transformers 4.53+ writes the pattern as `_sliding_window_pattern`)."""
        key = "sliding_window_pattern"
        if self.config.get(key) is None and self.config.get("_" + key) is not None:
            key = "_" + key
        return (layer + 1) % self._int(key) != 0

    def _spec(self) -> ModelSpec:
        spec = super()._spec()
        return dataclasses.replace(spec, local_rope_theta=self._float("rope_local_base_freq"))

    def sliding_window_pattern(self) -> int:
        """mlx-lm's description of which layers slide: the last of every n is global.

        Raises:
            MlxedgeError: the layers follow no such pattern.
        """
        flags = [w is not None for w in self.spec.windows]
        for n in range(1, len(flags) + 2):
            if flags == [(i + 1) % n != 0 for i in range(len(flags))]:
                return n
        raise MlxedgeError(
            "the sliding layers (layer_types) follow no pattern mlx-lm's gemma3_text can hold",
            path=self.where,
            fix="export this model to GGUF or Core ML instead",
        )

    def output_config(self) -> dict:
        s = self.spec
        if s.final_softcap is not None:
            raise MlxedgeError(
                "final_logit_softcapping is set, which mlx-lm's gemma3_text does not apply",
                path=self.where,
                fix="export this model to GGUF or Core ML instead",
            )
        return super().output_config() | {
            "rope_local_base_freq": s.local_rope_theta,
            "rope_scaling": s.rope_scaling,
            "sliding_window_pattern": self.sliding_window_pattern(),
        }

    @classmethod
    def _rope_local_from_gguf(cls, config: dict, path) -> None:
        config.setdefault("rope_local_base_freq", 10_000.0)  # llama.cpp's default


# ------------------------------------------------------------------ the multimodal wrapper

_TEXT_PREFIXES = {  # checkpoint prefix -> gemma3_text's (older and newer transformers layouts)
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "lm_head.": "lm_head.",
}
_NOT_CARRIED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                "model.multi_modal_projector.")  # fmt: skip
# Gemma3Config's text_config defaults that mlx-lm's gemma3 wrapper also fills in
_WRAPPER_DEFAULTS = {"vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4}
_CARRIED_KEYS = ("torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id", "quantization")


def unwrap(config: dict, weights: TensorSource | None, where: str) -> tuple[dict, TensorSource]:
    """A "gemma3" checkpoint as the gemma3_text model it holds: the text config with the
    wrapper's values it inherits, and the language model's tensors under gemma3_text's names
    (without weights, the config alone: the head's tie then as the configs state it).

    Raises:
        MlxedgeError: no `text_config`.
    """
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise MlxedgeError("a gemma3 config without a text_config object", path=where,
                           fix="use the model's original config.json")  # fmt: skip
    names: dict[str, str] = {}
    dropped = 0
    for info in weights.infos() if weights is not None else ():
        if info.name.startswith(_NOT_CARRIED):
            dropped += 1
            continue
        prefix = next((p for p in _TEXT_PREFIXES if info.name.startswith(p)), None)
        new = info.name if prefix is None else _TEXT_PREFIXES[prefix] + info.name[len(prefix) :]
        names[new] = info.name
    out = _WRAPPER_DEFAULTS | {"vocab_size": config.get("vocab_size", 262208)} | text
    out |= {k: config[k] for k in _CARRIED_KEYS if k in config and k not in text}
    out |= {
        "model_type": Gemma3Text.model_type,
        "architectures": [Gemma3Text.hf_class],
        "tie_word_embeddings": not any(n.startswith("lm_head.") for n in names)
        if weights is not None
        else text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)),
    }
    if dropped:
        log.warning(
            "%s: Gemma 3 with a vision tower: only its language model is carried (as "
            "gemma3_text); the vision tower (%d tensors) is left out",
            where,
            dropped,
        )
    return out, None if weights is None else RenamedSource(weights, names)
