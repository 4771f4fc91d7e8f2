"""Reading a GGUF file: its header, metadata and tensor table, bounds-checked and in bulk.

Why not gguf-py's `GGUFReader`: it builds a numpy view for every metadata element, so opening
SmolLM2 (49k tokens, 49k merges) takes over 3 s, a 150k-token vocabulary about 20 s and a
3M-entry array gigabytes; and it trusts the counts in the header, so a corrupt count makes it
loop or allocate without bound. Here every count and length is checked against the bytes left
in the file before it is used, numeric arrays are read with one `np.frombuffer`, and string
arrays in one pass. gguf-py remains the source of the format's constants, and the independent
reader the tests hold this one to (tests/test_gguf_reader.py).

The layout (little-endian): magic "GGUF", version (uint32, 2 or 3), tensor count and metadata
count (uint64 each); the metadata, each a string key, a uint32 value type and the value (strings
are a uint64 length and UTF-8 bytes, arrays an element type, a uint64 count and the elements);
the tensor table, each a name, n_dims (uint32), n_dims uint64 sizes (fastest-varying first), a
uint32 ggml type and a uint64 offset; then, aligned to `general.alignment` (default 32), the
tensor data, each tensor at its offset from the data's start.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from mlxedge.errors import MlxedgeError

INCOMPLETE = "is not a complete GGUF file"
REFETCH = "if the file was cut short or damaged in transit, download or copy it again"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 3  # arrays of arrays of arrays; nothing real goes deeper
_MAX_KEY_BYTES = 1 << 16

_SCALARS = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("B", np.uint8),
    GGUFValueType.INT8: ("b", np.int8),
    GGUFValueType.UINT16: ("H", np.uint16),
    GGUFValueType.INT16: ("h", np.int16),
    GGUFValueType.UINT32: ("I", np.uint32),
    GGUFValueType.INT32: ("i", np.int32),
    GGUFValueType.FLOAT32: ("f", np.float32),
    GGUFValueType.BOOL: ("?", np.bool_),
    GGUFValueType.UINT64: ("Q", np.uint64),
    GGUFValueType.INT64: ("q", np.int64),
    GGUFValueType.FLOAT64: ("d", np.float64),
}
# Element dtypes of tensor data gguf-py's dequantizer takes as typed arrays; other types are
# handed over as their raw block bytes.
_TYPED_DATA = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table.

    Attributes:
        name: the GGUF tensor name ("blk.0.attn_q.weight").
        shape: numpy order, slowest-varying first (GGUF's `ne` reversed): (rows, cols).
        type: the ggml storage type.
        offset: where the data starts, from the beginning of the file.
        n_bytes: how many bytes the data takes.
    """

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int
    n_bytes: int


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; running out is one clear error."""

    def __init__(self, buf, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> MlxedgeError:
        return MlxedgeError(f"{INCOMPLETE} ({what})", path=self.path, fix=REFETCH)

    def take(self, n: int, what: str) -> int:
        """Advance over n bytes; return where they start."""
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} runs past the end of the file at byte {self.pos}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(n, what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("Q", what)
        if limit is not None and n > limit:
            raise self.fail(f"{what} claims {n} bytes")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        try:
            fmt, _ = _SCALARS[GGUFValueType(vtype)]
        except (ValueError, KeyError):
            raise self.fail(f"{what} has unknown value type {vtype}") from None
        return self.scalar(fmt, what)

    def array(self, what: str, depth: int) -> list:
        if depth >= _MAX_NESTING:
            raise self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
        etype = self.scalar("I", what)
        count = self.scalar("Q", what)
        left = self.size - self.pos
        if etype == GGUFValueType.STRING:
            if count > left // 8:  # every string has at least its 8-byte length
                raise self.fail(f"{what} claims {count} strings, more than the file can hold")
            return self._strings(count, what)
        if etype == GGUFValueType.ARRAY:
            if count > left // 12:  # every array has at least its type and count
                raise self.fail(f"{what} claims {count} arrays, more than the file can hold")
            return [self.array(what, depth + 1) for _ in range(count)]
        try:
            _, dtype = _SCALARS[GGUFValueType(etype)]
        except (ValueError, KeyError):
            raise self.fail(f"{what} has unknown element type {etype}") from None
        itemsize = np.dtype(dtype).itemsize
        if count > left // itemsize:
            raise self.fail(f"{what} claims {count} values, more than the file can hold")
        start = self.take(count * itemsize, what)
        values = np.frombuffer(self.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                               offset=start)  # fmt: skip
        return values.tolist()

    def _strings(self, count: int, what: str) -> list[str]:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if size - pos < 8:
                self.pos = pos
                raise self.fail(f"{what} runs past the end of the file at byte {pos}")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                raise self.fail(f"{what} runs past the end of the file at byte {pos}")
            try:
                out.append(bytes(buf[pos : pos + n]).decode("utf-8"))
            except UnicodeDecodeError:
                raise self.fail(f"{what} holds a string that is not UTF-8") from None
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """An open GGUF file: metadata and tensor table parsed, tensor data memory-mapped on use.

    Attributes:
        path: the file.
        version: the GGUF version (2 or 3).
        metadata: every key with a plain Python value (arrays as lists).
        tensors: the tensor table in file order, by name.
        data_start: where the tensor data section begins.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            # stat before open: opening a FIFO for reading would block until someone writes.
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                raise MlxedgeError("is not a regular file", path=self.path)
            with open(self.path, "rb") as fh:
                size = self._file_size(fh)
                if size < 24:
                    raise MlxedgeError(f"{INCOMPLETE} (no GGUF header)", path=path, fix=REFETCH)
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self._parse(buf)
        except OSError as err:
            raise MlxedgeError(f"cannot read the file: {err.strerror}", path=path) from err
        self._data: np.memmap | None = None

    @staticmethod
    def _file_size(fh) -> int:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise MlxedgeError("is not a regular file", path=fh.name)
        return st.st_size

    def _parse(self, buf) -> None:
        cur = _Cursor(buf, self.path)
        if bytes(buf[:4]) != b"GGUF":
            raise MlxedgeError(f"{INCOMPLETE} (no GGUF header)", path=self.path, fix=REFETCH)
        cur.take(4, "the magic")
        version = cur.scalar("I", "the version")
        if version & 0xFFFF == 0:
            raise MlxedgeError(
                "is a big-endian GGUF file, which is not supported",
                path=self.path,
                fix="convert the model on a little-endian machine (any Mac or PC)",
            )
        if version not in (2, 3):
            raise MlxedgeError(f"GGUF version {version} is not supported (2 and 3 are)",
                               path=self.path)  # fmt: skip
        self.version = version
        n_tensors = cur.scalar("Q", "the tensor count")
        n_kv = cur.scalar("Q", "the metadata count")
        # The smallest key/value: key length (8), one key byte, type (4), one value byte; the
        # smallest tensor entry: name length (8), a name byte, n_dims (4), a size (8), type (4),
        # offset (8). Counts beyond what the file can hold are refused before any loop runs.
        if n_kv * 14 + n_tensors * 33 > cur.size - cur.pos:
            raise cur.fail(f"its header lists {n_tensors} tensors and {n_kv} metadata keys, "
                           f"more than {cur.size} bytes can hold")  # fmt: skip
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}", limit=_MAX_KEY_BYTES)
            if key in metadata:
                raise cur.fail(f"metadata key {key} appears twice")
            metadata[key] = cur.value(cur.scalar("I", f"the type of {key}"), f"metadata {key}")
        self.metadata = metadata
        entries = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name {i}", limit=_MAX_KEY_BYTES)
            n_dims = cur.scalar("I", f"tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name} has {n_dims} dimensions")
            ne = [cur.scalar("Q", f"tensor {name}") for _ in range(n_dims)]
            type_id = cur.scalar("I", f"tensor {name}")
            offset = cur.scalar("Q", f"tensor {name}")
            entries.append((name, ne, type_id, offset))
        alignment = metadata.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment is {alignment!r}, not a power of two")
        self.data_start = -(-cur.pos // alignment) * alignment
        self.alignment = alignment
        self.tensors = self._table(entries, cur)

    def _table(self, entries, cur: _Cursor) -> dict[str, GGUFTensor]:
        tensors: dict[str, GGUFTensor] = {}
        for name, ne, type_id, offset in entries:
            if name in tensors:
                raise cur.fail(f"tensor {name} appears twice")
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise cur.fail(f"tensor {name} has unknown type id {type_id}") from None
            if any(d == 0 for d in ne) or ne[0] % block:
                raise cur.fail(f"tensor {name} has sizes {ne}, not whole {qtype.name} blocks")
            n_elements = int(np.prod(ne, dtype=object))
            n_bytes = n_elements // block * type_size
            if offset % self.alignment:  # llama.cpp refuses these; reading them shifts bytes
                raise cur.fail(f"tensor {name} starts at offset {offset}, not a multiple of the "
                               f"alignment {self.alignment}")  # fmt: skip
            start = self.data_start + offset
            if start + n_bytes > cur.size:
                raise cur.fail(f"tensor {name} ends past the end of the file")
            tensors[name] = GGUFTensor(name, tuple(int(d) for d in reversed(ne)), qtype, start,
                                       n_bytes)  # fmt: skip
        return tensors

    def data(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's stored data, memory-mapped, shaped as gguf-py's reader shapes it (what
        `gguf.quants.dequantize` takes): typed elements for float and integer types, else the
        raw blocks as uint8 (rows, bytes per row)."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._data[tensor.offset : tensor.offset + tensor.n_bytes]
        dtype = _TYPED_DATA.get(tensor.type)
        if dtype is not None:
            return raw.view(dtype).reshape(tensor.shape)
        return raw.reshape(*tensor.shape[:-1], -1)


def open_gguf(path: Path | str) -> GGUFFile:
    """Open a GGUF file: parse its metadata and tensor table (see `GGUFFile`).

    Raises:
        MlxedgeError: unreadable, not a regular file, truncated or corrupt (the problem and the
            byte are named), big-endian, or a version other than 2 and 3.
    """
    return GGUFFile(Path(path))
