"""What every source turns into: a config, a stream of named tensors, the files that travel along.

A Hugging Face folder, a Hub snapshot and a GGUF file all become a `SourceModel`, so the pipeline
after `source.resolve` never asks where a model came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

# Tensors larger than this many weights are read and converted in blocks of rows (64 MiB of
# float32): the stream's memory is bounded by a block, not by the largest tensor.
BLOCK_WEIGHTS = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    """Shape and storage dtype of one tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: (
        str  # numpy/ml_dtypes name as stored: "float32", "float16", "bfloat16", or a GGUF type name
    )


class TensorSource(Protocol):
    """Named tensors read one at a time (memory-mapped where the format allows)."""

    def infos(self) -> list[TensorInfo]:
        """Every tensor's name, shape and dtype, in a stable order."""
        ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor (or rows [start, stop) of it) as a float numpy array (float32, float16 or
        ml_dtypes.bfloat16).

        Raises:
            MlxedgeError: the tensor's bytes are missing, truncated or not finite-readable.
        """
        ...


@dataclass
class SourceModel:
    """A model ready for the pipeline, whatever its origin.

    Attributes:
        name: short display name ("SmolLM2-135M-Instruct"); used for default output names and cards.
        origin: what the user passed (a Hub id, or a file/folder name without directories).
        config: the Hugging Face config.json contents.
        weights: the tensors, with Hugging Face names ("model.layers.0.self_attn.q_proj.weight").
        side_files: files carried into every artifact unchanged, by file name (tokenizer.json,
            tokenizer_config.json, special_tokens_map.json, generation_config.json,
            chat_template.jinja).
        license: the licence identifier when the source states it ("apache-2.0"), else None.
        base_model: the upstream model id when the source states it, else None.
        gguf_metadata: a GGUF source's scalar metadata ("general.file_type",
            "tokenizer.ggml.pre", ...); empty for other sources.
        path: the folder or file the model is read from (outputs must never touch it).
    """

    name: str
    origin: str
    config: dict
    weights: TensorSource
    side_files: dict[str, bytes] = field(default_factory=dict)
    license: str | None = None
    base_model: str | None = None
    gguf_metadata: dict = field(default_factory=dict)
    path: Path | None = None

    def parameter_count(self) -> int:
        """Number of scalar parameters in the source tensors."""
        return sum(int(np.prod(info.shape)) for info in self.weights.infos())


def iter_tensors(source: TensorSource) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Yield each tensor with its info, one at a time, in the source's order."""
    for info in source.infos():
        yield info, source.read(info.name)
