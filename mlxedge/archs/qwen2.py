"""Qwen2 / Qwen2.5: the llama decoder with biases on the q, k and v projections.

Sliding windows as Hugging Face's Qwen2Config defines them: only with `use_sliding_window`
(default false), then on the blocks from `max_window_layers` (default 28) on, unless the config
lists `layer_types` ("sliding_attention" / "full_attention") per block. Published Qwen2.5 configs
set `use_sliding_window: false`. mlx-lm and llama.cpp apply no window.

In GGUF ("qwen2" architecture) the rotary is llama.cpp's "neox" kind, which reads Hugging Face's
row order as it is: no q/k permutation.
"""

from __future__ import annotations

import gguf

from .llama import Llama


def windows_by_layer_type(config: dict, n_layers: int) -> tuple[int | None, ...]:
    """Hugging Face's per-block windows for the Qwen family (see the module doc)."""
    window = config.get("sliding_window", 4096) if config.get("use_sliding_window") else None
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        window = window or config.get("sliding_window")
        return tuple(window if t == "sliding_attention" else None for t in types)
    if not window:
        return (None,) * n_layers
    first = config.get("max_window_layers")
    first = 28 if first is None else first  # Qwen2Config's default
    return tuple(window if i >= first else None for i in range(n_layers))


class Qwen2(Llama):
    """model_type "qwen2"."""

    model_type = "qwen2"
    hf_class = "Qwen2ForCausalLM"
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    gguf_permuted_qk = False
    defaults = Llama.defaults | {"max_position_embeddings": 32768}

    def _head_dim(self) -> int:
        # Qwen2's modelling code derives it; a stated head_dim is not used.
        return self._derived_head_dim()

    def _windows(self, n_layers: int) -> tuple[int | None, ...]:
        first = self.config.get("max_window_layers")
        if first is not None and (
            isinstance(first, bool) or not isinstance(first, int) or first < 0
        ):
            raise self._bad("max_window_layers", first, "not a whole number of layers")
        windows = windows_by_layer_type(self.config, n_layers)
        return tuple(None if w is None else self._int("sliding_window", w) for w in windows)

    def _biases(self) -> tuple[bool, bool, bool]:
        return True, False, False

    def llama_cpp_is_70b(self) -> bool:
        return self.spec.n_layers == 80  # llama.cpp's qwen2: 80 layers is LLM_TYPE_70B

    def _add_gguf_vocab_and_rope_dims(self, writer: gguf.GGUFWriter) -> None:
        pass  # llama.cpp's converter writes neither for qwen2

    @classmethod
    def attention_bias_from_gguf(cls, shapes: dict) -> dict:
        return {"attention_bias": True, "mlp_bias": False}
