"""What every input becomes: one `Model`, whatever it came from.

A Hugging Face folder, a Hub snapshot, a GGUF file, an MLX folder and the built-in SmolLM2 are all
opened by `source.resolve` into a `Model`: its config and architecture, a stream of named float
tensors, the tokenizer (parsed once), and the quantization it already carries. Every command —
quantize, export, import, eval, crosscheck — takes that one type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import MlxedgeError
from .inputs import parse_json

if TYPE_CHECKING:
    from .archs import Architecture

# Tensors larger than this many weights are read and converted in blocks of rows (64 MiB of
# float32): the stream's memory is bounded by a block, not by the largest tensor.
BLOCK_WEIGHTS = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    """Shape and storage dtype of one tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # as stored: "float32", "float16", "bfloat16", "uint32", or a GGUF type name


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
class Tokenizer:
    """The tokenizer files a model carries, parsed once on first use.

    Attributes:
        files: file name -> bytes of every side file carried into artifacts unchanged
            (tokenizer.json, tokenizer_config.json, special_tokens_map.json, ...).
        where: what errors about the tokenizer name (its tokenizer.json, or the model).
    """

    files: dict[str, bytes] = field(default_factory=dict)
    where: str = "tokenizer.json"

    @property
    def raw(self) -> bytes | None:
        """tokenizer.json's bytes, None when the model has none."""
        return self.files.get("tokenizer.json")

    @cached_property
    def json(self) -> dict:
        """tokenizer.json parsed.

        Raises:
            MlxedgeError: the model has none, or it is not a tokenizer.json.
        """
        if self.raw is None:
            raise MlxedgeError(
                "the model has no tokenizer.json",
                path=self.where,
                fix="add the original model's tokenizer files to the folder",
            )
        tok = parse_json(self.raw, self.where)
        if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
            raise MlxedgeError("not a tokenizer.json (no 'model' object)", path=self.where)
        return tok

    @cached_property
    def config(self) -> dict:
        """tokenizer_config.json parsed ({} when absent).

        Raises:
            MlxedgeError: it is not a JSON object.
        """
        raw = self.files.get("tokenizer_config.json")
        if raw is None:
            return {}
        where = str(Path(self.where).with_name("tokenizer_config.json"))
        config = parse_json(raw, where)
        if not isinstance(config, dict):
            raise MlxedgeError("not a JSON object", path=where)
        return config

    @cached_property
    def hf(self):
        """The `tokenizers.Tokenizer` of tokenizer.json (for encoding and the vocabulary).

        Raises:
            MlxedgeError: the model has no tokenizer.json, or the library cannot load it.
        """
        from tokenizers import Tokenizer as HFTokenizer

        if self.raw is None:
            self.json  # noqa: B018 - raises the error that says so
        try:
            return HFTokenizer.from_str(self.raw.decode("utf-8"))
        except Exception as e:  # the library raises plain Exceptions on malformed files
            raise MlxedgeError(f"cannot load the tokenizer ({e})", path=self.where) from None


@dataclass
class Model:
    """A model ready for every command, whatever its origin.

    Attributes:
        name: short display name ("SmolLM2-135M-Instruct"): default output names, cards, reports.
        origin: what the user passed (a Hub id, or a file/folder name without directories).
        kind: "hf" (a Hugging Face folder or Hub snapshot), "mlx" (an MLX folder), "gguf" (a GGUF
            file) or "builtin" (SmolLM2, which ships as a GGUF file).
        path: the folder or file the model is read from (outputs must never touch it).
        config: the Hugging Face config.json contents (rebuilt from the metadata for a GGUF).
        weights: float tensors under Hugging Face names (an MLX folder's dequantized as MLX
            computes, a GGUF's dequantized).
        tokenizer: the tokenizer files, parsed once.
        quantization: an MLX folder's `quantization` block, None otherwise.
        bits: the quantization's bit width (an MLX folder's default one, a GGUF file type's
            nominal one), None for a float model.
        license: the licence identifier when the source states it ("apache-2.0"), else None.
        base_model: the upstream model id when the source states it, else None.
        gguf_metadata: a GGUF source's scalar metadata; empty for other sources.
    """

    name: str
    origin: str
    kind: str
    path: Path | None
    config: dict
    weights: TensorSource
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    quantization: dict | None = None
    bits: int | None = None
    license: str | None = None
    base_model: str | None = None
    gguf_metadata: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def arch(self) -> Architecture:
        """The architecture, with the config read into its spec."""
        from .archs import arch_for

        where = self.path / "config.json" if self.folder is not None else (self.path or self.name)
        return arch_for(self.config, str(where))

    @property
    def folder(self) -> Path | None:
        """The folder mlx-lm can load, when the model is one."""
        return self.path if self.kind in ("hf", "mlx") else None

    @property
    def gguf(self) -> Path | None:
        """The GGUF file llama.cpp can load, when the model is one."""
        return self.path if self.kind in ("gguf", "builtin") else None

    @property
    def side_files(self) -> dict[str, bytes]:
        """Files carried into every artifact unchanged, by file name."""
        return self.tokenizer.files

    def parameter_count(self) -> int:
        """Number of scalar parameters in the source tensors."""
        return sum(int(np.prod(info.shape)) for info in self.weights.infos())


class RenamedSource:
    """A `TensorSource` seen under other names, and only those (a wrapper checkpoint's language
    model under its own architecture's names).

    Args:
        source: the tensors.
        names: each new name -> the source's name of the tensor.
    """

    def __init__(self, source: TensorSource, names: dict[str, str]) -> None:
        self.source, self.names = source, names

    def infos(self) -> list[TensorInfo]:
        old = {info.name: info for info in self.source.infos()}
        return [TensorInfo(new, old[name].shape, old[name].dtype)
                for new, name in self.names.items()]  # fmt: skip

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.source.read(self.names[name], rows)


def iter_tensors(source: TensorSource) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Yield each tensor with its info, one at a time, in the source's order."""
    for info in source.infos():
        yield info, source.read(info.name)
