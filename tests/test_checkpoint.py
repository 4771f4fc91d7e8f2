"""Streaming safetensors reader/writer and shard index, checked against `safetensors` and
`mx.load` as independent readers."""

from __future__ import annotations

import json
import struct
import weakref
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from mlxedge.errors import MlxedgeError
from mlxedge.formats.hf import HFCheckpoint
from mlxedge.formats.safetensors import (
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    SafetensorsFile,
    SafetensorsWriter,
    dtype_code,
    plan_shards,
    write_checkpoint,
)
from mlxedge.model import TensorInfo

BF16 = ml_dtypes.bfloat16


def sample_tensors() -> dict[str, np.ndarray]:
    """Odd sizes on purpose, so later tensors start at offsets that are not 4-byte aligned."""
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((3, 3)).astype(np.float16),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((5, 3)).astype(BF16),
        "model.layers.0.self_attn.q_proj.scales": rng.integers(0, 2**32, (3,), dtype=np.uint32),
        "lm_head.weight": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float16),
    }


def infos_of(tensors: dict[str, np.ndarray]) -> list[TensorInfo]:
    return [TensorInfo(k, tuple(v.shape), v.dtype.name) for k, v in tensors.items()]


def write_file(path: Path, tensors: dict[str, np.ndarray], metadata=None) -> None:
    with SafetensorsWriter(path, infos_of(tensors), metadata) as writer:
        for name, array in tensors.items():
            writer.write(name, array)


def raw_file(path: Path, header: object, data: bytes = b"", header_bytes: bytes | None = None):
    encoded = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def assert_mx_equal(loaded: mx.array, expected: np.ndarray) -> None:
    """Exact comparison; bfloat16 goes through float32, which holds every bfloat16 value."""
    if loaded.dtype == mx.bfloat16:
        loaded, expected = loaded.astype(mx.float32), expected.astype(np.float32)
    got = np.array(loaded)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_dtype_table_round_trips():
    for code, dtype in SAFETENSORS_DTYPES.items():
        assert dtype_code(dtype) == code
        assert dtype_code(dtype.name) == code
    assert dtype_code(BF16) == "BF16"
    with pytest.raises(ValueError, match="complex64"):
        dtype_code(np.complex64)


def test_round_trip_against_safetensors_and_mlx(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    write_file(path, tensors, {"format": "mlx"})
    assert (struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0

    # safetensors (Rust parser): every header entry, every non-bf16 value.
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "mlx"}
        assert set(f.keys()) == set(tensors)
        for name, array in tensors.items():
            assert f.get_slice(name).get_dtype() == dtype_code(array.dtype)
            assert tuple(f.get_slice(name).get_shape()) == array.shape
            if array.dtype != BF16:
                np.testing.assert_array_equal(f.get_tensor(name), array)

    # MLX reads every dtype, bfloat16 included.
    loaded, metadata = mx.load(str(path), return_metadata=True)
    assert metadata == {"format": "mlx"}
    for name, array in tensors.items():
        assert_mx_equal(loaded[name], array)
    assert loaded["model.layers.0.self_attn.q_proj.weight"].dtype == mx.bfloat16
    assert loaded["model.layers.0.self_attn.q_proj.scales"].dtype == mx.uint32

    # And our own reader, which returns private copies.
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "mlx"}
    assert st.infos() == infos_of(tensors)
    for name, array in tensors.items():
        got = st.read(name)
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        # a copy (owning its memory, directly or through one base array), not a view of the map:
        # mapped pages are released
        owner = got if got.base is None else got.base
        assert got.flags.writeable and isinstance(owner, np.ndarray) and owner.flags.owndata


def test_reads_files_from_safetensors_numpy(tmp_path):
    tensors = {k: v for k, v in sample_tensors().items() if v.dtype != BF16}
    path = tmp_path / "np.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "pt"}
    assert {i.name for i in st.infos()} == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(st.read(name), array)
    # The Rust writer orders data by alignment, so data order differs from name order; our
    # infos follow the data.
    starts = [st._entries[i.name][2] for i in st.infos()]
    assert starts == sorted(starts)


def test_reads_bfloat16_from_mlx(tmp_path):
    path = tmp_path / "mx.safetensors"
    a = mx.arange(12, dtype=mx.float32).reshape(3, 4).astype(mx.bfloat16) / 3
    b = mx.array([1, 2, 3], dtype=mx.int8)
    mx.save_safetensors(str(path), {"a": a, "b": b}, metadata={"format": "mlx"})
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "mlx"}
    got = st.read("a")
    assert got.dtype == BF16 and got.shape == (3, 4)
    np.testing.assert_array_equal(got.astype(np.float32), np.array(a.astype(mx.float32)))
    np.testing.assert_array_equal(st.read("b"), np.array([1, 2, 3], dtype=np.int8))


def test_deterministic_bytes(tmp_path):
    tensors = sample_tensors()
    write_file(tmp_path / "a.safetensors", tensors, {"format": "mlx"})
    write_file(tmp_path / "b.safetensors", dict(tensors), {"format": "mlx"})
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data == (tmp_path / "b.safetensors").read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + header_len]
    assert header.startswith(b'{"__metadata__":{"format":"mlx"},"model.embed_tokens.weight":')
    assert list(json.loads(header))[1:] == list(tensors)


def test_writer_rejects_out_of_order_and_mismatched(tmp_path):
    tensors = sample_tensors()
    infos = infos_of(tensors)
    names = list(tensors)
    with SafetensorsWriter(tmp_path / "w.safetensors", infos) as writer:
        with pytest.raises(ValueError, match="expected tensor"):
            writer.write(names[1], tensors[names[1]])
        with pytest.raises(ValueError, match="announced as"):
            writer.write(names[0], tensors[names[0]].astype(np.float16))
        with pytest.raises(ValueError, match="announced as"):
            writer.write(names[0], tensors[names[0]].T)
        # A transposed (non-contiguous) view of the right shape is fine.
        writer.write(names[0], np.ascontiguousarray(tensors[names[0]].T).T)
        for name in names[1:]:
            writer.write(name, tensors[name])
        with pytest.raises(ValueError, match="all announced"):
            writer.write("extra", tensors[names[0]])
    np.testing.assert_array_equal(
        SafetensorsFile(tmp_path / "w.safetensors").read(names[0]), tensors[names[0]]
    )

    writer = SafetensorsWriter(tmp_path / "short.safetensors", infos)
    writer.write(names[0], tensors[names[0]])
    with pytest.raises(ValueError, match="not written"):
        writer.close()
    with pytest.raises(ValueError, match="duplicated"):
        SafetensorsWriter(tmp_path / "d.safetensors", [infos[0], infos[0]])
    with pytest.raises(ValueError, match=">= 0"):
        SafetensorsWriter(tmp_path / "n.safetensors", [TensorInfo("x", (-1, 2), "float32")])
    with pytest.raises(ValueError, match="strings"):
        SafetensorsWriter(tmp_path / "m.safetensors", infos, {"format": 1})
    with pytest.raises(ValueError, match="cannot be stored"):
        SafetensorsWriter(tmp_path / "q.safetensors", [TensorInfo("x", (2,), "Q4_K")])


def test_plan_shards_is_greedy_and_ordered():
    infos = [TensorInfo(f"t{i}", (n,), "float32") for i, n in enumerate([4, 4, 10, 1, 1, 1])]
    shards = plan_shards(infos, max_shard_bytes=32)
    assert [[i.name for i in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert plan_shards([], 8) == []
    with pytest.raises(ValueError):
        plan_shards(infos, 0)


def test_sharded_checkpoint_round_trip(tmp_path):
    tensors = sample_tensors()
    infos = infos_of(tensors)
    served = []

    def stream():
        for name, array in tensors.items():
            served.append(name)
            yield array

    index = write_checkpoint(tmp_path, infos, stream(), {"format": "mlx"}, max_shard_bytes=100)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(files)
    assert n > 1 and served == list(tensors)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert list(index["weight_map"]) == sorted(tensors)
    on_disk = (tmp_path / INDEX_NAME).read_text()
    assert json.loads(on_disk) == index and on_disk == json.dumps(index, indent=4)

    ckpt = HFCheckpoint.from_folder(tmp_path)
    assert ckpt.infos() == infos  # shards in order, tensors in data order
    for name, array in tensors.items():
        np.testing.assert_array_equal(ckpt.read(name), array)
        with safe_open(str(tmp_path / index["weight_map"][name]), framework="numpy") as f:
            assert f.metadata() == {"format": "mlx"}
            if array.dtype != BF16:
                np.testing.assert_array_equal(f.get_tensor(name), array)
        loaded = mx.load(str(tmp_path / index["weight_map"][name]))[name]
        assert_mx_equal(loaded, array)


def test_shards_may_be_symlinks_like_a_hub_cache_snapshot(tmp_path):
    """A Hub cache snapshot is a folder of symlinks into ../../blobs: it must load as it is."""
    tensors = sample_tensors()
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    write_checkpoint(blobs, infos_of(tensors), iter(tensors.values()), {}, max_shard_bytes=100)
    snapshot.mkdir(parents=True)
    for f in blobs.iterdir():
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    ckpt = HFCheckpoint.from_folder(snapshot)
    for name, array in tensors.items():
        np.testing.assert_array_equal(ckpt.read(name), array)


def test_single_shard_checkpoint_and_no_index_folder(tmp_path):
    tensors = sample_tensors()
    out = tmp_path / "one"
    index = write_checkpoint(out, infos_of(tensors), iter(tensors.values()))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", INDEX_NAME]
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    # load_file reads everything numpy can hold.
    small = {k: v for k, v in tensors.items() if v.dtype != BF16}
    write_checkpoint(tmp_path / "np", infos_of(small), small.values())
    for name, value in load_file(str(tmp_path / "np" / "model.safetensors")).items():
        np.testing.assert_array_equal(value, small[name])

    # Without an index every *.safetensors file is read, sorted.
    (out / INDEX_NAME).unlink()
    assert {i.name for i in HFCheckpoint.from_folder(out).infos()} == set(tensors)


def test_write_checkpoint_holds_one_array_at_a_time(tmp_path):
    infos = [TensorInfo(f"t{i}", (1000,), "float32") for i in range(4)]
    refs: list[weakref.ref] = []

    def stream():
        for i in range(len(infos)):
            # The previous array must be gone by the time the next one is asked for.
            assert all(ref() is None for ref in refs)
            array = np.full(1000, i, np.float32)
            refs.append(weakref.ref(array))
            yield array
            del array

    write_checkpoint(tmp_path, infos, stream(), max_shard_bytes=8000)
    assert len(refs) == 4
    np.testing.assert_array_equal(HFCheckpoint.from_folder(tmp_path).read("t3"), np.full(1000, 3))


def test_write_checkpoint_counts_arrays(tmp_path):
    tensors = sample_tensors()
    values = list(tensors.values())
    with pytest.raises(ValueError, match="ended before"):
        write_checkpoint(tmp_path / "a", infos_of(tensors), values[:-1])
    with pytest.raises(ValueError, match="more than"):
        write_checkpoint(tmp_path / "b", infos_of(tensors), values + values[:1])


def test_folder_errors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(MlxedgeError, match="only safetensors") as err:
        HFCheckpoint.from_folder(tmp_path)
    assert str(tmp_path) in str(err.value) and "convert" in str(err.value)

    write_file(tmp_path / "a.safetensors", {"x": np.zeros(2, np.float32)})
    write_file(tmp_path / "b.safetensors", {"x": np.ones(2, np.float32)})
    with pytest.raises(MlxedgeError, match="in both a.safetensors and b.safetensors"):
        HFCheckpoint.from_folder(tmp_path)

    # With an index only the named tensors exist, and missing shards or tensors are reported.
    index = {"metadata": {}, "weight_map": {"x": "b.safetensors"}}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    ckpt = HFCheckpoint.from_folder(tmp_path)
    np.testing.assert_array_equal(ckpt.read("x"), np.ones(2, np.float32))
    assert [i.name for i in ckpt.infos()] == ["x"]
    index["weight_map"]["y"] = "c.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MlxedgeError, match="c.safetensors, which is missing"):
        HFCheckpoint.from_folder(tmp_path)
    index["weight_map"]["y"] = "a.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MlxedgeError, match="'y'"):
        HFCheckpoint.from_folder(tmp_path)
    index["weight_map"]["y"] = "../a.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MlxedgeError, match="outside the folder"):
        HFCheckpoint.from_folder(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(MlxedgeError, match=INDEX_NAME):
        HFCheckpoint.from_folder(tmp_path)


GOOD = {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    "header, data, header_bytes, problem",
    [
        (None, b"", b"", "shorter than the 8-byte"),
        (GOOD, b"\0" * 8, None, "file holds only 8 data bytes"),  # truncated download
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", None, "only 0 data"),
        (None, b"\0" * 16, b"\xff\xfe{}", "not UTF-8 JSON"),
        (None, b"", b"[1, 2]", "not an object"),
        (None, b"", b'{"t": {"dtype": "F32"}}', "lacks one of dtype"),
        ({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "'Q4'"),
        ({"t": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}, b"\0" * 8, None, ">="),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "before"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12, None, "needs"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, None, "[begin"),
        ({"__metadata__": {"a": 1}}, b"", None, "strings to strings"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            None,
            "overlap",
        ),
        (None, b"", b'{"t": 1, "t": 2}', "duplicate key"),
    ],
)
def test_corrupt_headers_name_the_file(tmp_path, header, data, header_bytes, problem):
    path = raw_file(tmp_path / "bad.safetensors", header, data, header_bytes)
    if header is None and header_bytes == b"" and data == b"":
        path.write_bytes(b"\x05\0\0")  # shorter than the length field itself
    with pytest.raises(MlxedgeError) as err:
        SafetensorsFile(path)
    message = str(err.value)
    assert str(path) in message and problem in message and "fix:" in message


@pytest.mark.parametrize("claimed", [64, 2**63, 200 * 2**20])
def test_header_length_beyond_file_or_cap(tmp_path, claimed):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", claimed) + b"{}")
    with pytest.raises(MlxedgeError, match="header claims") as err:
        SafetensorsFile(path)
    assert "huge.safetensors" in str(err.value)


def test_header_over_cap_is_refused_before_reading(tmp_path):
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 8))
        f.truncate(MAX_HEADER_BYTES + 64)  # sparse: big enough, costs no disk
    with pytest.raises(MlxedgeError, match="cap") as err:
        SafetensorsFile(path)
    assert "sparse.safetensors" in str(err.value)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_file(path, sample_tensors())
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(MlxedgeError, match="truncated or corrupt") as err:
        SafetensorsFile(path)
    assert "cut.safetensors" in str(err.value)
