"""The one pipeline: stream read → quantize → write, for every output format.

`convert(model, plans, writer)` carries out a plan (`plan.TensorPlan` per tensor) through a
writer (`Writer`: the MLX folder, the GGUF file, the Hugging Face folder; the Core ML package
next). Tensors are read one at a time — large ones in blocks of rows, since every encoding works
row by row (identical bytes) — and the next read overlaps the current encoding on a thread, so
memory holds one tensor's output and at most two blocks of input, never the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import MlxedgeError, non_finite
from .model import BLOCK_WEIGHTS, Model
from .plan import TensorPlan, stored_bytes
from .quant import backend
from .quant.defaults import DEFAULT_METHOD, METHODS
from .quant.schemes import storage_dtype


@dataclass
class TensorRow:
    """One tensor in a report."""

    name: str
    out_name: str
    shape: tuple[int, ...]
    target: str  # "4-bit g64", "Q4_K", "float"
    bytes_in: int
    bytes_out: int
    rel_rmse: float | None = None
    max_abs: float | None = None
    note: str = ""
    scheme: object = None  # the MLX affine scheme, when there is one
    repack_error: float = 0.0  # a repack's largest weight error from rounding scales (0: exact)

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass
class ConvertReport:
    """What a conversion wrote, for the CLI's tables and the model card.

    Attributes:
        output: the artifact.
        params: the source's parameter count (bits per weight are counted against it).
        rows: every tensor, in output order.
        warnings: what the user should know (re-quantized tensors, rounded scales, ...).
        method, dtype: an MLX folder's quantization method and scale dtype.
        mix, file_type, adds_bos: a GGUF file's mix name, `general.file_type`, and whether
            llama.cpp puts BOS in front of a text.
        modelfile: the Ollama Modelfile written beside a GGUF file, if one was.
    """

    output: Path
    params: int
    rows: list[TensorRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    method: str | None = None
    dtype: str | None = None
    mix: str | None = None
    file_type: int | None = None
    adds_bos: bool = False
    modelfile: Path | None = None

    @property
    def bytes_in(self) -> int:
        return sum(r.bytes_in for r in self.rows)

    @property
    def bytes_out(self) -> int:
        return sum(r.bytes_out for r in self.rows)

    @property
    def bits_per_weight(self) -> float:
        """All bytes written × 8 ÷ the source's parameter count (this project's definition)."""
        return self.bytes_out * 8 / self.params

    @property
    def quantized(self) -> list[TensorRow]:
        return [r for r in self.rows if r.rel_rmse is not None]

    @property
    def kept(self) -> list[TensorRow]:
        """Tensors the recipe wanted quantized but which stayed in float (with the reason)."""
        return [r for r in self.rows if r.note]

    def by_target(self) -> list[tuple[str, int, int, int]]:
        """(target, tensor count, parameters, bytes written) per target, most bytes first."""
        groups: dict[str, list[int]] = {}
        for r in self.rows:
            g = groups.setdefault(r.target, [0, 0, 0])
            g[0] += 1
            g[1] += r.params
            g[2] += r.bytes_out
        return sorted(((k, *v) for k, v in groups.items()), key=lambda r: -r[3])


class Writer(Protocol):
    """An output format: told the plan, then given each tensor's encoded arrays in plan order."""

    def begin(self, plans: list[TensorPlan]) -> None:
        """Everything that precedes the tensors (config, metadata, tensor table)."""
        ...

    def write(self, plan: TensorPlan, arrays: list[np.ndarray]) -> None:
        """One tensor: MLX affine (codes, scales, biases), or one array (floats or block bytes)."""
        ...

    def finish(self, report: ConvertReport) -> None:
        """Everything that follows the tensors (an index, a model card), and close."""
        ...


@dataclass(frozen=True)
class _Read:
    """One read of the stream: a whole tensor, or one block of rows of a large one."""

    plan: TensorPlan
    rows: tuple[int, int] | None
    last: bool  # the tensor's last block (or the whole tensor)


def _reads(plans: list[TensorPlan]) -> Iterator[_Read]:
    for plan in plans:
        if plan.source is None:
            continue  # computed by the writer
        whole = plan.repack or len(plan.shape) < 2 or plan.params <= BLOCK_WEIGHTS
        if whole:
            yield _Read(plan, None, True)
            continue
        rows, cols = plan.shape
        step = max(1, BLOCK_WEIGHTS // cols)
        for start in range(0, rows, step):
            yield _Read(plan, (start, min(rows, start + step)), start + step >= rows)


def _read(model: Model, read: _Read):
    """The source data of one read: a float array, or an MLX tensor's stored codes to repack."""
    if read.plan.repack:
        return model.weights.quantized(read.plan.source, read.rows)
    return model.weights.read(read.plan.source, read.rows)


def _read_ahead(model: Model, reads: Iterator[_Read]):
    """Each read with its data; the next is read on a thread while this one is encoded, so
    reading overlaps computing. Memory holds at most two reads."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxedge-read")
    try:
        pending = None
        for read in reads:
            future = pool.submit(_read, model, read)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (read, future)
        if pending is not None:
            yield pending[0], pending[1].result()
    finally:
        # Never wait here: if the generator is abandoned, this runs wherever it is finalized.
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Encoded:
    arrays: list[np.ndarray]
    error: backend.QuantError | None = None
    repack_error: float = 0.0


def _finite(w: np.ndarray, plan: TensorPlan, model: Model) -> np.ndarray:
    if not np.isfinite(w.astype(np.float32, copy=False)).all():
        raise non_finite(plan.source, model.path or model.origin)
    return w


def _encode(plan: TensorPlan, data, model: Model, method: str) -> _Encoded:
    """One read encoded as its plan says."""
    if plan.repack:
        packed = backend.repack_mlx(data)
        if not np.isfinite(packed.max_abs_error):
            raise MlxedgeError(
                f"tensor {plan.source!r} has scales or biases beyond float16's range, which "
                "Q4_1/Q5_1 store",
                path=model.name,
                fix="pass --type (e.g. Q8_0) to re-quantize from the dequantized weights",
            )
        return _Encoded([packed.data], repack_error=packed.max_abs_error)
    if plan.scheme is not None:
        try:
            qt, err = backend.quantize(data, plan.scheme, plan.dtype, method)
        except backend.NonFiniteWeights:
            raise non_finite(plan.source, model.path or model.origin) from None
        return _Encoded([qt.weight, qt.scales, qt.biases], err)
    if plan.ggml_type is not None:
        w = _finite(np.asarray(data, dtype=np.float32), plan, model)
        try:
            return _Encoded([backend.encode_ggml(w, plan.ggml_type)])
        except OverflowError:
            raise MlxedgeError(
                f"tensor {plan.source!r} holds values beyond float16's range",
                path=model.name,
                fix="pass --type BF16 or F32 (or a quantized type)",
            ) from None
    w = _finite(data, plan, model)
    return _Encoded([np.ascontiguousarray(w.astype(storage_dtype(plan.dtype), copy=False))])


def _join(parts: list[_Encoded]) -> _Encoded:
    """One tensor from its encoded row blocks."""
    if len(parts) == 1:
        return parts[0]
    arrays = [np.concatenate([p.arrays[i] for p in parts]) for i in range(len(parts[0].arrays))]
    error = None
    if parts[0].error is not None:
        error = parts[0].error
        for p in parts[1:]:
            error = error + p.error
    return _Encoded(arrays, error, max(p.repack_error for p in parts))


def _stream(model: Model, plans: list[TensorPlan], method: str):
    """Each source tensor's plan with its encoded arrays, in plan order."""
    parts: list[_Encoded] = []
    for read, data in _read_ahead(model, _reads(plans)):
        parts.append(_encode(read.plan, data, model, method))
        del data
        if read.last:
            yield read.plan, _join(parts)
            parts = []


def convert(
    model: Model,
    plans: list[TensorPlan],
    writer: Writer,
    report: ConvertReport,
    method: str = DEFAULT_METHOD,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> ConvertReport:
    """Carry out `plans` on `model`'s tensors through `writer`, one tensor at a time.

    Args:
        model: the source (see `source.resolve`).
        plans: every output tensor, in output order; those with no `source` the writer computes.
        writer: the output format, writing into a location the caller made atomic.
        report: the report to fill (its rows), handed to `writer.finish`.
        method: the affine quantization method ("rtn", "mse", "mse-zero").
        on_tensor: called after each tensor is written (progress bars).

    Returns:
        `report`, with a row per tensor.

    Raises:
        MlxedgeError: NaN/Inf weights, values a type cannot hold, unreadable input.
    """
    if method not in METHODS:
        raise MlxedgeError(f"method {method!r} is not supported", fix=f"choose one of {METHODS}")
    writer.begin(plans)
    # closing(): a failure mid-stream stops the read-ahead thread here, not whenever the
    # abandoned generator happens to be garbage-collected.
    with closing(_stream(model, plans, method)) as encoded:
        source_plans = iter(p for p in plans if p.source is not None)
        for plan in plans:
            if plan.source is None:
                writer.write(plan, [])
                report.rows.append(_row(plan, _Encoded([]), plan.nbytes))
            else:
                done, enc = next(encoded)
                assert done is next(source_plans)
                writer.write(plan, enc.arrays)
                report.rows.append(_row(plan, enc, sum(a.nbytes for a in enc.arrays)))
            if on_tensor is not None:
                on_tensor(plan)
    writer.finish(report)
    return report


def _row(plan: TensorPlan, enc: _Encoded, nbytes: int) -> TensorRow:
    bytes_in = stored_bytes(plan.shape, plan.source_dtype) if plan.source is not None else 0
    row = TensorRow(plan.source or plan.name, plan.name, plan.shape, plan.target, bytes_in,
                    nbytes, note=plan.note, scheme=plan.scheme)  # fmt: skip
    if enc.error is not None:
        row.rel_rmse, row.max_abs = enc.error.rel_rmse, enc.error.max_abs
    row.repack_error = enc.repack_error
    return row
