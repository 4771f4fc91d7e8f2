"""mlxedge: quantize language models for Apple Silicon and prove every artifact.

The public API, one function per stage of the pipeline:

    import mlxedge
    model = mlxedge.resolve("smollm2")                  # any MODEL: folder, Hub id, .gguf, MLX
    mlxedge.quantize(model, "out-4bit", mlxedge.QuantOptions(bits=4))   # an MLX folder
    mlxedge.export_gguf(model, "out.gguf", "Q4_K_M")    # a GGUF file
    rows = mlxedge.crosscheck([mlxedge.resolve("out-4bit")], model, mlxedge.load_text(None))

Names are imported on first use, so `import mlxedge` (and the CLI's start-up) stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "resolve": ("mlxedge.source", "resolve"),
    "Model": ("mlxedge.model", "Model"),
    "QuantOptions": ("mlxedge.quant.recipes", "QuantOptions"),
    "quantize": ("mlxedge.formats.mlx", "quantize_to_mlx"),
    "export_gguf": ("mlxedge.formats.gguf.writer", "write_gguf"),
    "import_gguf": ("mlxedge.formats.hf", "write_hf_folder"),
    "convert": ("mlxedge.pipeline", "convert"),
    "crosscheck": ("mlxedge.harness", "crosscheck"),
    "evaluate": ("mlxedge.harness", "evaluate"),
    "load_text": ("mlxedge.texts", "load_text"),
    "MlxedgeError": ("mlxedge.errors", "MlxedgeError"),
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlxedge' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
