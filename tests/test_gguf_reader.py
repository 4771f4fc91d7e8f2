"""Our GGUF reader against gguf-py's: the same metadata and tensor table on real and generated
files; and on damaged ones one clear error, fast and in bounded memory, where gguf-py loops."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from llamacpp_util import llama_cpp_data

from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf.reader import open_gguf

PSEUDO = "GGUF."  # gguf-py's fields for the header (version, counts), not metadata


def gguf_py(path: Path) -> tuple[dict, list]:
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(PSEUDO)}
    return meta, reader.tensors


def assert_same_as_gguf_py(path: Path) -> None:
    meta, tensors = gguf_py(path)
    ours = open_gguf(path)
    assert list(ours.metadata) == list(meta)  # same keys, same order
    for key, value in meta.items():
        assert ours.metadata[key] == value, key  # values parsed from the same stored bytes
    assert list(ours.tensors) == [t.name for t in tensors]
    for t in tensors:
        mine = ours.tensors[t.name]
        assert (mine.type, mine.offset, mine.n_bytes) == (t.tensor_type, t.data_offset, t.n_bytes)
        assert mine.shape == tuple(reversed(t.shape.tolist()))
        data = ours.data(mine)
        assert data.dtype == t.data.dtype and data.shape == t.data.shape
        assert np.array_equal(data.view(np.uint8), t.data.view(np.uint8)), t.name


@pytest.fixture(scope="module")
def every_type(tmp_path_factory) -> Path:
    """A file with a value of every metadata type, arrays of each, and tensors of several."""
    path = tmp_path_factory.mktemp("g") / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "日本"])
    w.add_array("t.bools", [True, False])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    q = gguf.quants.quantize(
        rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_reads_as_gguf_py_reads_it(every_type):
    assert_same_as_gguf_py(every_type)
    meta = open_gguf(every_type).metadata
    assert meta["t.u64"] == 2**63 + 5 and meta["t.str"] == "héllo ✓"


def test_smollm2_reads_as_gguf_py_reads_it():
    from mlxedge.default_model import default_model_path

    assert_same_as_gguf_py(default_model_path())


SMALL_VOCABS = ["gpt-2", "llama-spm", "phi-3"]


@pytest.mark.parametrize("name", SMALL_VOCABS)
def test_llama_cpp_vocab_files_read_as_gguf_py_reads_them(name):
    assert_same_as_gguf_py(llama_cpp_data() / "models" / f"ggml-vocab-{name}.gguf")


@pytest.mark.slow
def test_every_llama_cpp_vocab_file_reads_as_gguf_py_reads_it():
    files = sorted((llama_cpp_data() / "models").glob("ggml-vocab-*.gguf"))
    assert len(files) >= 19  # llama.cpp 0.3.36 ships 19
    for path in files:
        assert_same_as_gguf_py(path)


# --------------------------------------------------------------------------------- damaged files


def header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def refused(path: Path, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(MlxedgeError, match=match) as err:
        open_gguf(path)
    assert time.perf_counter() - start < 5  # a hang guard, not a speed target
    assert str(path) in str(err.value)


def test_an_array_claiming_2_to_the_40_entries_fails_at_once(tmp_path):
    path = tmp_path / "huge.gguf"
    array = struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32, 2**40)
    path.write_bytes(header(0, 1) + key("a") + array + b"\0" * 64)
    refused(path, "claims 1099511627776 values")
    strings = struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, 2**40)
    path.write_bytes(header(0, 1) + key("a") + strings + b"\0" * 64)
    refused(path, "claims 1099511627776 strings")


def test_absurd_counts_and_lengths_are_refused(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(header(2**60, 2**60))
    refused(path, "more than 24 bytes can hold")
    path.write_bytes(header(0, 1) + struct.pack("<Q", 2**62) + b"k" * 64)
    refused(path, "metadata key 0 claims")
    value = struct.pack("<IQ", gguf.GGUFValueType.STRING, 2**50)
    path.write_bytes(header(0, 1) + key("k") + value + b"abc")
    refused(path, "runs past the end")
    value = struct.pack("<I", 99)
    path.write_bytes(header(0, 1) + key("k") + value + b"\0" * 16)
    refused(path, "unknown value type 99")
    nested = struct.pack("<IQ", gguf.GGUFValueType.ARRAY, 1) * 8  # (type, count) of each level
    value = struct.pack("<I", gguf.GGUFValueType.ARRAY) + nested
    path.write_bytes(header(0, 1) + key("k") + value + b"\0" * 64)
    refused(path, "nests arrays")


def test_every_cut_of_a_real_file_is_one_clear_error(every_type, tmp_path):
    data = every_type.read_bytes()
    file = open_gguf(every_type)
    end = max(t.offset + t.n_bytes for t in file.tensors.values())  # then only padding
    cut = tmp_path / "cut.gguf"
    for n in range(0, end, 7):
        cut.write_bytes(data[:n])
        with pytest.raises(MlxedgeError, match="not a complete GGUF file"):
            open_gguf(cut)


def test_random_damage_parses_or_is_one_clear_error(every_type, tmp_path):
    data = bytearray(every_type.read_bytes())
    end = open_gguf(every_type).data_start  # damage the header, metadata and tensor table
    rng = np.random.default_rng(0)
    path = tmp_path / "mutant.gguf"
    for _ in range(300):
        mutant = bytearray(data)
        for i in rng.integers(0, end, 3):
            mutant[i] = rng.integers(0, 256)
        path.write_bytes(mutant)
        try:
            open_gguf(path)
        except MlxedgeError as err:
            assert str(path) in str(err)


def test_a_fifo_is_not_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.gguf")
    refused(tmp_path / "fifo.gguf", "not a regular file")
