"""Open anything the harness can run: an MLX folder we (or mlx-lm) wrote, or any model `quantize`
accepts (a Hugging Face folder, a Hub id, a .gguf file, `smollm2`).

An MLX folder's quantized tensors are presented dequantized to float32 (scales and biases cast to
float32 before the product, as MLX computes), so the numpy reference runs an artifact's own
weights exactly as they are stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import HFCheckpoint
from ..model import TensorInfo, TensorSource
from ..quant.schemes import AffineScheme, QuantizedTensor, dequantize
from ..source import read_json_object, resolve, side_file


@dataclass
class RunnableModel:
    """A model with what every backend needs.

    Attributes:
        name: display name (the folder or file name, or the built-in name).
        kind: "mlx" (an MLX folder, quantized or not), "hf", "gguf" or "builtin".
        config: config.json contents.
        weights: float tensors under Hugging Face names (dequantized for a quantized MLX folder).
        tokenizer_json: the tokenizer.json bytes, when the model has one.
        tokenizer_config: tokenizer_config.json contents ({} when absent).
        folder: the folder mlx-lm can load, when there is one.
        gguf: the GGUF file llama.cpp can load, when there is one.
        gguf_metadata: that file's scalar metadata (`SourceModel.gguf_metadata`).
        bits: the quantization's bit width (the default one of a mixed recipe), None when float.
    """

    name: str
    kind: str
    config: dict
    weights: TensorSource
    tokenizer_json: bytes | None = None
    tokenizer_config: dict = field(default_factory=dict)
    folder: Path | None = None
    gguf: Path | None = None
    gguf_metadata: dict = field(default_factory=dict)
    bits: int | None = None


class DequantizedMLX:
    """The tensors of a quantized MLX folder, with every quantized weight dequantized on read."""

    def __init__(self, checkpoint: HFCheckpoint, quantization: dict) -> None:
        self._ckpt = checkpoint
        raw = {i.name: i for i in checkpoint.infos()}
        self._schemes: dict[str, AffineScheme] = {}
        infos = []
        for name, info in raw.items():
            module = name.rsplit(".", 1)[0]
            quantized = module + ".scales" in raw
            if quantized and name.endswith((".scales", ".biases")):
                continue  # folded into the weight
            if quantized and name.endswith(".weight"):
                scheme = self._scheme(module, quantization)
                rows, packed = info.shape
                infos.append(TensorInfo(name, (rows, packed * 32 // scheme.bits), "float32"))
                self._schemes[name] = scheme
            else:
                infos.append(info)
        self._infos = infos

    def _scheme(self, module: str, quantization: dict) -> AffineScheme:
        entry = quantization.get(module)
        if isinstance(entry, dict):
            return AffineScheme(int(entry["bits"]), int(entry["group_size"]))
        return AffineScheme(int(quantization["bits"]), int(quantization["group_size"]))

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def scheme(self, name: str) -> AffineScheme | None:
        """How weight `name` is quantized, or None when it is stored in float."""
        return self._schemes.get(name)

    def quantized(self, name: str, rows: tuple[int, int] | None = None) -> QuantizedTensor:
        """The stored codes, scales and biases of quantized weight `name`."""
        module = name[: -len(".weight")]
        return QuantizedTensor(
            self._ckpt.read(name, rows).view(np.uint32),
            self._ckpt.read(module + ".scales", rows),
            self._ckpt.read(module + ".biases", rows),
            self._schemes[name],
        )

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        if name not in self._schemes:
            return self._ckpt.read(name, rows)
        return dequantize(self.quantized(name, rows))


def open_model(spec: str, revision: str | None = None) -> RunnableModel:
    """Open MODEL (an MLX folder, or anything `mlxedge quantize` accepts) for running.

    Raises:
        MlxedgeError: what `source.resolve` raises, or an MLX folder without its weights.
    """
    path = Path(spec).expanduser()
    config = read_json_object(path / "config.json", missing_ok=True) if path.is_dir() else {}
    if path.is_dir() and "quantization" in config:
        quantization = config["quantization"]
        weights = DequantizedMLX(HFCheckpoint.from_folder(path), quantization)
        tok = side_file(path, "tokenizer.json")
        tok_config = side_file(path, "tokenizer_config.json")
        return RunnableModel(
            name=path.absolute().name,  # `.` is named after the folder
            kind="mlx",
            config=config,
            weights=weights,
            tokenizer_json=tok.read_bytes() if tok is not None else None,
            tokenizer_config=read_json_object(tok_config) if tok_config is not None else {},
            folder=path,
            bits=int(quantization.get("bits", 0)) or None,
        )
    from ..formats.gguf_mix import nominal_bits

    source = resolve(spec, revision)
    # A Hub id resolves to its snapshot folder; `smollm2` to the GGUF file its package ships.
    on_disk = source.path
    is_folder = on_disk is not None and on_disk.is_dir()
    kind = "gguf" if path.suffix.lower() == ".gguf" else ("hf" if is_folder else "builtin")
    tok_config = source.side_files.get("tokenizer_config.json")
    gguf_file = on_disk if on_disk is not None and not is_folder else None
    return RunnableModel(
        name=path.stem if kind == "gguf" else source.name,
        kind=kind,
        config=source.config,
        weights=source.weights,
        tokenizer_json=source.side_files.get("tokenizer.json"),
        tokenizer_config=json.loads(tok_config) if tok_config else {},
        folder=on_disk if is_folder else None,
        gguf=gguf_file,
        gguf_metadata=source.gguf_metadata,
        # The built-in model is presented as the original, not as the Q4_1 file it ships as.
        bits=nominal_bits(source.gguf_metadata.get("general.file_type"))
        if kind == "gguf"
        else None,
    )
