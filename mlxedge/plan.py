"""The plan: what each tensor of an output becomes, decided before any weight is read.

One `TensorPlan` type serves every target: a tensor becomes an MLX affine scheme (codes, scales,
biases), a ggml type (a GGUF block type or F32/F16/BF16), or a float dtype. Planners decide it
from the tensor's *kind* (llama.cpp's classes, `archs.Kind`) — `quant.recipes` for MLX folders,
`formats.gguf.mixes` for GGUF files — and `pipeline.convert` carries the plan out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .archs import Role, TensorEntry
from .quant.schemes import STORAGE_DTYPES, AffineScheme


@dataclass
class TensorPlan:
    """One tensor of the output.

    Attributes:
        source: the Hugging Face name it is read from (None for a tensor the writer computes).
        name: its name in the output (the same for MLX; the GGUF name in a GGUF file).
        shape: the shape of the weights it holds (rows, cols), as the source has them.
        entry: the architecture's row for the source tensor (None when computed).
        source_dtype: how the source stores it ("bfloat16", "Q4_1", ...).
        scheme: the MLX affine scheme, when it becomes codes, scales and biases.
        ggml_type: the GGUF type ("Q4_K", "Q8_0", "F16", "F32", ...), in a GGUF file.
        dtype: the float dtype of an MLX tensor, or of an affine tensor's scales and biases.
        repack: an MLX folder's codes carried into Q4_1/Q5_1 without re-quantizing.
        requantized_from: the MLX bit width a GGUF tensor is re-quantized from, if any.
        note: why a tensor the recipe wanted quantized stays in float (shown in reports).
        nbytes: bytes it takes in the output (without any alignment padding).
    """

    source: str | None
    name: str
    shape: tuple[int, ...]
    entry: TensorEntry | None = None
    source_dtype: str = "float32"
    scheme: AffineScheme | None = None
    ggml_type: str | None = None
    dtype: str | None = None
    repack: bool = False
    requantized_from: int | None = None
    note: str = ""
    nbytes: int = 0

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def role(self) -> Role | None:
        return self.entry.role if self.entry is not None else None

    @property
    def module(self) -> str:
        """Module path: the name without its final `.weight` / `.bias`."""
        return self.name.rsplit(".", 1)[0]

    @property
    def target(self) -> str:
        """What it becomes, as reports group tensors: "4-bit g64", "Q4_K", "float"."""
        if self.ggml_type is not None:
            return self.ggml_type
        if self.scheme is not None:
            return f"{self.scheme.bits}-bit g{self.scheme.group_size}"
        return "float"


def stored_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes a tensor takes as stored: a numpy/ml_dtypes dtype name or a ggml type name."""
    n = math.prod(shape)
    if dtype in STORAGE_DTYPES or hasattr(np, dtype):
        return n * np.dtype(STORAGE_DTYPES.get(dtype, dtype)).itemsize
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    return n // block * size
