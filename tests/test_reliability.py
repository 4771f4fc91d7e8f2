"""Reliability fixes that are not a single bad file: bounded chat-template rendering, padded
vocabularies in crosscheck, NaN payloads in the native kernel, what mse-zero guarantees with
16-bit scales, misaligned GGUF tensors, the interrupt message, and fuzzing of the parsers and of
config validation."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf import jinja_probe
from mlxedge.formats.gguf.ollama import recognise

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ_LONG = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))


# --- chat templates -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set r = range(100000) %}"
        "{% for i in r %}{% for j in r %}{{ '' }}{% endfor %}{% endfor %}",
        "{{ 'x' * 4000000000 }}",
        "{{ ('x' * 100000000) * 40 }}",
    ],
)
def test_hostile_chat_templates_are_bounded(template, monkeypatch, caplog):
    monkeypatch.setattr(jinja_probe, "TIME_LIMIT_S", 2)
    monkeypatch.setattr(jinja_probe, "MEMORY_LIMIT", 512 << 20)
    started = time.monotonic()
    assert recognise(template, {}, adds_bos=False) is None
    assert time.monotonic() - started < 20
    assert "not recognised" in caplog.text


def test_a_template_still_renders_through_the_bounded_path():
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    found = recognise(chatml, {}, adds_bos=False)
    assert found is not None and found.family.name == "ChatML"


# --- padded vocabularies ------------------------------------------------------------------------


def test_padded_vocabulary_compares_the_ids_both_define():
    from mlxedge.harness import _same_tokens

    original = {"a": 0, "b": 1}
    imported = {"a": 0, "b": 1, "[PAD2]": 2, "[PAD3]": 3}  # a GGUF export names the padding
    assert _same_tokens(original, imported) and _same_tokens(imported, original)
    assert not _same_tokens(original, {"a": 0, "c": 1})
    assert not _same_tokens(original, {"a": 0, "b": 1, "[PAD7]": 2})  # not its own id's name


def test_crosscheck_of_a_padded_model_against_its_own_gguf(tmp_path):
    from click.testing import CliRunner
    from tiny_models import TOKENIZER_VOCAB_SIZE, make_tiny_model

    from mlxedge.cli import main

    folder = make_tiny_model(tmp_path / "padded", "qwen2", vocab=TOKENIZER_VOCAB_SIZE + 13,
                             dtype="float32")  # fmt: skip
    gguf_path = tmp_path / "padded.gguf"
    run = CliRunner().invoke
    assert (
        run(main, ["export", "gguf", str(folder), "--type", "F32", "-o", str(gguf_path)]).exit_code
        == 0
    )
    result = run(main, ["crosscheck", str(gguf_path), "--reference", str(folder), "--windows", "1",
                        "--ctx", "64", "--backends", "reference", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["passed"]


# --- NaN payloads in the native kernel ----------------------------------------------------------


@pytest.mark.parametrize("bits", [0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8000, 0x7F800001])
def test_every_nan_payload_is_refused_with_bf16_storage(bits):
    from mlxedge.quant import backend
    from mlxedge.quant.schemes import AffineScheme

    w = np.ones((4, 64), np.float32)
    w.view(np.uint32)[2, 17] = bits
    assert np.isnan(w[2, 17])
    for method in ("rtn", "mse-zero"):
        with pytest.raises(backend.NonFiniteWeights):
            backend.quantize(w, AffineScheme(4, 64), "bfloat16", method)
    # numpy's (ml_dtypes') conversion keeps them NaN: the specification the kernel follows
    with np.errstate(invalid="ignore"):
        assert np.isnan(w.astype(ml_dtypes.bfloat16).astype(np.float32)[2, 17])


# --- mse-zero: what holds with 16-bit scales ----------------------------------------------------


@pytest.mark.parametrize("dtype,unit", [("float32", 2.0**-22), ("float16", 2.0**-11),
                                        ("bfloat16", 2.0**-8)])  # fmt: skip
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_zero_keeps_zero_within_one_rounding_of_the_bias(dtype, unit, bits):
    """What mse-zero guarantees (README): the code meant for 0.0 dequantizes to within
    |bias| * u of zero, u = 2^-8 with bfloat16 scales, 2^-11 with float16, 2^-22 with float32."""
    from mlxedge.quant.schemes import AffineScheme, quantize

    rng = np.random.default_rng(bits)
    w = rng.standard_normal((64, 256)).astype(np.float32) * np.float32(0.02)
    qt = quantize(w, AffineScheme(bits, 64), dtype, "mse-zero")
    s = qt.scales.astype(np.float32).reshape(-1)
    b = qt.biases.astype(np.float32).reshape(-1)
    k = np.rint(-b / s)  # the code meant for 0.0
    assert ((k >= 0) & (k <= (1 << bits) - 1)).all()
    zero = s * k + b  # what that code dequantizes to
    assert (np.abs(zero) <= np.abs(b) * unit).all()
    assert (np.abs(zero) <= np.abs(s) * k * unit).all()  # in steps: at most k * u


# --- GGUF: misaligned tensors -------------------------------------------------------------------


def test_a_misaligned_tensor_offset_is_refused(tmp_path):
    import gguf

    from mlxedge.formats.gguf.reader import open_gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("a", np.zeros(8, np.float32))
    writer.add_tensor("b", np.zeros(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    # b's offset (uint64, the last 8 bytes of its tensor entry) moved by 4 bytes
    at = data.index(struct.pack("<Q", 1) + b"b") + 9 + 4 + 8 + 4  # name, n_dims, ne0, type
    (offset,) = struct.unpack_from("<Q", data, at)
    assert offset % 32 == 0
    struct.pack_into("<Q", data, at, offset + 4)
    path.write_bytes(bytes(data))
    with pytest.raises(MlxedgeError, match="tensor b starts at offset .* not a multiple of the "
                                           "alignment 32") as err:  # fmt: skip
        open_gguf(path)
    assert str(path) in str(err.value)


# --- the interrupt message ----------------------------------------------------------------------


def test_the_interrupt_message_says_what_was_complete(tmp_path, monkeypatch, capsys):
    from mlxedge import atomic, cli

    monkeypatch.setattr(atomic, "COMMITTED", [])
    with pytest.raises(SystemExit) as done:
        cli._interrupted(KeyboardInterrupt())
    assert done.value.code == 130 and "interrupted; nothing was written" in capsys.readouterr().err
    with atomic.atomic_output(tmp_path / "first"):
        pass
    with pytest.raises(SystemExit) as done:
        cli._interrupted(cli._Terminated())
    err = capsys.readouterr().err
    assert done.value.code == 143
    assert f"terminated; complete before the interruption: {tmp_path / 'first'}" in err


# --- fuzzing ------------------------------------------------------------------------------------


def _safetensors_bytes(header: bytes, payload: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + payload


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _valid_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                         "__metadata__": {"format": "pt"}}).encode()  # fmt: skip
    return _safetensors_bytes(header, np.arange(6, dtype=np.float32).tobytes())


def _mutants():
    valid = _valid_safetensors()
    return st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda at, new: valid[:at] + new + valid[at + len(new) :],
            st.integers(0, len(valid)),
            st.binary(min_size=1, max_size=8),
        ),
        st.builds(lambda n: valid[:n], st.integers(0, len(valid))),
    )


def _check_safetensors(data: bytes, folder: Path) -> None:
    from mlxedge.formats.safetensors import SafetensorsFile

    path = folder / "x.safetensors"
    path.write_bytes(data)
    try:
        f = SafetensorsFile(path)
        for info in f.infos():
            f.read(info.name)
    except MlxedgeError as e:
        assert str(path) in str(e)


@FUZZ
@given(data=_mutants())
def test_fuzz_safetensors_parser(data, fuzz_dir):
    _check_safetensors(data, fuzz_dir)


@pytest.mark.slow
@FUZZ_LONG
@given(data=_mutants())
def test_fuzz_safetensors_parser_long(data, fuzz_dir):
    _check_safetensors(data, fuzz_dir)


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> bytes:
    import gguf

    path = tmp_path_factory.mktemp("g") / "v.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("x.floats", [1.0, 2.0, 3.0])
    writer.add_tensor("t", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _check_gguf(data: bytes, folder: Path) -> None:
    from mlxedge.formats.gguf.reader import open_gguf

    path = folder / "x.gguf"
    path.write_bytes(data)
    try:
        f = open_gguf(path)
        for t in f.tensors.values():
            f.data(t)
    except MlxedgeError as e:
        assert str(path) in str(e)


def _gguf_mutants(valid: bytes):
    return st.one_of(
        st.builds(
            lambda at, new: valid[:at] + new + valid[at + len(new) :],
            st.integers(0, 200),
            st.binary(min_size=1, max_size=8),
        ),  # fmt: skip
        st.builds(lambda n: valid[:n], st.integers(0, len(valid))),
    )


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_reader(data, valid_gguf, fuzz_dir):
    _check_gguf(data.draw(_gguf_mutants(valid_gguf)), fuzz_dir)


@pytest.mark.slow
@FUZZ_LONG
@given(data=st.data())
def test_fuzz_gguf_reader_long(data, valid_gguf, fuzz_dir):
    _check_gguf(data.draw(_gguf_mutants(valid_gguf)), fuzz_dir)


_CONFIG_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=5), st.lists(st.integers(0, 8), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "vocab_size", "head_dim", "rms_norm_eps", "rope_theta",
         "max_position_embeddings", "tie_word_embeddings", "attention_bias", "rope_scaling",
         "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"]  # fmt: skip


def _check_config(model_type: str, changes: dict) -> None:
    from mlxedge.archs import arch_for

    config = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 300, **changes}  # fmt: skip
    try:
        arch = arch_for(config, "fuzz/config.json")
        table = arch.tensors()
    except MlxedgeError as e:
        assert "fuzz/config.json" in str(e)
        return
    spec = arch.spec
    assert 1 <= spec.n_layers <= 1024 and spec.n_heads % spec.n_kv_heads == 0
    assert all(d > 0 for e in table for d in e.shape)


@FUZZ
@given(model_type=st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]),
       changes=st.dictionaries(st.sampled_from(_KEYS), _CONFIG_VALUES, max_size=4))  # fmt: skip
def test_fuzz_config_validation(model_type, changes):
    _check_config(model_type, changes)


@pytest.mark.slow
@FUZZ_LONG
@given(model_type=st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]),
       changes=st.dictionaries(st.sampled_from(_KEYS), _CONFIG_VALUES, max_size=6))  # fmt: skip
def test_fuzz_config_validation_long(model_type, changes):
    _check_config(model_type, changes)


# --- code in a model folder is never run --------------------------------------------------------


def test_a_config_model_file_is_never_run(tmp_path):
    from click.testing import CliRunner
    from tiny_models import make_tiny_model

    from mlxedge.cli import main

    folder = make_tiny_model(tmp_path / "m", "llama", layers=1, dtype="float32")
    out = tmp_path / "q"
    assert CliRunner().invoke(main, ["quantize", str(folder), "-o", str(out)]).exit_code == 0
    marker = tmp_path / "ran"
    (out / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((out / "config.json").read_text())
    config["model_file"] = "custom.py"
    (out / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["crosscheck", str(out), "--reference", str(folder),
                                       "--windows", "1", "--ctx", "64", "--backends", "mlx",
                                       "--json"])  # fmt: skip
    (row,) = json.loads(result.output)
    assert "never runs code" in row["skipped"] and not marker.exists()


# --- OS errors on the output path ---------------------------------------------------------------


@pytest.mark.parametrize(
    "err,says",
    [
        (OSError(30, "Read-only file system"), "read-only"),
        (OSError(13, "Permission denied"), "you may not write there"),
    ],
)
def test_os_errors_creating_the_output_are_one_message(err, says, tmp_path, monkeypatch):
    from mlxedge import atomic

    def refuse(*args, **kwargs):
        raise err

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    with pytest.raises(MlxedgeError, match=says) as e:
        with atomic.atomic_output(tmp_path / "out"):
            pass
    assert str(tmp_path / "out") in str(e.value) and list(tmp_path.iterdir()) == []


def test_a_short_write_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import gguf
    from click.testing import CliRunner
    from tiny_models import make_tiny_model

    from mlxedge import atomic
    from mlxedge.cli import main

    folder = make_tiny_model(tmp_path / "m", "llama", layers=1, dtype="float32")

    def short_write(self, *args, **kwargs):  # what numpy's tofile raises on a full disk
        raise OSError("1024 requested and 0 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", short_write)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    out = tmp_path / "out" / "m.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", str(folder), "--type", "Q8_0", "-o",
                                       str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "no space left on device" in result.output and "Traceback" not in result.output
    assert list((tmp_path / "out").iterdir()) == []
