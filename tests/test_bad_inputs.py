"""The bad-input corpus: every hostile file or option found so far, through every command it
applies to, in process (click's CliRunner). Each run must exit with 2 and one message naming the
file (or the option), print no traceback, leave nothing behind, and stay within generous hang and
exhaustion guards (30 s, and at most 2 GB added to the worker's peak memory) — guards, not speed
targets."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from mlxedge.cli import main
from tests.tiny_models import edit_weights, make_tiny_model

GUARD_S = 30
GUARD_RSS = 2 << 30


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama, its MLX folder and its GGUF, built once; cases copy what they change."""
    root = tmp_path_factory.mktemp("base")
    hf = make_tiny_model(root / "hf", "llama", layers=2, tied=False, dtype="float32")
    runner = CliRunner()
    for args in (
        ["quantize", str(hf), "-o", str(root / "mlx"), "--method", "rtn"],
        ["export", "gguf", str(hf), "--type", "F32", "-o", str(root / "m.gguf")],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return {"hf": hf, "mlx": root / "mlx", "gguf": root / "m.gguf", "text": text}


@dataclass
class Case:
    """One bad input: `make(tmp, base)` builds it and returns the path the message must name;
    `commands` are argument lists in which MODEL, OUT and TEXT are replaced."""

    name: str
    make: Callable[[Path, dict], Path]
    commands: tuple[tuple[str, ...], ...]
    says: str  # a phrase the message must contain


QUANTIZE = ("quantize", "MODEL", "-o", "OUT")
EXPORT = ("export", "gguf", "MODEL", "--type", "Q8_0", "-o", "OUT.gguf")
INSPECT = ("inspect", "MODEL")
EVAL = ("eval", "MODEL", "--text", "TEXT", "--ctx", "64", "--windows", "1")
RECOMMEND = ("recommend", "MODEL", "--memory", "1GB")
IMPORT = ("import", "MODEL", "-o", "OUT")
CROSS = ("crosscheck", "MODEL", "--reference", "HF", "--text", "TEXT", "--ctx", "64",
         "--windows", "1", "--backends", "reference")  # fmt: skip
FOLDER_COMMANDS = (QUANTIZE, EXPORT, INSPECT, EVAL, RECOMMEND)
# inspect describes any folder, even of an architecture not supported: it does not judge values.
VALUE_COMMANDS = (QUANTIZE, EXPORT, EVAL, RECOMMEND)
LOADING_COMMANDS = (QUANTIZE, EXPORT, EVAL)  # those that read the weights against the config
GGUF_COMMANDS = (IMPORT, EVAL, EXPORT)


def _copy(base: dict, key: str, tmp: Path) -> Path:
    src = base[key]
    dst = tmp / ("model.gguf" if key == "gguf" else "model")
    (shutil.copy if src.is_file() else shutil.copytree)(src, dst)
    return dst


def config_edit(**changes) -> Callable[[Path, dict], Path]:
    def make(tmp: Path, base: dict) -> Path:
        folder = _copy(base, "hf", tmp)
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is _DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        return folder / "config.json"

    return make


_DELETE = object()


def config_text(text: str) -> Callable[[Path, dict], Path]:
    def make(tmp: Path, base: dict) -> Path:
        folder = _copy(base, "hf", tmp)
        (folder / "config.json").write_text(text)
        return folder / "config.json"

    return make


def special_file(file_name: str, kind: str) -> Callable[[Path, dict], Path]:
    """The model with `file_name` replaced by a FIFO, or by a link to /dev/zero."""

    def make(tmp: Path, base: dict) -> Path:
        path = _copy(base, "hf", tmp) / file_name
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
        return path

    return make


def nested_header(tmp: Path, base: dict) -> Path:
    folder = _copy(base, "hf", tmp)
    header = b"[" * 100_000 + b"]" * 100_000
    path = folder / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def empty_but_enormous(tmp: Path, base: dict) -> Path:
    """A zero-size tensor whose other dimension claims 2^62 (its data is empty, its shape not)."""
    folder = _copy(base, "hf", tmp)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["model.extra"] = {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return path


def nested_index(tmp: Path, base: dict) -> Path:
    folder = _copy(base, "hf", tmp)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 50_000 +
                                                         "]" * 50_000 + "}")  # fmt: skip
    return folder / "model.safetensors.index.json"


def weights_edit(edit) -> Callable[[Path, dict], Path]:
    def make(tmp: Path, base: dict) -> Path:
        folder = _copy(base, "hf", tmp)
        edit_weights(folder, edit)
        return folder

    return make


def _nan(w: dict) -> None:
    w["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan


def _transpose(w: dict) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    w[name] = np.ascontiguousarray(w[name].T)


def mlx_edit(quant=None, drop=None, reshape=None) -> Callable[[Path, dict], Path]:
    def make(tmp: Path, base: dict) -> Path:
        folder = _copy(base, "mlx", tmp)
        if quant is not None:
            config = json.loads((folder / "config.json").read_text())
            config["quantization"] = quant
            (folder / "config.json").write_text(json.dumps(config))
        if drop or reshape:
            import mlx.core as mx

            (path,) = folder.glob("*.safetensors")
            weights = dict(mx.load(str(path)))
            if drop:
                del weights[drop]
            if reshape:
                weights[reshape] = weights[reshape][:, :-1]
            mx.save_safetensors(str(path), weights)
        return folder

    return make


def gguf_edit(**meta) -> Callable[[Path, dict], Path]:
    """The tiny GGUF rewritten with metadata values replaced (type kept from the value)."""

    def make(tmp: Path, base: dict) -> Path:
        reader = gguf.GGUFReader(base["gguf"])
        arch = reader.fields["general.architecture"].contents()
        path = tmp / "model.gguf"
        writer = gguf.GGUFWriter(path, arch)
        changes = {k.format(arch=arch): v for k, v in meta.items()}
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if key in changes:
                value = changes.pop(key)
                if value is _DELETE:
                    continue
                vtype = (gguf.GGUFValueType.STRING if isinstance(value, str)
                         else gguf.GGUFValueType.UINT32)  # fmt: skip
                writer.add_key_value(key, value, vtype)
                continue
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
            else:
                writer.add_key_value(key, field.contents(), vtype)
        for tensor in reader.tensors:
            writer.add_tensor(tensor.name, np.array(tensor.data),
                              raw_shape=tuple(reversed(tensor.shape.tolist())),
                              raw_dtype=tensor.tensor_type)  # fmt: skip
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return make


def gguf_renamed_key(tmp: Path, base: dict) -> Path:
    """The tiny GGUF with general.architecture renamed in place (gguf-py always writes it)."""
    data = base["gguf"].read_bytes()
    assert data.count(b"general.architecture") == 1
    path = tmp / "model.gguf"
    path.write_bytes(data.replace(b"general.architecture", b"general.architecturX"))
    return path


def bad_text(kind: str) -> Callable[[Path, dict], Path]:
    def make(tmp: Path, base: dict) -> Path:
        path = tmp / "text.txt"
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
        return path

    return make


CASES = [
    Case("config is a FIFO", special_file("config.json", "fifo"), FOLDER_COMMANDS, "FIFO"),
    Case(
        "config is /dev/zero",
        special_file("config.json", "zero"),
        FOLDER_COMMANDS,
        "not a regular file",
    ),  # fmt: skip
    Case(
        "weights file is a FIFO",
        special_file("model.safetensors", "fifo"),
        (QUANTIZE, EXPORT, INSPECT, EVAL),
        "FIFO",
    ),  # fmt: skip
    Case("config not JSON", config_text("{nope"), FOLDER_COMMANDS, "not valid JSON"),
    Case("config is an array", config_text("[1, 2]"), FOLDER_COMMANDS, "not a JSON object"),
    Case(
        "config nested 100k deep",
        config_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        FOLDER_COMMANDS,
        "nested",
    ),  # fmt: skip
    Case(
        "config nested 100 deep",
        config_text('{"a": ' + "[" * 100 + "]" * 100 + "}"),
        FOLDER_COMMANDS,
        "nested",
    ),  # fmt: skip
    Case("safetensors header nested", nested_header, (QUANTIZE, INSPECT), "nested"),
    Case("index nested", nested_index, (QUANTIZE, INSPECT), "nested"),
    Case("empty tensor of 2^62 columns", empty_but_enormous, (QUANTIZE, INSPECT), "beyond any"),
    Case("config is {}", config_text("{}"), VALUE_COMMANDS, "model_type"),
    Case("10^9 layers", config_edit(num_hidden_layers=10**9), VALUE_COMMANDS, "num_hidden_layers"),
    Case(
        "layers 'abc'", config_edit(num_hidden_layers="abc"), VALUE_COMMANDS, "num_hidden_layers"
    ),  # fmt: skip
    Case("layers null", config_edit(num_hidden_layers=None), VALUE_COMMANDS, "num_hidden_layers"),
    Case("0 layers", config_edit(num_hidden_layers=0), VALUE_COMMANDS, "num_hidden_layers"),
    Case("-1 layers", config_edit(num_hidden_layers=-1), VALUE_COMMANDS, "num_hidden_layers"),
    Case("5 layers over 2 blocks", config_edit(num_hidden_layers=5), LOADING_COMMANDS, "missing"),
    Case("0 heads", config_edit(num_attention_heads=0), VALUE_COMMANDS, "num_attention_heads"),
    Case("hidden_size string", config_edit(hidden_size="64"), VALUE_COMMANDS, "hidden_size"),
    Case(
        "intermediate 1e12",
        config_edit(intermediate_size=1e12),
        VALUE_COMMANDS,
        "intermediate_size",
    ),  # fmt: skip
    Case(
        "positions 2^70",
        config_edit(max_position_embeddings=2**70),
        VALUE_COMMANDS,
        "max_position_embeddings",
    ),  # fmt: skip
    Case(
        "3 KV heads of 4", config_edit(num_key_value_heads=3), VALUE_COMMANDS, "not a multiple"
    ),  # fmt: skip
    Case(
        "3 heads",
        config_edit(num_attention_heads=3, head_dim=_DELETE),
        VALUE_COMMANDS,
        "num_attention_heads",
    ),  # fmt: skip
    Case(
        "vocab 1000 over fewer rows", config_edit(vocab_size=1000), LOADING_COMMANDS, "embed_tokens"
    ),  # fmt: skip
    Case("wrong KV heads", config_edit(num_key_value_heads=4), LOADING_COMMANDS, "k_proj"),
    Case(
        "tied flag a string",
        config_edit(tie_word_embeddings="false"),
        VALUE_COMMANDS,
        "tie_word_embeddings",
    ),  # fmt: skip
    Case("norm eps a string", config_edit(rms_norm_eps="1e-6"), VALUE_COMMANDS, "rms_norm_eps"),
    Case("transposed weight", weights_edit(_transpose), LOADING_COMMANDS, "down_proj"),
    Case("NaN weight", weights_edit(_nan), LOADING_COMMANDS, "NaN"),
    Case(
        "quantization without group_size",
        mlx_edit(quant={"bits": 4}),
        (INSPECT, EVAL, EXPORT),
        "group_size",
    ),  # fmt: skip
    Case(
        "quantization a string", mlx_edit(quant="4bit"), (INSPECT, EVAL, EXPORT), "quantization"
    ),  # fmt: skip
    Case(
        "quantized weight without biases",
        mlx_edit(drop="model.layers.0.mlp.up_proj.biases"),
        (INSPECT, EVAL, EXPORT),
        ".biases",
    ),  # fmt: skip
    Case(
        "scales of the wrong shape",
        mlx_edit(reshape="model.layers.0.mlp.up_proj.scales"),
        (INSPECT, EVAL, EXPORT, CROSS),
        "scales",
    ),  # fmt: skip
    Case(
        "GGUF head_count 0",
        gguf_edit(**{"{arch}.attention.head_count": 0}),
        GGUF_COMMANDS,
        "head_count",
    ),  # fmt: skip
    Case(
        "GGUF head_count_kv 3",
        gguf_edit(**{"{arch}.attention.head_count_kv": 3}),
        GGUF_COMMANDS,
        "head_count_kv",
    ),  # fmt: skip
    Case(
        "GGUF embedding_length string",
        gguf_edit(**{"{arch}.embedding_length": "64"}),
        GGUF_COMMANDS,
        "embedding_length",
    ),  # fmt: skip
    Case(
        "GGUF epsilon string",
        gguf_edit(**{"{arch}.attention.layer_norm_rms_epsilon": "1e-5"}),
        GGUF_COMMANDS,
        "layer_norm_rms_epsilon",
    ),  # fmt: skip
    Case(
        "GGUF block_count 5 over 2",
        gguf_edit(**{"{arch}.block_count": 5}),
        GGUF_COMMANDS,
        "missing",
    ),  # fmt: skip
    Case(
        "GGUF feed_forward_length 1000",
        gguf_edit(**{"{arch}.feed_forward_length": 1000}),
        GGUF_COMMANDS,
        "gate_proj",
    ),  # fmt: skip
    Case("GGUF without architecture", gguf_renamed_key, GGUF_COMMANDS, "general.architecture"),
    Case("text is a FIFO", bad_text("fifo"), (EVAL,), "FIFO"),
    Case("text is /dev/zero", bad_text("zero"), (EVAL,), "not a regular file"),
]


def _expand(args: tuple[str, ...], model: Path, tmp: Path, base: dict, text: Path | None):
    out = tmp / "out"
    table = {"MODEL": str(model), "OUT": str(out), "OUT.gguf": str(out) + ".gguf",
             "TEXT": str(text or base["text"]), "HF": str(base["hf"])}  # fmt: skip
    return [table.get(a, a) for a in args]


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def _run(args: list[str]):
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(GUARD_S)
    started = time.monotonic()
    try:
        result = CliRunner().invoke(main, args)
    except _Hang:
        pytest.fail(f"{args}: still running after {GUARD_S} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return result, time.monotonic() - started


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, base, tmp_path):
    named = case.make(tmp_path, base)
    is_text = case.commands == (EVAL,) and named.name == "text.txt"
    model = base["hf"] if is_text else (named.parent if named.name == "config.json" else named)
    if named.name in ("model.safetensors", "model.safetensors.index.json"):
        model = named.parent
    before = _listing(tmp_path)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for command in case.commands:
        args = _expand(command, model, tmp_path, base, named if is_text else None)
        if args[0] == "eval" and "--reference" not in args and model != base["hf"]:
            args += ["--reference", str(base["hf"])]
        result, _ = _run(args)
        output = result.output
        assert result.exit_code == 2, f"{args}: exit {result.exit_code}\n{output}"
        assert "Traceback" not in output and not isinstance(
            result.exception, (AssertionError, TypeError, ValueError, RecursionError, KeyError)
        ), f"{args}: {result.exception!r}\n{output}"
        assert output.count("error:") == 1, f"{args}: not one message\n{output}"
        assert case.says.lower() in output.lower(), f"{args}: {output}"
        shown = str(named if named.name != "model" else named)
        assert shown in output or str(named.parent) in output, f"{args}: file not named\n{output}"
        assert _listing(tmp_path) == before, f"{args}: left something behind"
    # The worker's peak can only grow: what this case added to it must stay under the guard.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before < GUARD_RSS


OPTION_CASES = [
    ("eval", "MODEL", "--text", "TEXT", "--windows", "-1"),
    ("eval", "MODEL", "--text", "TEXT", "--ctx", "1"),
    ("crosscheck", "MODEL", "--reference", "MODEL", "--ctx", "1"),
    ("crosscheck", "MODEL", "--reference", "MODEL", "--max-kl", "-1"),
    ("crosscheck", "MODEL", "--reference", "MODEL", "--max-kl", "nan"),
    ("recommend", "MODEL", "--memory", "1GB", "--context", "-1"),
    ("recommend", "MODEL", "--memory", "1GB", "--top", "0"),
    ("recommend", "MODEL", "--memory", "1GB", "--top", "-1"),
]


@pytest.mark.parametrize("args", OPTION_CASES, ids=[" ".join(a[3:]) for a in OPTION_CASES])
def test_bad_option_values_are_usage_errors(args, base, tmp_path):
    result, _ = _run(_expand(args, base["hf"], tmp_path, base, None))
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output and "Traceback" not in result.output


def _output_cases(tmp: Path) -> list[tuple[str, Path]]:
    blocker = tmp / "a-file"
    blocker.write_text("x")
    return [
        ("parent is a file", blocker / "out"),
        ("name too long", tmp / ("n" * 300)),
    ]


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_output_paths_the_system_refuses(command, base, tmp_path):
    for what, target in _output_cases(tmp_path):
        if command == "quantize":
            args = ["quantize", str(base["hf"]), "-o", str(target)]
        else:
            args = ["export", "gguf", str(base["hf"]), "--type", "Q8_0", "-o", str(target)]
        result, _ = _run(args)
        assert result.exit_code == 2, f"{what}: {result.output}"
        assert "Traceback" not in result.output and "fix:" in result.output, what
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], what


@pytest.mark.parametrize(
    "override,says",
    [
        ("model.layers.0.mlp.up_proj=7", "7 bits"),
        ("model.layers.0.mlp.up_proj=4:48", "group size 48"),
        ("model.layers.0.mlp.up_proj=four", "whole numbers"),
        ("model.layers.[=4", "bad regular expression"),
        ("model.layer.0.mlp.up_proj=8", "matches no quantized module"),
    ],
)
def test_override_errors_name_the_override(override, says, base, tmp_path):
    result, _ = _run(["quantize", str(base["hf"]), "-o", str(tmp_path / "out"),
                      "--override", override])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"override '{override.rpartition('=')[0]}" in result.output  # the override is named
    assert says in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
