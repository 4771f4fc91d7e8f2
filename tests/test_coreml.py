"""Core ML export, proven on Linux: the saved package is loaded back and run by the numpy
interpreter of its program (`runtime/coreml_interp.py`), which is written apart from the MIL
executor that built it.

- every architecture, tied and untied, exports, reloads and passes crosscheck on coreml-interp
  against the reference on the package's own weights (tolerance stated in
  runtime/coreml_backend.py before measuring: mean KL <= 5e-3, float16 compute);
- a prompt then single-token steps equals one pass, under both mask conventions (Apple's and
  Hugging Face's real causal mask; swift-transformers' all-zero mask one slot late);
- a program that reads a state twice per step (what coremltools' merging of `read_state` ops
  produces) is caught by that same check;
- the errors: an unknown op, a specification below 9, no cache states, no weight file, a context
  overflow, a --context beyond the model's.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import ARCH_CASES, ARCH_IDS, make_tiny_model

from mlxedge.cli import main
from mlxedge.errors import MlxedgeError
from mlxedge.runtime import coreml_interp
from mlxedge.runtime.coreml_interp import Program
from mlxedge.source import resolve

CONTEXT = 64


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("coreml")
    model = make_tiny_model(root / "tiny", "llama", dtype="float32")
    out = root / "tiny-coreml"
    result = run("export", "coreml", model, "-o", out, "--context", CONTEXT)
    assert result.exit_code == 0, result.output
    return model, out


@pytest.mark.parametrize("arch,tied", ARCH_CASES, ids=ARCH_IDS)
def test_every_architecture_passes_crosscheck_on_the_interpreter(arch, tied, tmp_path):
    model = make_tiny_model(tmp_path / "m", arch, tied=tied, dtype="float32", layers=1)
    out = tmp_path / "out"
    # rtn: the package then holds exactly its plain twin's weights, so the quality row checks the
    # carried weights themselves (a search method's KL on random tiny weights is noise around it)
    assert run("export", "coreml", model, "-o", out, "--context", CONTEXT,
               "--method", "rtn").exit_code == 0  # fmt: skip
    result = run("crosscheck", out, "--reference", model, "--backends", "reference,coreml-interp",
                 "--windows", 1, "--ctx", 32, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    ref, interp = json.loads(result.output)
    assert ref["quality"]["kl_mean"] == pytest.approx(ref["twin_kl"], rel=1e-6)
    assert interp["backend"] == "coreml-interp" and interp["skipped"] is None
    assert interp["fidelity_ok"] and interp["fidelity"]["kl_mean"] <= 5e-3
    assert ref["passed"] and interp["passed"]


def _python_mask(tokens: int, past: int) -> np.ndarray:
    if past == 0:
        return np.triu(np.full((1, 1, tokens, tokens), -np.inf, np.float16), 1)
    return np.zeros((1, 1, tokens, past + tokens), np.float16)


def _swift_mask(tokens: int, past: int) -> np.ndarray:
    return np.zeros((1, 1, 1, past + tokens + 1), np.float16)  # one slot late


def decode(program, ids: np.ndarray, prompt: int, mask) -> np.ndarray:
    """Logits of a prompt of `prompt` tokens, then one token per step, through one state."""
    state = program.make_state()
    shift = 1 if mask is _swift_mask else 0
    outs = [program.predict({"inputIds": ids[None, :prompt], "causalMask": mask(prompt, 0)},
                            state)["logits"][0]]  # fmt: skip
    for i in range(prompt, len(ids)):
        out = program.predict({"inputIds": ids[None, i : i + 1], "causalMask": mask(1, i)}, state)
        outs.append(out["logits"][0])
    written = _cache(state, "keyCache")[:, :, :, len(ids) + shift :]
    assert np.abs(written).max() == 0  # nothing written beyond
    return np.concatenate(outs)


def _cache(state, name: str) -> np.ndarray:
    """A state's contents: the interpreter's dict, or the Core ML runtime's `MLState`."""
    return np.asarray(state[name] if isinstance(state, dict) else state.read_state(name))


def test_incremental_decoding_equals_one_pass_under_both_conventions(exported):
    _, out = exported
    _check_incremental(resolve(str(out)).weights.program)


def _check_incremental(program) -> None:
    """A prompt, then single-token steps, equals one pass, under both mask conventions."""
    ids = np.random.default_rng(0).integers(0, 300, 24).astype(np.int32)
    whole = program.predict({"inputIds": ids[None], "causalMask": _python_mask(24, 0)},
                            program.make_state())["logits"][0]  # fmt: skip
    scale = np.abs(whole).max()
    for mask in (_python_mask, _swift_mask):
        steps = decode(program, ids, 10, mask)
        # float16 rounding differs only by the order the same values are combined in
        assert np.abs(steps - whole).max() <= 2e-3 * max(scale, 1.0), mask.__name__
        assert (steps.argmax(-1) == whole.argmax(-1)).all()


def test_the_coreml_backend_says_it_needs_macos(exported):
    """The Linux counterpart of the runtime tests below: the `coreml` row is skipped, with why."""
    if sys.platform == "darwin":
        pytest.skip("on macOS the runtime runs (the macos-marked tests)")
    model_dir, out = exported
    result = run("crosscheck", out, "--reference", model_dir, "--backends",
                 "coreml-interp,coreml", "--windows", 1, "--ctx", 32, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    interp, runtime = json.loads(result.output)
    assert interp["passed"] and runtime["backend"] == "coreml"
    assert "macOS" in runtime["skipped"]


@pytest.mark.macos
def test_the_core_ml_runtime_passes_crosscheck(exported):
    model_dir, out = exported
    result = run("crosscheck", out, "--reference", model_dir, "--backends", "coreml",
                 "--windows", 1, "--ctx", 32, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["skipped"] is None and row["passed"] and row["fidelity"]["kl_mean"] <= 5e-3


@pytest.mark.macos
def test_the_core_ml_runtime_decodes_step_by_step_under_both_conventions(exported):
    from mlxedge.formats.coreml.load import find_package
    from mlxedge.metrics import log_softmax
    from mlxedge.runtime.coreml_backend import CoreMLRuntime

    _, out = exported
    runtime = CoreMLRuntime(find_package(out))
    ids = np.random.default_rng(0).integers(0, 300, 24).astype(np.int32)
    whole = runtime.predict({"inputIds": ids[None], "causalMask": _python_mask(24, 0)},
                            runtime.make_state())["logits"][0]  # fmt: skip
    ref = log_softmax(whole)
    for mask in (_python_mask, _swift_mask):
        steps = log_softmax(decode(runtime, ids, 10, mask))
        # the GPU's kernels differ by query length: held to the stated float16 tolerance
        kl = (np.exp(ref) * (ref - steps)).sum(-1)
        assert kl.mean() <= 5e-3, mask.__name__


def test_reading_a_state_twice_is_caught(exported, tmp_path):
    from mlxedge.formats.coreml.mil_ops import MILOps
    from mlxedge.formats.coreml.program import build_program, convert_program
    from mlxedge.formats.coreml.writer import _weight_source

    class ReadsTwice(MILOps):
        """Reads the states again before every layer, as coremltools' merged read_state ops
        effectively do: each layer then writes over the previous layers' updates."""

        def attention(self, layer, q, k, v, mask, scale, soft_cap=None):
            self.keys = self.mb.read_state(input=self.key_state)
            self.values = self.mb.read_state(input=self.value_state)
            return super().attention(layer, q, k, v, mask, scale, soft_cap)

    model_dir, out = exported
    mlx = tmp_path / "q"
    assert run("quantize", model_dir, "-o", mlx, "--dtype", "float16").exit_code == 0
    source = resolve(str(mlx))
    faulty = convert_program(
        build_program(source.arch, _weight_source(source), CONTEXT, ReadsTwice), CONTEXT
    )
    faulty.save(str(tmp_path / "faulty.mlpackage"))
    program = Program(tmp_path / "faulty.mlpackage")
    ids = np.random.default_rng(1).integers(0, 300, 16).astype(np.int32)
    whole = program.predict({"inputIds": ids[None], "causalMask": _python_mask(16, 0)},
                            program.make_state())["logits"][0]  # fmt: skip
    steps = decode(program, ids, 8, _python_mask)
    # The same check as above: here it fails, by far more than float16 rounding.
    assert (
        np.abs(steps - whole).max() > 10 * 2e-3 * max(np.abs(whole).max(), 1.0)
        or not (steps.argmax(-1) == whole.argmax(-1)).all()
    )


def test_the_package_carries_the_interface_and_metadata(exported):
    _, out = exported
    program = resolve(str(out)).weights.program
    d = program.spec.description
    assert program.spec.specificationVersion >= 9
    assert [i.name for i in d.input] == ["inputIds", "causalMask"]
    ids, mask = d.input
    assert ids.type.multiArrayType.shapeRange.sizeRanges[1].upperBound == CONTEXT
    assert ids.type.multiArrayType.shapeRange.sizeRanges[1].lowerBound == 1
    assert sorted(program.states) == ["keyCache", "valueCache"]
    assert program.states["keyCache"] == (2, 1, 2, CONTEXT, 16)  # (layers, 1, kv, N, head_dim)
    assert [o.name for o in d.output] == ["logits"]
    assert d.metadata.userDefined["co.huggingface.exporters.name"] == "tiny"
    assert json.loads(d.metadata.userDefined["mlxedge.quantization"])["bits"] == 4
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert (out / "README.md").is_file() and (out / ".mlxedge").is_file()


def test_the_weights_are_the_mlx_codes_carried(exported, tmp_path):
    model_dir, out = exported
    mlx = tmp_path / "q"
    assert run("quantize", model_dir, "-o", mlx, "--dtype", "float16").exit_code == 0
    ours, theirs = resolve(str(out)).weights, resolve(str(mlx)).weights
    name = "model.layers.1.mlp.down_proj.weight"
    a, b = ours.read(name), theirs.read(name)
    bound = np.abs(theirs.quantized(name).biases.astype(np.float32)).max() * 2.0**-11
    # the float16 offset's rounding, then the float16 result's own
    assert np.abs(a - b).max() <= bound + np.abs(b).max() * 2.0**-11 + 1e-7


# --- errors -------------------------------------------------------------------------------------


def test_an_unknown_op_is_refused_by_name(exported, monkeypatch):
    _, out = exported
    ops = dict(coreml_interp._OPS)
    del ops["silu"]
    monkeypatch.setattr(coreml_interp, "_OPS", ops)
    with pytest.raises(MlxedgeError, match="does not implement: silu"):
        Program(out / "tiny.mlpackage")


def test_a_missing_weight_file_is_named(exported, tmp_path):
    _, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "tiny.mlpackage" / coreml_interp.WEIGHTS / "weight.bin").unlink()
    with pytest.raises(MlxedgeError, match="no weight file") as e:
        resolve(str(copy))
    assert "weight.bin" in str(e.value)


def _trivial_package(path: Path, target, stateful: bool) -> Path:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    specs = [mb.TensorSpec(shape=(1, 64), dtype=types.fp32)]
    weights = np.arange(64, dtype=np.float32)[None]  # large enough to live in weight.bin
    if stateful:
        specs.append(mb.StateTensorSpec(shape=(1, 64), dtype=types.fp16))

        @mb.program(input_specs=specs, opset_version=target)
        def prog(x, s):
            y = mb.add(x=x, y=mb.cast(x=mb.read_state(input=s), dtype="fp32"))
            return mb.mul(x=y, y=weights)
    else:

        @mb.program(input_specs=specs, opset_version=target)
        def prog(x):
            return mb.mul(x=x, y=weights)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                       skip_model_load=True)  # fmt: skip
    model.save(str(path))
    return path


def test_an_old_specification_is_refused(tmp_path):
    import coremltools as ct

    package = _trivial_package(tmp_path / "old.mlpackage", ct.target.iOS17, stateful=False)
    with pytest.raises(MlxedgeError, match="specification version 8, below 9"):
        Program(package)


def test_a_package_without_the_cache_states_is_refused(exported, tmp_path):
    import coremltools as ct

    model_dir, _ = exported
    folder = tmp_path / "nostate"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder / "config.json")
    _trivial_package(folder / "m.mlpackage", ct.target.iOS18, stateful=True)
    with pytest.raises(MlxedgeError, match="not keyCache and valueCache"):
        resolve(str(folder))


def test_a_context_overflow_while_decoding_is_refused(exported):
    from mlxedge.runtime.coreml_backend import CoreMLInterpBackend

    _, out = exported
    backend = CoreMLInterpBackend(resolve(str(out)))
    with pytest.raises(MlxedgeError, match="exceed the package's context of 64"):
        backend.logits(np.zeros(CONTEXT + 1, np.int32))


def test_a_context_beyond_the_model_is_a_clear_error(exported, tmp_path):
    model_dir, _ = exported
    result = run("export", "coreml", model_dir, "-o", tmp_path / "x", "--context", 10**6)
    assert result.exit_code == 2 and "max_position_embeddings" in result.output
    assert not (tmp_path / "x").exists()


# --- SmolLM2 (slow) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    mlx = root / "mlx"
    assert run("quantize", "smollm2", "--recipe", "uniform", "--dtype", "float16",
               "-o", mlx).exit_code == 0  # fmt: skip
    pkg = root / "coreml"
    result = run("export", "coreml", mlx, "-o", pkg, "--context", 1024)
    assert result.exit_code == 0, result.output
    return mlx, pkg


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.mark.slow
def test_smollm2_4bit_package_keeps_the_mlx_folders_quality(smollm2_exports):
    mlx, pkg = smollm2_exports
    package_bytes = sum(p.stat().st_size for p in pkg.rglob("weight.bin"))
    # uniform 4-bit groups of 64: the same codes, float16 scale + offset for scale + bias
    assert abs(package_bytes / _weight_bytes(mlx) - 1) < 0.05
    result = run("crosscheck", pkg, mlx, "--reference", "smollm2", "--backends",
                 "reference,coreml-interp", "--windows", 2, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    # one row per (artifact, backend), in that order: the package first, then the folder
    _, interp, folder, skipped = json.loads(result.output)
    assert interp["backend"] == "coreml-interp" and folder["backend"] == "reference"
    assert skipped["skipped"]  # the interpreter runs packages, not folders
    assert interp["fidelity_ok"] and interp["passed"]
    assert interp["quality"]["tokens"] == 510  # two 512-token windows
    assert abs(interp["quality"]["kl_mean"] - folder["quality"]["kl_mean"]) <= 5e-3


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 16])
def test_smollm2_8_bit_and_float16_packages_pass_crosscheck(bits, tmp_path):
    pkg = tmp_path / "coreml"
    result = run("export", "coreml", "smollm2", "--bits", bits, "-o", pkg, "--context", 1024)
    assert result.exit_code == 0, result.output
    result = run("crosscheck", pkg, "--reference", "smollm2", "--backends", "coreml-interp",
                 "--windows", 2, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["fidelity_ok"] and row["passed"], row
    assert row["quality"]["tokens"] == 510  # two 512-token windows
    # 8-bit codes and float16 weights sit far closer to the original than 4-bit ones
    assert row["quality"]["kl_mean"] < 0.01, row["quality"]


@pytest.mark.parametrize("args", [("quantize", "--format", "coreml", "--bits", "8"),
                                  ("export", "coreml", "--bits", "16")])  # fmt: skip
def test_8_bit_and_float16_packages(args, exported, tmp_path):
    model_dir, _ = exported
    out = tmp_path / "out"
    command = [args[0], *args[1:2]] if args[0] == "export" else [args[0]]
    rest = args[2:] if args[0] == "export" else args[1:]
    result = run(*command, model_dir, "-o", out, *rest)
    assert result.exit_code == 0, result.output
    precision = resolve(str(out)).weights.program.spec.description.metadata.userDefined[
        "co.huggingface.exporters.precision"
    ]
    assert precision == ("int8" if "8" in args else "float16")
    assert_interp_crosscheck_passes(out, model_dir)


def assert_interp_crosscheck_passes(package, reference) -> None:
    """`crosscheck --backends coreml-interp` of a package (one 32-token window) passes, within
    the float16 tolerance stated in runtime/coreml_backend.py."""
    result = run("crosscheck", package, "--reference", reference, "--backends", "coreml-interp",
                 "--windows", 1, "--ctx", 32, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["passed"] and row["fidelity"]["kl_mean"] <= 5e-3


def test_the_interpreter_runs_what_traced_programs_add():
    """Programs converted from PyTorch (Apple's recipe, bench/coreml_apple_recipe.py) square with
    `pow` and join shape scalars with `concat`."""
    ops = coreml_interp._OPS
    assert ops["pow"](np.array([3.0, -2.0], np.float32), np.float32(2)).tolist() == [9.0, 4.0]
    joined = ops["concat"]([np.int32(1), np.array([5], np.int32), np.int32(7)], axis=0)
    assert joined.tolist() == [1, 5, 7]
    with pytest.raises(ValueError):  # tensors of different ranks still do not join
        ops["concat"]([np.zeros((2, 2)), np.zeros(2)], axis=0)
