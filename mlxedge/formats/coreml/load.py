"""Open a Core ML export (`NAME.mlpackage`, or the folder `export coreml` writes) as a `Model`.

The weights are read back from the saved package — the block-wise constants materialized as
Core ML computes them (float16), through the interpreter's loader — so the reference backend runs
the package's own weights and the fidelity gate compares the program with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...errors import MlxedgeError
from ...model import Model, TensorInfo, Tokenizer


def find_package(path: Path) -> Path | None:
    """The package `path` names: itself, or the single `*.mlpackage` in an export folder."""
    if path.suffix == ".mlpackage":
        return path
    found = sorted(path.glob("*.mlpackage")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


class CoreMLWeights:
    """A package's parameters by Hugging Face name, float32 (values as the program computes)."""

    def __init__(self, program, arch) -> None:
        from .program import const_name

        self._program = program
        # coremltools' float16 pass renames a float constant NAME to NAME_to_fp16
        self._names = {}
        for e in arch.tensors():
            c = const_name(e.name)
            self._names[e.name] = next((n for n in (c, c + "_to_fp16")
                                        if program.has_constant(n)), None)  # fmt: skip
        self._shapes = {e.name: e.shape for e in arch.tensors()}
        meta = program.spec.description.metadata.userDefined
        try:
            self._quantization = json.loads(meta.get("mlxedge.quantization", "{}") or "{}")
        except ValueError:
            raise MlxedgeError("the package's mlxedge.quantization metadata is not JSON",
                               path=program.path, fix="export it again") from None  # fmt: skip
        missing = [n for n, c in self._names.items() if c is None]
        if missing:
            raise MlxedgeError(f"the program has no constant for {missing[0]!r}",
                               path=program.path, fix="export it again")  # fmt: skip

    @property
    def program(self):
        """The interpreter's `Program` of the package."""
        return self._program

    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(n, tuple(self._shapes[n]), "float16") for n in self._names]

    def scheme(self, name: str):
        """How weight `name` was quantized before it was carried, None for float16 weights."""
        from ..mlx import module_scheme

        op = self._program.constant_op(self._names[name])
        if not op.op_type.startswith("constexpr_"):
            return None
        return module_scheme(name.rsplit(".", 1)[0], self._quantization, self._program.path)

    def plain_twin(self, name: str, w: np.ndarray) -> np.ndarray:
        """Float weights `w` stored as this package stores `name` by the plain rule: MLX's
        round-to-nearest at its scheme (float16 scales), carried the same way (see `twin`)."""
        from ...quant import backend
        from ..coreml.blockwise import to_blockwise

        scheme = self.scheme(name)
        if scheme is None:
            return w.astype(np.float16).astype(np.float32)
        qt, _ = backend.quantize(w, scheme, "float16", "rtn")
        return to_blockwise(qt, name).dequantize().astype(np.float16).astype(np.float32)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        value = self._program.constant(self._names[name]).astype(np.float32)
        value = value.reshape(self._shapes[name])
        return value if rows is None else value[rows[0] : rows[1]]


def load_coreml(path: Path) -> Model:
    """The export at `path` (a `.mlpackage` beside its config.json and tokenizer files)."""
    from ...runtime.coreml_interp import Program
    from ...source import read_config, read_side_files

    path = Path(path)
    package = find_package(path)
    if package is None:
        raise MlxedgeError("no single .mlpackage here", path=path,
                           fix="pass the folder `mlxedge export coreml` wrote")  # fmt: skip
    folder = package.parent
    config = read_config(folder)
    program = Program(package)
    if set(program.states) != {"keyCache", "valueCache"}:
        raise MlxedgeError(
            f"the program's states are {sorted(program.states) or 'none'}, not keyCache and "
            "valueCache (a stateful KV cache)",
            path=package,
            fix="export it with `mlxedge export coreml`",
        )
    side = read_side_files(folder)
    model = Model(
        name=package.stem,
        origin=package.name,
        kind="coreml",
        path=folder,
        config=config,
        weights=None,  # set below, once the architecture is known
        tokenizer=Tokenizer(side, where=str(folder / "tokenizer.json")),
        bits=_bits(program),
    )
    model.weights = CoreMLWeights(program, model.arch)
    return model


def _bits(program) -> int | None:
    precision = program.spec.description.metadata.userDefined.get(
        "co.huggingface.exporters.precision", ""
    )
    return int(precision[3:]) if precision.startswith("int") else None
