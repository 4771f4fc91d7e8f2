"""The ML program of a Core ML package: the architecture's forward built by `MILOps`, with the
interface swift-transformers' `LanguageModelWithStatefulKVCache` runs.

Inputs `inputIds` (int32, `(1, 1..N)`) and `causalMask` (float16, `(1, 1, 1..N, 1..N)`), states
`keyCache` / `valueCache` (float16, `(layers, 1, kv_heads, N, head_dim)`), output `logits`
(float16, `(1, tokens, vocab)`); N is the context. Target iOS 18 / macOS 15.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import numpy as np

from ...archs import Architecture
from ...quant.schemes import QuantizedTensor
from .blockwise import NotRepresentable, to_blockwise
from .mil_ops import FLOAT32, MILOps

INPUT_IDS, CAUSAL_MASK, KEY_CACHE, VALUE_CACHE, LOGITS = (
    "inputIds", "causalMask", "keyCache", "valueCache", "logits",
)  # fmt: skip


class WeightSource:
    """Where the program's constants come from: quantized weights (carried as block-wise
    constants) or float tensors (float16), by Hugging Face name.

    Args:
        read: the float tensor of a name (float32).
        quantized: the MLX-quantized tensor of a name, or None when it is stored in float.
    """

    def __init__(self, read: Callable[[str], np.ndarray],
                 quantized: Callable[[str], QuantizedTensor | None]) -> None:  # fmt: skip
        self.read, self.quantized = read, quantized
        self.carried: dict[str, object] = {}  # name -> BlockwiseStats of each carried tensor
        self.as_float: dict[str, str] = {}  # name -> why a quantized tensor went float16


def build_program(arch: Architecture, weights: WeightSource, context: int, ops_class=MILOps):
    """The MIL program of `arch` with a `context`-slot cache (coremltools' `mb.program`);
    `ops_class` is the executor (tests substitute a faulty one to show the checks catch it)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    s = arch.spec
    state_shape = (s.n_layers, 1, s.n_kv_heads, context, s.head_dim)
    tokens, keys = get_new_symbol(), get_new_symbol()
    made: dict[str, object] = {}

    def weight(name: str):
        if name in made:
            return made[name]
        qt = weights.quantized(name)
        var = None
        if qt is not None:
            try:
                bw = to_blockwise(qt, name)
            except NotRepresentable as e:
                weights.as_float[name] = str(e)
            else:
                weights.carried[name] = bw.stats()  # the report's figures, not the codes
                kind = types.np_uint4_dtype if bw.container_bits == 4 else np.uint8
                var = mb.cast(x=mb.constexpr_blockwise_shift_scale(
                    data=bw.data.astype(kind), scale=bw.scale, offset=bw.offset,
                    name=const_name(name)), dtype="fp32")  # fmt: skip
        if var is None:
            values = np.asarray(weights.read(name), dtype=np.float32)
            var = mb.const(val=values.astype(np.float16).astype(np.float32), name=const_name(name))
        made[name] = var
        return var

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(1, tokens), dtype=types.int32),
            mb.TensorSpec(shape=(1, 1, tokens, keys), dtype=types.fp16),
            mb.StateTensorSpec(shape=state_shape, dtype=types.fp16),
            mb.StateTensorSpec(shape=state_shape, dtype=types.fp16),
        ],
        opset_version=ct.target.iOS18,
    )
    def program(inputIds, causalMask, keyCache, valueCache):  # noqa: N803 - the interface's names
        n = mb.slice_by_index(x=mb.shape(x=inputIds), begin=[1], end=[2], squeeze_mask=[True])
        end = mb.slice_by_index(x=mb.shape(x=causalMask), begin=[3], end=[4],
                                squeeze_mask=[True])  # fmt: skip
        begin = mb.sub(x=end, y=n)
        ops = ops_class(mb, weight, keyCache, valueCache, begin, end, context, s.n_kv_heads,
                        s.head_dim, float32_residual=arch.float32_residual)  # fmt: skip
        ids = mb.reshape(x=inputIds, shape=[-1])
        positions = mb.range_1d(start=begin, end=end, step=1)
        logits = arch.forward(ops, ids, positions)  # (tokens, vocab)
        return mb.expand_dims(x=logits, axes=[0], name=LOGITS)

    return program


def convert_program(program, context: int):
    """The `MLModel` of a program: ML program, iOS 18, float16 compute (the residual stream
    float32 where the executor asked for it), the interface's ranges."""
    import coremltools as ct

    dims = (1, 1, ct.RangeDim(1, context, default=1), ct.RangeDim(1, context, default=1))
    with _quiet_passes():
        return _convert(ct, program, context, dims)


@contextmanager
def _quiet_passes():
    """coremltools draws a tqdm bar per pass pipeline on stderr, under our own progress display:
    its pipeline module's `tqdm` is swapped for a silent one while converting."""
    from coremltools.converters.mil.mil.passes import pass_pipeline

    loud = pass_pipeline.tqdm
    pass_pipeline.tqdm = partial(loud, disable=True)
    try:
        yield
    finally:
        pass_pipeline.tqdm = loud


def _convert(ct, program, context: int, dims):
    return ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        # float16 everywhere but the ops the executor named to stay float32 (none, or the
        # residual stream of an architecture whose activations overflow float16)
        compute_precision=ct.transform.FP16ComputePrecision(
            op_selector=lambda op: not op.name.startswith(FLOAT32)
        ),
        skip_model_load=True,
        inputs=[
            ct.TensorType(
                name=INPUT_IDS, shape=(1, ct.RangeDim(1, context, default=1)), dtype=np.int32
            ),  # fmt: skip
            ct.TensorType(name=CAUSAL_MASK, shape=dims, dtype=np.float16),
        ],
        outputs=[ct.TensorType(name=LOGITS, dtype=np.float16)],
    )


def const_name(name: str) -> str:
    """The program's constant for a parameter: its name with dots as underscores."""
    return name.replace(".", "_")
