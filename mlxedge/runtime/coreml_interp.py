"""A numpy interpreter of a saved Core ML ML program: how a package is proven where Core ML is not.

coremltools on Linux builds, saves and reloads packages but cannot predict. This module loads the
saved `.mlpackage` back — coremltools' own ML-program loader over the package's specification and
its weight file, not the objects the exporter built — and executes the program op by op in numpy:
every op that appears in the programs our exports save (including the ones coremltools' passes
insert: `cast`, `select`, ...), the constexpr weights and the state ops. Any other op is refused by
name. It computes in float32 and rounds to float16 after each op whose output is float16, as the
program declares.

It is written apart from `formats/coreml/mil_ops.py` (which builds the program): a bug in the
forward description shows as a difference against mlx-lm's model classes, a bug in the MIL
executor as a difference between this interpreter and the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import MlxedgeError

_NP = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8,
       "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
       "uint32": np.uint32, "int64": np.int64, "bool": np.bool_}  # fmt: skip
MIN_SPEC_VERSION = 9  # iOS 18 / macOS 15: states and block-wise constants
WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights"


def _dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    return x / x.sum(axis=-1, keepdims=True)


def _slice(x: np.ndarray, begin, end, stride=None, begin_mask=None, end_mask=None,
           squeeze_mask=None) -> tuple[slice | int, ...]:  # fmt: skip
    index: list[slice | int] = []
    for i in range(x.ndim):
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        s = 1 if stride is None else int(stride[i])
        if squeeze_mask is not None and squeeze_mask[i]:
            index.append(int(begin[i]))
        else:
            index.append(slice(b, e, s))
    return tuple(index)


class Program:
    """A saved package's main function, ready to run.

    Args:
        package: the `.mlpackage` folder.

    Raises:
        MlxedgeError: not a package, a specification version below 9, no weight file, or an op
            this interpreter does not implement (named).
    """

    def __init__(self, package: Path | str) -> None:
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load

        self.path = Path(package)
        if not (self.path / "Manifest.json").is_file():
            raise MlxedgeError("not a Core ML package (no Manifest.json)", path=self.path)
        try:
            spec = ct.utils.load_spec(str(self.path))
        except Exception as e:  # protobuf and coremltools raise many kinds
            raise MlxedgeError(f"cannot read the package's specification ({e})",
                               path=self.path) from None  # fmt: skip
        if spec.specificationVersion < MIN_SPEC_VERSION:
            raise MlxedgeError(
                f"specification version {spec.specificationVersion}, below {MIN_SPEC_VERSION} "
                "(iOS 18 / macOS 15), which stateful programs need",
                path=self.path,
                fix="export it again with `mlxedge export coreml`",
            )
        weights = self.path / WEIGHTS
        if not (weights / "weight.bin").is_file():
            raise MlxedgeError("the package has no weight file", path=weights / "weight.bin",
                               fix="export it again; the package is incomplete")  # fmt: skip
        self.spec = spec
        self.function = load(spec, spec.specificationVersion, str(weights)).functions["main"]
        self.states = {s.name: tuple(s.type.stateType.arrayType.shape) for s in
                       spec.description.state}  # fmt: skip
        unknown = sorted({op.op_type for op in self.function.operations} - set(_OPS))
        if unknown:
            raise MlxedgeError(f"the program uses ops this interpreter does not implement: "
                               f"{', '.join(unknown)}", path=self.path)  # fmt: skip
        self._constants: dict[str, np.ndarray] = {}

    def _constant_ops(self) -> dict:
        if not hasattr(self, "_by_output"):
            self._by_output = {
                op.outputs[0].name: op
                for op in self.function.operations
                if op.op_type == "const" or op.op_type.startswith("constexpr_")
            }
        return self._by_output

    def constant_op(self, name: str):
        return self._constant_ops()[name]

    def has_constant(self, name: str) -> bool:
        return name in self._constant_ops()

    def constant(self, name: str) -> np.ndarray:
        """A constant's value as the program computes it (a constexpr materialized)."""
        op = self._constant_ops()[name]
        if name not in self._constants:
            value = op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()
            self._constants[name] = np.asarray(value)
        return self._constants[name]

    def make_state(self) -> dict[str, np.ndarray]:
        """Zeroed states, as `MLModel.make_state()` gives them."""
        return {name: np.zeros(shape, np.float32) for name, shape in self.states.items()}

    def predict(self, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict:
        """Run the program once; `state` is updated in place. Returns the outputs by name."""
        env: dict[str, object] = {}
        fn = self.function
        for name, var in fn.inputs.items():
            env[var.name] = state if name in self.states else np.asarray(inputs[name])
        for op in fn.operations:
            out = self._run(op, env, state)
            outs = out if isinstance(out, tuple) else (out,)
            for var, value in zip(op.outputs, outs, strict=True):
                kind = _dtype_name(var)
                if kind == "fp16":  # float16 storage: compute in float32, round like the target
                    value = np.asarray(value, np.float32).astype(np.float16).astype(np.float32)
                elif kind in _NP and kind != "fp32":
                    value = np.asarray(value).astype(_NP[kind])
                env[var.name] = value
        return {var.name: env[var.name] for var in fn.outputs}

    def _run(self, op, env, state):
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            return self.constant(op.outputs[0].name)
        args = {}
        for key, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                args[key] = [env[v.name] for v in var]
            else:
                args[key] = env[var.name]
        if op.op_type in _STATE_OPS:
            return _STATE_OPS[op.op_type](op, args, state)
        return _OPS[op.op_type](**args)


def _state_name(op, key: str) -> str:
    return op.inputs[key].name


def _read_state(op, args, state):
    return state[_state_name(op, "input")].copy()


def _write_state(op, args, state):
    value = np.asarray(args["data"], np.float32)
    state[_state_name(op, "input")][...] = value.astype(np.float16).astype(np.float32)
    return ()


def _update_state(op, args, state):
    value = np.asarray(args["value"], np.float32)
    state[_state_name(op, "state")][...] = value.astype(np.float16).astype(np.float32)
    return value


_STATE_OPS: dict[str, Callable] = {
    "read_state": _read_state,
    "write_state": _write_state,
    "coreml_update_state": _update_state,
}


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None,
                    squeeze_mask=None):  # fmt: skip
    return np.asarray(x)[_slice(np.asarray(x), begin, end, stride, begin_mask, end_mask,
                                squeeze_mask)]  # fmt: skip


def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None,
                  squeeze_mask=None):  # fmt: skip
    out = np.array(x, copy=True)
    index = _slice(out, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out[index] = np.asarray(update).reshape(out[index].shape)
    return out


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise MlxedgeError("gather with batch_dims is not implemented by the interpreter")
    return np.take(np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis))


def _sdpa(query, key, value, attn_mask=None):
    q, k, v = (np.asarray(t, np.float32) for t in (query, key, value))
    scores = q @ np.swapaxes(k, -1, -2) / np.float32(np.sqrt(q.shape[-1]))
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        scores = scores + (np.where(mask, 0, -np.inf) if mask.dtype == np.bool_ else mask)
    return _softmax(scores) @ v


def _gelu(x, mode="EXACT"):
    v = np.asarray(x, np.float32)
    if str(mode) != "TANH_APPROXIMATION":
        raise MlxedgeError(f"gelu mode {mode} is not implemented by the interpreter")
    return 0.5 * v * (1.0 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (v + 0.044715 * v**3)))


def _softmax_axis(x: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(_softmax(np.moveaxis(x, axis, -1).copy()), -1, axis)


def _split(x, axis, split_sizes=None, num_splits=None):
    x = np.asarray(x)
    if split_sizes is None:
        return tuple(np.split(x, int(num_splits), axis=int(axis)))
    return tuple(np.split(x, np.cumsum([int(n) for n in split_sizes])[:-1], axis=int(axis)))


def _reduce(fn):
    def run(x, axes=None, keep_dims=False):
        axes = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return fn(np.asarray(x, np.float32) if x.dtype.kind == "f" else x, axis=axes,
                  keepdims=bool(keep_dims))  # fmt: skip

    return run


def _cast(x, dtype):
    return np.asarray(x).astype(_NP[str(dtype)])


def _concat(values, axis, interleave=False):
    if interleave:
        raise MlxedgeError("concat with interleave is not implemented by the interpreter")
    arrays = [np.asarray(v) for v in values]
    if all(a.ndim <= 1 for a in arrays):  # shape arithmetic: scalars join as one-element vectors
        arrays = [np.atleast_1d(a) for a in arrays]
    return np.concatenate(arrays, axis=int(axis))


def _linear(x, weight, bias=None):
    y = np.asarray(x, np.float32) @ np.asarray(weight, np.float32).T
    return y if bias is None else y + np.asarray(bias, np.float32)


def _matmul(x, y, transpose_x=False, transpose_y=False):
    a, b = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if transpose_x:
        a = np.swapaxes(a, -1, -2)
    if transpose_y:
        b = np.swapaxes(b, -1, -2)
    return a @ b


def _binary(fn):
    def run(x, y):
        return fn(np.asarray(x), np.asarray(y))

    return run


_OPS: dict[str, Callable] = {
    "const": None,
    "constexpr_blockwise_shift_scale": None,
    "read_state": None,
    "write_state": None,
    "coreml_update_state": None,
    "shape": lambda x: np.array(np.asarray(x).shape, np.int32),
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "reshape": lambda x, shape: np.asarray(x).reshape([int(d) for d in shape]),
    "transpose": lambda x, perm: np.transpose(np.asarray(x), [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(np.asarray(x), tuple(int(a) for a in axes)),
    "squeeze": lambda x, axes=None: np.squeeze(
        np.asarray(x), None if axes is None else tuple(int(a) for a in axes)
    ),
    "concat": _concat,
    "split": _split,
    "tile": lambda x, reps: np.tile(np.asarray(x), [int(r) for r in reps]),
    "gather": _gather,
    "range_1d": lambda start, end, step: np.arange(int(start), int(end), int(step), dtype=np.int32),
    "cast": _cast,
    "identity": lambda x: np.asarray(x),
    "select": lambda cond, a, b: np.where(np.asarray(cond), a, b),
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "pow": _binary(np.power),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "equal": _binary(np.equal),
    "logical_and": _binary(np.logical_and),
    "abs": lambda x: np.abs(x),
    "sqrt": lambda x: np.sqrt(np.asarray(x, np.float32)),
    "rsqrt": lambda x, epsilon=1e-12: (
        1.0 / np.sqrt(np.asarray(x, np.float32) + np.float32(epsilon))
    ),
    "exp": lambda x: np.exp(np.asarray(x, np.float32)),
    "cos": lambda x: np.cos(np.asarray(x, np.float32)),
    "sin": lambda x: np.sin(np.asarray(x, np.float32)),
    "silu": lambda x: (lambda v: v / (1.0 + np.exp(-v)))(np.asarray(x, np.float32)),
    "tanh": lambda x: np.tanh(np.asarray(x, np.float32)),
    "gelu": _gelu,
    "softmax": lambda x, axis=-1: _softmax_axis(np.asarray(x, np.float32), int(axis)),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "reduce_sum": _reduce(np.sum),
    "reduce_l2_norm": _reduce(
        lambda x, axis, keepdims: np.sqrt(
            np.sum(np.asarray(x, np.float64) ** 2, axis=axis, keepdims=keepdims)
        ).astype(np.float32)
    ),
    "linear": _linear,
    "matmul": _matmul,
    "scaled_dot_product_attention": _sdpa,
}
