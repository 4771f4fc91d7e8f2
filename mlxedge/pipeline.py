"""The quantize pipeline: plan every tensor, stream read → quantize → write, report.

One tensor is in memory at a time (plus its quantized form), so peak memory follows the largest
tensor, not the model.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .archs import Role, arch_for
from .atomic import atomic_output
from .errors import MlxedgeError, non_finite
from .formats import mlx as mlx_format
from .formats.safetensors import write_checkpoint
from .model import BLOCK_WEIGHTS, Model, TensorInfo
from .quant import backend
from .quant.defaults import DEFAULT_METHOD, DEFAULT_RECIPE, METHODS
from .quant.recipes import QuantOptions, TensorPlan, plan_tensors
from .quant.schemes import (
    STORAGE_DTYPES,
    AffineScheme,
    QuantizedTensor,
    storage_dtype,
)

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 * 2**30
FLOAT32_SOURCE_DEFAULT = "bfloat16"  # the 16-bit dtype a float32 source is written in by default


@dataclass
class TensorRow:
    """One source tensor in the report."""

    name: str
    shape: tuple[int, ...]
    scheme: AffineScheme | None
    bytes_in: int
    bytes_out: int
    rel_rmse: float | None = None
    max_abs: float | None = None
    note: str = ""


@dataclass
class QuantizeReport:
    """What `quantize_to_mlx` did, for the CLI's table and the model card."""

    output: Path
    method: str
    dtype: str
    params: int
    rows: list[TensorRow] = field(default_factory=list)

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
        return [r for r in self.rows if r.scheme is not None]

    @property
    def kept(self) -> list[TensorRow]:
        """Tensors the recipe wanted quantized but which stayed in float (with the reason)."""
        return [r for r in self.rows if r.note]

    def scheme_counts(self) -> Counter:
        return Counter(
            f"{r.scheme.bits}-bit g{r.scheme.group_size}" if r.scheme else "float"
            for r in self.rows
        )


def _nbytes(info: TensorInfo) -> int:
    """Bytes a tensor takes as stored (GGUF block types included)."""
    n = int(np.prod(info.shape, dtype=np.int64))
    if info.dtype in STORAGE_DTYPES or hasattr(np, info.dtype):
        return n * np.dtype(STORAGE_DTYPES.get(info.dtype, info.dtype)).itemsize
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[info.dtype]]
    return n // block * size


def default_dtype(source: Model) -> str:
    """The source's own 16-bit dtype; a float32 source gets FLOAT32_SOURCE_DEFAULT."""
    stated = source.config.get("torch_dtype") or source.config.get("dtype")
    if stated in ("float16", "bfloat16"):
        return stated
    counts = Counter(i.dtype for i in source.weights.infos() if i.dtype in ("float16", "bfloat16"))
    if counts:
        return counts.most_common(1)[0][0]
    return FLOAT32_SOURCE_DEFAULT


def default_output_name(source: Model, opts: QuantOptions, method: str) -> str:
    """`<model>-<bits>bit-g<group>[-<recipe>][-<method>]`, recipe and method named only when they
    are not the defaults, e.g. `SmolLM2-135M-Instruct-4bit-g64`, `...-4bit-g64-uniform-rtn`."""
    name = f"{source.name}-{opts.bits}bit-g{opts.group_size}"
    if opts.recipe != DEFAULT_RECIPE:
        name += f"-{opts.recipe}"
    if method != DEFAULT_METHOD:
        name += f"-{method}"
    return name


def _check_finite(info: TensorInfo, w: np.ndarray, origin: str) -> None:
    if not np.isfinite(w.astype(np.float32, copy=False)).all():
        raise non_finite(info.name, origin)


@dataclass(frozen=True)
class _Read:
    """One read of the stream: a whole tensor, or one block of rows of a large tensor."""

    plan: TensorPlan
    rows: tuple[int, int] | None
    last: bool  # the tensor's last block (or the whole tensor)


def _reads(plans: list[TensorPlan]) -> Iterator[_Read]:
    """The reads in output order. Quantization works row by row, so a tensor larger than
    BLOCK_WEIGHTS is read and quantized in blocks of rows (identical bytes; memory holds one block
    of the source instead of the whole tensor: an embedding of 128K x 2048 is 1 GiB in float32).
    """
    for plan in plans:
        if plan.role == Role.DROP:
            continue
        if plan.scheme is None or math.prod(plan.info.shape) <= BLOCK_WEIGHTS:
            yield _Read(plan, None, True)
            continue
        rows, cols = plan.info.shape
        step = max(1, BLOCK_WEIGHTS // cols)
        for start in range(0, rows, step):
            yield _Read(plan, (start, start + step), start + step >= rows)


def _read_ahead(source: Model, reads: Iterator[_Read]) -> Iterator[tuple[_Read, np.ndarray]]:
    """Each read with its array; the next one is read on a thread while the caller quantizes this
    one, so reading overlaps computing. Memory holds at most two reads."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxedge-read")
    try:
        pending = None
        for read in reads:
            future = pool.submit(source.weights.read, read.plan.info.name, read.rows)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (read, future)
        if pending is not None:
            yield pending[0], pending[1].result()
    finally:
        # Never wait here: if the generator is abandoned, this runs wherever it is finalized.
        pool.shutdown(wait=False, cancel_futures=True)


def _join(parts: list[tuple[QuantizedTensor, backend.QuantError]]):
    """One tensor from its quantized row blocks."""
    if len(parts) == 1:
        return parts[0]
    qts = [p[0] for p in parts]
    joined = QuantizedTensor(
        np.concatenate([q.weight for q in qts]),
        np.concatenate([q.scales for q in qts]),
        np.concatenate([q.biases for q in qts]),
        qts[0].scheme,
    )
    err = parts[0][1]
    for _, e in parts[1:]:
        err = err + e
    return joined, err


def _stream(
    source: Model,
    plans: list[TensorPlan],
    dtype: str,
    method: str,
    report: QuantizeReport,
    on_tensor: Callable[[TensorPlan], None] | None,
) -> Iterator[np.ndarray]:
    """Read, check, quantize and yield each output array in `output_infos` order.

    The backend checks every weight it quantizes for NaN/Inf as it goes; kept tensors are checked
    here.
    """
    out_dtype = storage_dtype(dtype)
    parts: list[tuple[QuantizedTensor, backend.QuantError]] = []
    for read, w in _read_ahead(source, _reads(plans)):
        plan = read.plan
        row = TensorRow(plan.info.name, plan.info.shape, plan.scheme, _nbytes(plan.info), 0)
        row.note = plan.note
        if plan.scheme is None:
            _check_finite(plan.info, w, source.origin)
            out = np.ascontiguousarray(w.astype(out_dtype, copy=False))
            row.bytes_out = out.nbytes
            report.rows.append(row)
            yield out
        else:
            try:
                parts.append(backend.quantize(w, plan.scheme, dtype, method))
            except backend.NonFiniteWeights:
                raise non_finite(plan.info.name, source.origin) from None
            del w
            if not read.last:
                continue
            qt, err = _join(parts)
            parts = []
            row.bytes_out = qt.weight.nbytes + qt.scales.nbytes + qt.biases.nbytes
            row.rel_rmse, row.max_abs = err.rel_rmse, err.max_abs
            report.rows.append(row)
            yield qt.weight
            yield qt.scales
            yield qt.biases
        if on_tensor is not None:
            on_tensor(plan)


def quantize_to_mlx(
    source: Model,
    output: Path,
    opts: QuantOptions,
    method: str = DEFAULT_METHOD,
    dtype: str | None = None,
    force: bool = False,
    command: str = "",
    on_plan: Callable[[list[TensorPlan]], None] | None = None,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> QuantizeReport:
    """Quantize a model into an MLX folder.

    Args:
        source: the model (see `source.resolve`).
        output: the folder to create; it must not exist unless `force`.
        opts: bits, group size, recipe, embedding settings and overrides.
        method: "rtn" (MLX's rounding, bit-exact with `mx.quantize`), "mse" or "mse-zero".
        dtype: storage dtype of scales, biases and float tensors; None for `default_dtype`.
        force: replace an existing output.
        command: the command line to state in the model card (no absolute paths).
        on_plan: called once with every tensor's plan before work starts (for progress bars).
        on_tensor: called after each source tensor is written.

    Returns:
        The report: every tensor's scheme, sizes and error; bits per weight.

    Raises:
        MlxedgeError: bad options, bad input (NaN/Inf weights, corrupt files), an existing output
            without `force`, or a full disk. Nothing is left at `output` on failure.
    """
    if method not in METHODS:
        raise MlxedgeError(f"method {method!r} is not supported", fix=f"choose one of {METHODS}")
    if source.quantization is not None:
        raise MlxedgeError(
            "this is an already-quantized MLX folder",
            path=source.path,
            fix="quantize from the original (unquantized) model; mlxedge inspect shows this folder",
        )
    dtype = dtype or default_dtype(source)
    storage_dtype(dtype)
    arch = arch_for(source.config, source.origin)
    infos = source.weights.infos()
    plans = plan_tensors(arch, infos, opts)
    kept = [p for p in plans if p.role != Role.DROP]
    params = sum(int(np.prod(p.info.shape, dtype=np.int64)) for p in kept)
    out_infos = [i for p in kept for i in mlx_format.output_infos(p, dtype)]
    default = AffineScheme(opts.bits, opts.group_size)
    report = QuantizeReport(output=output, method=method, dtype=dtype, params=params)
    if on_plan is not None:
        on_plan(kept)
    log.info(
        "quantizing %d tensors of %s with %s",
        len(kept),
        source.name,
        backend.active_backend(method),
    )
    with atomic_output(output, force=force, protect=[source.path]) as tmp:
        # Small files first: a failure in the long tensor loop then costs nothing extra.
        quant_block = mlx_format.quantization_block(kept, default)
        (tmp / "config.json").write_bytes(
            mlx_format.config_json(arch.output_config(), quant_block, dtype)
        )
        for name, data in sorted(source.side_files.items()):
            (tmp / name).write_bytes(data)
        # closing(): a failure mid-stream stops the read-ahead thread here, not whenever the
        # abandoned generator happens to be garbage-collected.
        with closing(_stream(source, kept, dtype, method, report, on_tensor)) as arrays:
            write_checkpoint(
                tmp, out_infos, arrays, metadata={"format": "mlx"}, max_shard_bytes=MAX_SHARD_BYTES
            )
        errors = [(r.name, r.rel_rmse) for r in report.quantized]
        facts = mlx_format.CardFacts(
            model_name=source.name,
            origin=source.origin,
            command=command,
            license=source.license,
            base_model=source.base_model,
            method=method,
            dtype=dtype,
            default=default,
            recipe=opts.recipe,
            bits_per_weight=report.bits_per_weight,
            bytes_in=report.bytes_in,
            bytes_out=report.bytes_out,
            params=params,
            mean_rel_rmse=float(np.mean([e for _, e in errors])) if errors else 0.0,
            worst=sorted(errors, key=lambda x: -x[1])[:5],
            kept=[(r.name, r.note) for r in report.kept],
        )
        (tmp / "README.md").write_bytes(mlx_format.model_card(facts))
    return report
