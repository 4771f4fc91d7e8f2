"""The `llamacpp` backend: llama.cpp itself, through the llama-cpp-python package, on a GGUF file.

The K/V cache is kept in float32 so that a float32 GGUF computes what the numpy reference does to
within summation order. Quantized files differ by more, for a reason of llama.cpp's own: its CPU
matmuls round the activations to 8-bit blocks (Q8_0 / Q8_K) before multiplying by quantized
weights, and to float16/bfloat16 for half-precision weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..threads import thread_count
from . import BackendUnavailable, Tolerance

# Stated before measuring. A float32 file: the bound on the largest logit difference.
FLOAT32_TOLERANCE = Tolerance(max_abs_logit=1e-3)
# Anything else: rounding activations to 8 bits is no coarser than rounding the weights to Q8_0,
# whose whole KL divergence from float on SmolLM2 is 0.0046 (llama.cpp's own measurement); twice
# that bounds what the activation rounding alone may cost.
QUANTIZED_TOLERANCE = Tolerance(kl_mean=1e-2)


class LlamaCppBackend:
    name = "llamacpp"
    token_budget = None

    def __init__(self, model) -> None:
        if model.gguf is None:
            raise BackendUnavailable(
                f"llama.cpp runs GGUF files; {model.name} is a {model.kind} model "
                "(write one with `mlxedge export gguf` first)"
            )
        try:
            import llama_cpp
        except ImportError:
            raise BackendUnavailable(
                "llama-cpp-python is not installed (pip install 'mlxedge[llamacpp]')"
            ) from None
        self._llama_cpp = llama_cpp
        self._path = Path(model.gguf)
        self._llm = None
        self._n_ctx = 0
        float32 = all(i.dtype == "float32" for i in model.weights.infos())
        self.tolerance = FLOAT32_TOLERANCE if float32 else QUANTIZED_TOLERANCE
        self.device = "cpu, float32 KV cache"

    def _load(self, n_tokens: int):
        if self._llm is None or n_tokens > self._n_ctx:
            lc = self._llama_cpp
            if self._llm is not None:
                self._llm.close()  # one model in memory at a time
            self._n_ctx = max(512, n_tokens)
            self._llm = lc.Llama(
                model_path=str(self._path),
                n_ctx=self._n_ctx,
                n_batch=self._n_ctx,
                n_ubatch=self._n_ctx,
                n_threads=thread_count(),
                logits_all=True,
                type_k=lc.GGML_TYPE_F32,
                type_v=lc.GGML_TYPE_F32,
                n_gpu_layers=0,
                verbose=False,
            )
        return self._llm

    def logits(self, ids: np.ndarray, first: int = 0) -> np.ndarray:
        ids = [int(i) for i in ids]
        llm = self._load(len(ids))
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[first : len(ids)], dtype=np.float32)
