"""Describe a model on disk: a Hugging Face folder, an MLX folder or a GGUF file."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MlxedgeError
from .formats.hf import HFCheckpoint


@dataclass
class Description:
    """What `mlxedge inspect` prints.

    Attributes:
        path: what was inspected.
        kind: "Hugging Face folder", "MLX folder" or "GGUF file".
        architecture: model_type (or GGUF general.architecture).
        tensors: number of stored tensors.
        types: stored tensor types with their counts ("uint32 (4-bit g64)": 210, ...).
        size: bytes of tensor data.
        params: parameter count of the model (unpacked, for quantized formats).
        facts: further lines (layers, hidden size, quantization defaults...).
    """

    path: Path
    kind: str
    architecture: str
    tensors: int
    types: Counter
    size: int
    params: int
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return self.size * 8 / self.params if self.params else 0.0


def describe(path: Path) -> Description:
    """Inspect `path`.

    Raises:
        MlxedgeError: not a GGUF file or a folder with config.json and safetensors, or corrupt.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _describe_gguf(path)
    if path.is_dir() and os.path.lexists(path / "config.json"):
        return _describe_folder(path)  # which refuses a config.json that is not a regular file
    raise MlxedgeError(
        "not a GGUF file or a model folder",
        path=path,
        fix="pass a .gguf file or a folder with config.json and *.safetensors",
    )


def _describe_folder(path: Path) -> Description:
    from .formats.mlx import module_scheme
    from .source import read_config

    config = read_config(path)
    ckpt = HFCheckpoint.from_folder(path)
    infos = ckpt.infos()
    quant = config.get("quantization")
    default = None
    if quant is not None:
        from .formats.mlx import mlx_weights

        mlx_weights(ckpt, quant, path)  # the block and every quantized tensor's shapes checked
        default = module_scheme("the default", {k: v for k, v in quant.items()
                                                if not isinstance(v, dict)}, path)  # fmt: skip
    by_name = {i.name: i for i in infos}
    types: Counter = Counter()
    params = size = 0
    for info in infos:
        n = int(np.prod(info.shape, dtype=np.int64))
        size += n * np.dtype(info.dtype).itemsize
        if info.name.endswith((".scales", ".biases")) and quant:
            continue
        module = info.name.rsplit(".", 1)[0]
        if quant and info.dtype == "uint32" and f"{module}.scales" in by_name:
            scheme = module_scheme(module, quant, path)
            params += n * 32 // scheme.bits
            types[f"{scheme.bits}-bit g{scheme.group_size}"] += 1
        else:
            params += n
            types[info.dtype] += 1
    facts = {
        k: str(config[k])
        for k in ("num_hidden_layers", "hidden_size", "vocab_size", "tie_word_embeddings")
        if k in config
    }
    if quant:
        facts["quantization"] = f"{default.bits}-bit, group {default.group_size} (default)"
    return Description(
        path=path,
        kind="MLX folder" if quant else "Hugging Face folder",
        architecture=str(config.get("model_type", "unknown")),
        tensors=len(infos),
        types=types,
        size=size,
        params=params,
        facts=facts,
    )


def _describe_gguf(path: Path) -> Description:
    import gguf

    from .formats.gguf.reader import open_gguf

    file = open_gguf(path)
    meta = file.metadata
    arch = meta.get(gguf.Keys.General.ARCHITECTURE, "unknown")
    types = Counter(t.type.name for t in file.tensors.values())
    facts = {}
    for key in ("block_count", "embedding_length", "context_length"):
        if f"{arch}.{key}" in meta:
            facts[key] = str(meta[f"{arch}.{key}"])
    if (number := meta.get(gguf.Keys.General.FILE_TYPE)) is not None:
        from .formats.gguf.mixes import MIXES

        name = next((m.name for m in MIXES.values() if m.file_type == number), "other")
        facts["file_type"] = f"{name} ({number})"
    for label, key in (
        ("tokenizer", gguf.Keys.Tokenizer.MODEL),
        ("pre_tokenizer", gguf.Keys.Tokenizer.PRE),
    ):
        if key in meta:
            facts[label] = str(meta[key])
    return Description(
        path=path,
        kind="GGUF file",
        architecture=str(arch),
        tensors=len(file.tensors),
        types=types,
        size=sum(t.n_bytes for t in file.tensors.values()),
        params=sum(math.prod(t.shape) for t in file.tensors.values()),
        facts=facts,
    )
