"""Streaming safetensors shards in and out, and the shard index.

Why a reader and writer of our own rather than the `safetensors` package: its numpy loader cannot
return bfloat16 (numpy has no bfloat16 dtype), and its writer wants every tensor in memory at once.
Streaming a bfloat16 model larger than RAM therefore needs this small implementation of the
documented layout (an 8-byte little-endian header length, a JSON header, then the raw tensor bytes)
with `ml_dtypes.bfloat16` standing in for bfloat16 in numpy. Tests check the output against both
`safetensors` and `mx.load`.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import ml_dtypes
import numpy as np

from mlxedge.errors import MlxedgeError
from mlxedge.inputs import open_regular, parse_json
from mlxedge.model import TensorInfo

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("bool"),
}
_CODES_BY_NAME = {dtype.name: code for code, dtype in SAFETENSORS_DTYPES.items()}

# A real header is a few hundred KiB even for thousands of tensors; the Rust implementation uses
# the same 100 MB cap. Anything larger is corruption, and must not be allocated.
MAX_HEADER_BYTES = 100 * 2**20
INDEX_NAME = "model.safetensors.index.json"
SINGLE_SHARD_NAME = "model.safetensors"
_METADATA_KEY = "__metadata__"
_CORRUPT_FIX = "the file is truncated or corrupt; download or convert it again"


def dtype_code(dtype: np.dtype | type | str) -> str:
    """The safetensors dtype code of a numpy dtype ("float32" -> "F32", bfloat16 -> "BF16").

    Args:
        dtype: a numpy dtype, scalar type or dtype name ("bfloat16" is understood too).

    Returns:
        The code used in safetensors headers.

    Raises:
        ValueError: the dtype has no safetensors code.
    """
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return _CODES_BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"dtype {name!r} cannot be stored in safetensors; "
            f"supported: {', '.join(sorted(_CODES_BY_NAME))}"
        ) from None


def _numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a TensorInfo dtype name; `np.dtype("bfloat16")` alone is not reliable."""
    return SAFETENSORS_DTYPES[dtype_code(name)]


def _nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * _numpy_dtype(info.dtype).itemsize


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which is an int subclass in Python.
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


class SafetensorsFile:
    """One safetensors file, memory-mapped; its header is validated before anything is allocated.

    Args:
        path: the .safetensors file.

    Raises:
        MlxedgeError: the file cannot be opened, or its header is malformed or claims bytes the
            file does not have.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        # name -> (dtype, shape, absolute begin, absolute end), in data order.
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        try:
            with open_regular(self.path, "safetensors file") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    self._fail(f"is {size} bytes long, shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    self._fail(
                        f"header claims {header_len} bytes but the file has only {size - 8} "
                        "after the length field"
                    )
                if header_len > MAX_HEADER_BYTES:
                    self._fail(f"header claims {header_len} bytes, over the {MAX_HEADER_BYTES} cap")
                raw = f.read(header_len)
                self._parse_header(raw, data_start=8 + header_len, data_size=size - 8 - header_len)
                # mmap keeps its own reference to the file, so the handle can close.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise MlxedgeError(
                f"cannot read: {exc.strerror or exc}", path=self.path, fix="check the path"
            ) from exc

    def _fail(self, problem: str, fix: str = _CORRUPT_FIX) -> NoReturn:
        raise MlxedgeError(f"not a valid safetensors file: {problem}", path=self.path, fix=fix)

    def _parse_header(self, raw: bytes, data_start: int, data_size: int) -> None:
        try:
            header = parse_json(
                raw.decode("utf-8"), self.path, object_pairs_hook=_reject_duplicate_keys
            )
        except UnicodeDecodeError as exc:
            self._fail(f"header is not UTF-8 JSON ({exc})")
        except MlxedgeError as exc:
            self._fail(f"header: {exc.message}")
        if not isinstance(header, dict):
            self._fail(f"header is a JSON {type(header).__name__}, not an object")
        # mx.save_safetensors writes "__metadata__": null when it has none.
        metadata = header.pop(_METADATA_KEY, None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            self._fail(f"{_METADATA_KEY} must map strings to strings")
        self.metadata = metadata
        spans = []
        for name, entry in header.items():
            if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
                self._fail(f"tensor {name!r} lacks one of dtype, shape, data_offsets")
            code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if code not in SAFETENSORS_DTYPES:
                self._fail(
                    f"tensor {name!r} has unsupported dtype {code!r} "
                    f"(supported: {', '.join(SAFETENSORS_DTYPES)})",
                    fix="convert the tensor to a supported dtype and save the file again",
                )
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                self._fail(f"tensor {name!r} has shape {shape!r}; dims must be integers >= 0")
            if len(shape) > 8 or any(d >= 1 << 40 for d in shape):  # an empty one can claim any
                self._fail(f"tensor {name!r} has shape {shape!r:.80}, beyond any real tensor")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
                self._fail(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
            begin, end = offsets
            dtype = SAFETENSORS_DTYPES[code]
            expected = math.prod(shape) * dtype.itemsize
            if begin < 0 or end < begin:
                self._fail(f"tensor {name!r} has data_offsets {offsets!r} with end before begin")
            if end > data_size:
                self._fail(
                    f"tensor {name!r} ends at byte {end} of the data but the file holds only "
                    f"{data_size} data bytes"
                )
            if end - begin != expected:
                self._fail(
                    f"tensor {name!r} spans {end - begin} bytes but its shape {shape} of {code} "
                    f"needs {expected}"
                )
            spans.append((begin, end, name))
            self._entries[name] = (dtype, tuple(shape), data_start + begin, data_start + end)
        spans.sort()
        reach, reach_name = 0, ""  # furthest end so far, and whose
        for begin, end, name in spans:
            if begin < reach and begin < end:  # empty tensors overlap nothing
                self._fail(f"tensors {reach_name!r} and {name!r} overlap")
            if end > reach:
                reach, reach_name = end, name
        # Data order makes a full pass over the file read it sequentially.
        self._entries = {name: self._entries[name] for _, _, name in spans}

    def infos(self) -> list[TensorInfo]:
        """Every tensor's name, shape and numpy dtype name, in the order of its bytes in the file.

        Returns:
            One TensorInfo per tensor.
        """
        return [
            TensorInfo(name, shape, dtype.name)
            for name, (dtype, shape, _, _) in self._entries.items()
        ]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor's data (or rows [start, stop) of it), copied out of the memory map.

        The copy is what keeps streaming memory bounded: the mapped pages are released right after
        (madvise DONTNEED; a read-only file mapping simply refaults them if touched again), so the
        process holds one tensor at a time instead of every page of the file it has read so far.

        Args:
            name: the tensor's name.
            rows: read only these rows of the first axis, so a large tensor can be streamed.

        Returns:
            A writable array with the stored shape (rows trimmed) and dtype.

        Raises:
            KeyError: the file has no tensor of that name.
        """
        try:
            dtype, shape, begin, end = self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        if rows is not None and shape:
            row_bytes = (end - begin) // max(shape[0], 1)
            start, stop = max(0, rows[0]), min(shape[0], rows[1])
            begin, end = begin + start * row_bytes, begin + max(stop, start) * row_bytes
            shape = (max(stop - start, 0), *shape[1:])
        count = (end - begin) // dtype.itemsize
        # Copied as bytes: numpy releases the GIL for that, so a read-ahead thread really runs
        # alongside quantization (a bfloat16 copy would hold the GIL).
        view = np.frombuffer(self._mmap, dtype=np.uint8, count=count * dtype.itemsize, offset=begin)
        out = view.copy().view(dtype).reshape(shape)
        del view
        start = begin - begin % mmap.PAGESIZE
        if end > start and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)
        return out


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header first, then data in announced order.

    Only one tensor is ever held, so peak memory is the largest tensor, not the file. The bytes
    depend only on `infos`, `metadata` and the data: the header is compact JSON with keys in the
    announced order (`__metadata__` first), space-padded to a multiple of 8 bytes.

    Args:
        path: the file to create (overwritten if present; atomicity is `atomic_output`'s job).
        infos: every tensor, in the order they will be written.
        metadata: string pairs stored under `__metadata__` (mlx-lm writes {"format": "mlx"}).

    Raises:
        ValueError: duplicate or reserved names, negative dims, an unsupported dtype, or
            non-string metadata.
    """

    def __init__(
        self, path: Path, infos: list[TensorInfo], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self._infos = list(infos)
        self._dtypes = [_numpy_dtype(info.dtype) for info in self._infos]
        header: dict[str, object] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise ValueError("safetensors metadata must map strings to strings")
            header[_METADATA_KEY] = dict(metadata)
        offset = 0
        for info, dtype in zip(self._infos, self._dtypes, strict=True):
            if info.name in header:
                raise ValueError(f"tensor name {info.name!r} is duplicated or reserved")
            if not all(_is_int(d) and d >= 0 for d in info.shape):
                raise ValueError(f"tensor {info.name!r} has shape {info.shape}; dims must be >= 0")
            size = math.prod(info.shape) * dtype.itemsize
            header[info.name] = {
                "dtype": dtype_code(dtype),
                "shape": list(info.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # Trailing spaces are allowed by the format; they keep the data 8-byte aligned.
        encoded += b" " * (-len(encoded) % 8)
        self._next = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next announced tensor.

        Args:
            name: must be the next name announced in `infos`.
            array: data of exactly the announced shape and dtype (any memory layout).

        Raises:
            ValueError: the name is not the next one, or shape or dtype differ from the
                announcement.
        """
        if self._next >= len(self._infos):
            raise ValueError(f"{self.path}: all announced tensors are written; got {name!r}")
        info, dtype = self._infos[self._next], self._dtypes[self._next]
        if name != info.name:
            raise ValueError(f"{self.path}: expected tensor {info.name!r} next, got {name!r}")
        if tuple(array.shape) != tuple(info.shape) or array.dtype != dtype:
            raise ValueError(
                f"{self.path}: tensor {name!r} was announced as {info.shape} {info.dtype}, "
                f"got {tuple(array.shape)} {array.dtype}"
            )
        # A uint8 view, because the buffer protocol refuses ml_dtypes' bfloat16; copies only
        # non-contiguous input, one tensor at a time.
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self._next += 1

    def close(self) -> None:
        """Close the file, checking that every announced tensor was written.

        Raises:
            ValueError: some announced tensors were never written (the file is incomplete).
        """
        if self._file.closed:
            return
        self._file.close()
        if self._next != len(self._infos):
            missing = len(self._infos) - self._next
            raise ValueError(
                f"{self.path}: {missing} announced tensors were not written, "
                f"starting with {self._infos[self._next].name!r}"
            )

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            # The original error says more than "tensors were not written".
            self._file.close()


def plan_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Split tensors into shards in order, greedily, each at most `max_shard_bytes` of data.

    A tensor larger than the limit gets a shard of its own, since a tensor cannot be split.

    Args:
        infos: the tensors in writing order.
        max_shard_bytes: the data-byte budget of one shard (headers not counted, as in mlx-lm).

    Returns:
        The shards, each a non-empty list; empty when `infos` is.

    Raises:
        ValueError: `max_shard_bytes` is not positive.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorInfo]] = []
    used = 0
    for info in infos:
        size = _nbytes(info)
        if not shards or used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(info)
        used += size
    return shards


class ShardedWriter:
    """Tensors pushed one at a time into safetensors shards plus `model.safetensors.index.json`,
    laid out as mlx-lm's `save_model` does.

    One shard is named `model.safetensors`; more are `model-00001-of-0000N.safetensors`. The index
    is written in both cases. Only the tensor being written is held.

    Args:
        folder: the output folder (created if missing); usually the path `atomic_output` yields.
        infos: every tensor, in writing order.
        metadata: string pairs stored in every shard's `__metadata__`.
        max_shard_bytes: data-byte budget of one shard.
    """

    def __init__(
        self,
        folder: Path,
        infos: list[TensorInfo],
        metadata: dict[str, str] | None = None,
        max_shard_bytes: int = 5 * 2**30,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._infos = list(infos)
        self._shards = plan_shards(self._infos, max_shard_bytes) or [[]]
        self._metadata = metadata
        self._shard = -1
        self._writer: SafetensorsWriter | None = None
        self._left = 0
        self.weight_map: dict[str, str] = {}
        if not self._infos:
            self._open_next()

    def _file_name(self, number: int) -> str:
        if len(self._shards) == 1:
            return SINGLE_SHARD_NAME
        return f"model-{number:05d}-of-{len(self._shards):05d}.safetensors"

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._shard += 1
        shard = self._shards[self._shard]
        name = self._file_name(self._shard + 1)
        logger.debug("writing %s (%d tensors)", name, len(shard))
        self._writer = SafetensorsWriter(self.folder / name, shard, self._metadata)
        self._left = len(shard)

    def write(self, name: str, array: np.ndarray) -> None:
        """The next announced tensor (see `SafetensorsWriter.write`).

        Raises:
            ValueError: more tensors than announced, or one that does not match.
        """
        while self._left == 0:
            if self._shard + 1 >= len(self._shards):
                raise ValueError(f"more than the {len(self._infos)} tensors announced: {name!r}")
            self._open_next()
        self._writer.write(name, array)
        self.weight_map[name] = self._file_name(self._shard + 1)
        self._left -= 1

    def close(self) -> dict:
        """Close the last shard and write the index.

        Returns:
            The index: {"metadata": {"total_size": ...}, "weight_map": {name: file, by name}}.

        Raises:
            ValueError: some announced tensors were never written.
        """
        if self._writer is not None:
            self._writer.close()
        if len(self.weight_map) != len(self._infos):
            missing = next(i.name for i in self._infos if i.name not in self.weight_map)
            raise ValueError(f"tensors were announced but not written, e.g. {missing!r}")
        index = {
            "metadata": {"total_size": sum(_nbytes(info) for info in self._infos)},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=4), encoding="utf-8")
        return index

    def abort(self) -> None:
        """Close the open file after a failure (the caller discards the folder)."""
        if self._writer is not None and not self._writer._file.closed:
            self._writer._file.close()


def write_checkpoint(
    folder: Path,
    infos: list[TensorInfo],
    arrays: Iterable[np.ndarray],
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> dict:
    """Write tensors as safetensors shards plus their index (see `ShardedWriter`).

    Args:
        folder: the output folder (created if missing).
        infos: every tensor, in writing order.
        arrays: the tensors' data in the same order, consumed one at a time so that only one is
            held (pass a generator for streaming).
        metadata: string pairs stored in every shard's `__metadata__`.
        max_shard_bytes: data-byte budget of one shard.

    Returns:
        The index (see `ShardedWriter.close`).

    Raises:
        ValueError: `arrays` yields more or fewer tensors than `infos`, or one that does not match.
    """
    writer = ShardedWriter(folder, infos, metadata, max_shard_bytes)
    source = iter(arrays)
    try:
        for info in infos:
            array = next(source, None)
            if array is None:
                raise ValueError(f"arrays ended before tensor {info.name!r}")
            writer.write(info.name, array)
            del array  # keep at most one tensor alive
        if next(source, None) is not None:
            raise ValueError(f"arrays yielded more than the {len(infos)} tensors announced")
    except BaseException:
        writer.abort()
        raise
    return writer.close()
