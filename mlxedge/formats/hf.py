"""A plain Hugging Face folder (config.json, safetensors, tokenizer files) from any source model.

Used by `mlxedge import FILE.gguf -o DIR`: the GGUF becomes a folder that transformers, mlx-lm and
`mlxedge quantize` read like any other checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..archs import Role, arch_for
from ..atomic import atomic_output
from ..checkpoint import write_checkpoint
from ..model import Model, TensorInfo
from ..quant.schemes import storage_dtype


def write_hf_folder(
    source: Model,
    output: Path,
    dtype: str = "float32",
    force: bool = False,
    on_tensor: Callable[[TensorInfo], None] | None = None,
) -> Path:
    """Write `source` as an unquantized Hugging Face folder, one tensor at a time.

    Args:
        source: the model.
        output: folder to create (must not exist unless `force`).
        dtype: float dtype of every tensor ("float32" keeps dequantized GGUF weights exact).
        force: replace an existing output.
        on_tensor: called after each tensor is written.

    Returns:
        The output folder.

    Raises:
        MlxedgeError: existing output without `force`, full disk, bad dtype, bad input.
    """
    np_dtype = storage_dtype(dtype)
    arch = arch_for(source.config, source.origin)
    infos = [i for i in source.weights.infos() if arch.role(i.name) != Role.DROP]
    out_infos = [TensorInfo(i.name, i.shape, dtype) for i in infos]

    def arrays():
        for info in infos:
            yield np.ascontiguousarray(source.weights.read(info.name).astype(np_dtype, copy=False))
            if on_tensor is not None:
                on_tensor(info)

    config = dict(arch.output_config())
    config["torch_dtype"] = dtype
    with atomic_output(output, force=force, protect=[source.path]) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in sorted(source.side_files.items()):
            (tmp / name).write_bytes(data)
        write_checkpoint(tmp, out_infos, arrays(), metadata={"format": "pt"})
    return output
