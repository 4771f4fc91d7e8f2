"""Import a GGUF file as a `Model`: Hugging Face config, names, shapes and tokenizer files.

GGUF files hold llama.cpp's view of a model, which differs from the Hugging Face checkpoint it was
converted from in three ways this module undoes:

- tensor names (`blk.3.attn_q.weight` instead of `model.layers.3.self_attn.q_proj.weight`);
- dimension order (GGUF lists `ne0` first, the fastest-varying axis; numpy/HF list it last);
- some architectures store rows permuted for llama.cpp's rotary (llama's q/k projections: it
  rotates adjacent pairs, Hugging Face the two halves of each head).

What each tensor is called and how its rows move is the architecture module's knowledge
(`TensorEntry.gguf_name`, `from_gguf`); this module only reads the file through it.

Weights stay memory-mapped and are dequantized to float32 one tensor per `read()` call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from mlxedge.archs import Architecture, TensorEntry, arch_for_gguf
from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf.reader import GGUFFile, GGUFTensor, open_gguf
from mlxedge.formats.gguf.tokenizer_import import tokenizer_files_from_gguf
from mlxedge.model import Model, TensorInfo, Tokenizer

logger = logging.getLogger(__name__)


# Storage types that gguf-py can turn into float32, with the dtype name TensorInfo reports.
_FLOAT_NAMES = {QType.F32: "float32", QType.F16: "float16", QType.BF16: "bfloat16"}


def _dequantizable(qtype: QType) -> bool:
    return qtype in (QType.F32, QType.F16) or qtype in gguf.quants._type_traits


class GGUFTensorSource:
    """Tensors of one GGUF file under Hugging Face names, dequantized to float32 on read.

    A row range is cut from the stored blocks before they are dequantized (rows are whole
    blocks), so reading a large tensor in row blocks costs memory for one block at a time. Rows
    stored permuted (llama's q/k, see `TensorEntry.gguf_heads`) are read whole: they are small.
    """

    def __init__(self, path: Path, file: GGUFFile, arch: Architecture):
        self._path = path
        self._file = file
        self._tensors: dict[str, tuple[GGUFTensor, TensorEntry]] = {}
        for tensor in file.tensors.values():
            entry = arch.gguf_entry(tensor.name, path)
            self._tensors[entry.name] = (tensor, entry)

    def infos(self) -> list[TensorInfo]:
        """HF name, (out, in) shape and GGUF storage type of each tensor, in file order."""
        return [
            TensorInfo(name=name, shape=t.shape, dtype=_FLOAT_NAMES.get(t.type, t.type.name))
            for name, (t, _) in self._tensors.items()
        ]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor (or rows [start, stop) of it) as float32 in Hugging Face layout.

        Returns:
            A float32 array the caller owns, shape (out, in) for matrices.

        Raises:
            MlxedgeError: unknown name, or a storage type gguf-py cannot dequantize.
        """
        found = self._tensors.get(name)
        if found is None:
            raise MlxedgeError(f"no tensor named {name!r}", path=self._path)
        tensor, entry = found
        if not _dequantizable(tensor.type):
            raise MlxedgeError(
                f"tensor {tensor.name} has type {tensor.type.name}, which cannot be "
                "dequantized yet",
                path=self._path,
            )
        data = self._file.data(tensor)
        if rows is not None and entry.gguf_heads is None and len(tensor.shape) > 1:
            data = data[rows[0] : rows[1]]  # rows of blocks, before any dequantization
            rows = None
        # dequantize returns a view for F32; copying detaches the result from the memory map.
        values = np.array(dequantize(data, tensor.type), dtype=np.float32)
        values = entry.from_gguf(values.reshape(-1, *tensor.shape[1:]))
        return values if rows is None else values[rows[0] : rows[1]]

    def plain_twin(self, name: str, w: np.ndarray) -> np.ndarray:
        """Float weights `w` stored in this file's type for `name` by llama.cpp's reference
        quantizer, without an importance matrix (the quality gate's yardstick, see `twin`).

        Rows are quantized independently, so llama's q/k row permutation does not change them.
        """
        from mlxedge.quant.ggml import TYPES, dequantize_rows, quantize_rows
        from mlxedge.twin import TwinUnavailable, round_to_float

        tensor, _ = self._tensors[name]
        type_name = tensor.type.name
        if type_name in ("F32", "F16", "BF16"):
            return round_to_float(w, type_name)
        if type_name not in TYPES or w.ndim != 2:
            raise TwinUnavailable(f"{tensor.name} is {type_name}, which has no plain rule here")
        return dequantize_rows(quantize_rows(w, type_name), type_name, w.shape[1])


def load_gguf(path: Path) -> Model:
    """Open a GGUF file as a model: HF config, lazily dequantized tensors and tokenizer files.

    Args:
        path: a .gguf file of an architecture `archs.GGUF_ARCHITECTURES` names.

    Returns:
        A Model (kind "gguf", named after the file) whose weights read as float32 with Hugging
        Face names and shapes, whose config is a Hugging Face config.json for the matching
        mlx-lm model class, and whose side files are the rebuilt tokenizer files.

    Raises:
        MlxedgeError: the file is truncated or corrupt, its architecture, a tensor type or its
            vocabulary is not supported, or required metadata is missing (the key is named).
    """
    path = Path(path)
    file = open_gguf(path)
    metadata = file.metadata
    arch_name = metadata.get(gguf.Keys.General.ARCHITECTURE)
    if arch_name is None:
        raise MlxedgeError(
            "missing metadata key general.architecture",
            path=path,
            fix="the file is damaged or not a model; convert the model again",
        )
    if not isinstance(arch_name, str):
        raise MlxedgeError(f"metadata key general.architecture is {arch_name!r:.40}, not a name",
                           path=path)  # fmt: skip
    cls = arch_for_gguf(arch_name, path)
    shapes = {t.name: t.shape for t in file.tensors.values()}
    config = cls.config_from_gguf(metadata, shapes, path)
    arch = cls(config, str(path))
    weights = GGUFTensorSource(path, file, arch)  # every tensor placed, or one clear error
    for tensor in file.tensors.values():
        if not _dequantizable(tensor.type):
            raise MlxedgeError(
                f"tensor {tensor.name} has type {tensor.type.name}, which cannot be "
                "dequantized yet",
                path=path,
            )
    try:
        side_files = tokenizer_files_from_gguf(metadata)
    except MlxedgeError as err:
        raise MlxedgeError(err.message, path=path, fix=err.fix) from err
    from mlxedge.formats.gguf.mixes import nominal_bits

    return Model(
        name=path.stem,
        origin=path.name,
        kind="gguf",
        path=path,
        config=config,
        weights=weights,
        tokenizer=Tokenizer(side_files, where=str(path)),
        bits=nominal_bits(metadata.get(gguf.Keys.General.FILE_TYPE)),
        license=metadata.get(gguf.Keys.General.LICENSE),
        base_model=_base_model(metadata),
        gguf_metadata={k: v for k, v in metadata.items() if not isinstance(v, list)},
    )


def _base_model(metadata: dict[str, Any]) -> str | None:
    """The first base model as "org/name" when the file records one."""
    base = gguf.Keys.General
    url = metadata.get(base.BASE_MODEL_REPO_URL.format(id=0))
    prefix = "https://huggingface.co/"
    if isinstance(url, str) and url.startswith(prefix):
        return url[len(prefix) :].strip("/")
    name = metadata.get(base.BASE_MODEL_NAME.format(id=0))
    org = metadata.get(base.BASE_MODEL_ORGANIZATION.format(id=0))
    if name and org:
        return f"{org}/{name}"
    return name or None
