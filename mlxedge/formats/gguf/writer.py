"""Write a model as a GGUF file that llama.cpp, Ollama and LM Studio load.

One tensor at a time: every tensor's type and byte size is planned first (from the mix rules and
the shapes alone), the header, metadata and tensor table are written, then each tensor is read,
converted and appended, so memory holds one tensor, never the model. gguf-py's `GGUFWriter` does
the file layout (header, key/value pairs, aligned tensor data); what goes in is decided here.

Sources: a float model (Hugging Face folder, Hub id, GGUF, `smollm2`), quantized to a llama.cpp
mix, or an MLX folder. An MLX folder's 4- and 5-bit tensors are repacked as Q4_1/Q5_1 without
re-quantizing (`repack`); everything else in it is re-quantized from its dequantized weights, with
a warning that says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from mlxedge.archs import Architecture, Role, TensorEntry, arch_for
from mlxedge.atomic import atomic_file, mark_gguf
from mlxedge.errors import MlxedgeError, non_finite
from mlxedge.formats.gguf.mixes import (
    FLOAT_TYPES,
    MIXES,
    TYPE_BITS,
    Mix,
    ModelShape,
    mix_named,
    tensor_type,
)
from mlxedge.formats.gguf.repack import REPACKABLE, repack, repackable
from mlxedge.formats.gguf.tokenizer_export import add_tokenizer
from mlxedge.model import BLOCK_WEIGHTS
from mlxedge.quant.ggml import TYPES, quantize_rows

log = logging.getLogger(__name__)

# MLX bit widths that have no lossless ggml form go to the nearest block type (re-quantized).
_NEAREST = {2: "Q2_K", 3: "Q3_K", 6: "Q6_K", 8: "Q8_0"}
_FLOAT_TYPE_OF = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # TensorInfo dtypes


@dataclass
class TensorPlan:
    """One tensor of the output file.

    Attributes:
        source: the Hugging Face name it is read from (None for tensors computed here).
        name: the GGUF name.
        entry: the architecture's table row of the source tensor.
        shape: numpy shape (rows, cols) of the weights it holds.
        type_name: ggml type ("F32", "Q4_K", ...).
        repack: carried over from MLX codes without re-quantizing.
        requantized_from: the MLX bit width it was re-quantized from, when it was.
        nbytes: bytes in the file (without alignment padding).
        repack_error: after writing, the largest weight error a repack's float16 rounding of
            scales and biases caused (0 when exact).
    """

    source: str | None
    name: str
    shape: tuple[int, ...]
    type_name: str
    entry: TensorEntry | None = None  # the architecture's row (None for computed tensors)
    repack: bool = False
    requantized_from: int | None = None
    nbytes: int = 0
    repack_error: float = 0.0

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass
class ExportReport:
    """What was written: the tensors (in file order) and anything worth a warning."""

    path: Path
    mix: str
    file_type: int
    tensors: list[TensorPlan]
    warnings: list[str] = field(default_factory=list)
    adds_bos: bool = False  # llama.cpp puts BOS in front of a text (what the file says)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def by_type(self) -> list[tuple[str, int, int, int]]:
        """(type, tensor count, parameters, bytes) per ggml type, most bytes first."""
        rows: dict[str, list[int]] = {}
        for t in self.tensors:
            row = rows.setdefault(t.type_name, [0, 0, 0])
            row[0] += 1
            row[1] += t.params
            row[2] += t.nbytes
        return sorted(((k, *v) for k, v in rows.items()), key=lambda r: -r[3])


def _nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if type_name in FLOAT_TYPES:
        return n * int(TYPE_BITS[type_name]) // 8
    t = TYPES[type_name]
    return n // t.block_size * t.type_size


def _model_shape(arch: Architecture) -> ModelShape:
    s = arch.spec
    return ModelShape(n_layer=s.n_layers, n_head=s.n_heads, n_head_kv=s.n_kv_heads,
                      is_70b=arch.llama_cpp_is_70b(), tied=s.tied)  # fmt: skip


def plan_tensors(model, mix: Mix | None, pure: bool = False) -> tuple[list[TensorPlan], list[str]]:
    """Every tensor of the output file with its type, and the warnings the plan calls for.

    Args:
        model: a `model.Model` (a float model or an MLX folder).
        mix: a llama.cpp mix; None for an MLX folder's own precision (lossless repack).
        pure: every quantizable tensor gets the mix's default type (llama-quantize --pure).
    """
    arch = arch_for(model.config, "config.json")
    infos = [i for i in model.weights.infos() if arch.role(i.name) != Role.DROP]
    shape = _model_shape(arch)
    quantized = getattr(model.weights, "scheme", lambda name: None)
    plans: list[TensorPlan] = []
    requantized: dict[int, int] = {}
    for info in infos:
        entry = arch.entry(info.name)
        plan = TensorPlan(info.name, entry.gguf_name, tuple(info.shape), "F32", entry)
        scheme = quantized(info.name)
        if entry.role in (Role.NORM, Role.BIAS) or len(info.shape) < 2:
            pass
        elif mix is not None:
            plan.type_name = tensor_type(mix, entry, info.shape, shape, pure)
            if scheme is not None:
                requantized[scheme.bits] = requantized.get(scheme.bits, 0) + 1
        elif scheme is None:  # a float tensor of an MLX folder keeps its dtype
            plan.type_name = _FLOAT_TYPE_OF.get(info.dtype, "F16")
        elif repackable(scheme):
            plan.type_name, plan.repack = REPACKABLE[scheme.bits], True
        else:
            t = _NEAREST.get(scheme.bits, "Q8_0")
            plan.type_name = tensor_type(Mix(t, 0, t), entry, info.shape, shape, pure=True)
            plan.requantized_from = scheme.bits
            requantized[scheme.bits] = requantized.get(scheme.bits, 0) + 1
        plan.nbytes = _nbytes(plan.type_name, plan.shape)
        plans.append(plan)
    for name, values in arch.gguf_computed_tensors():
        plans.append(TensorPlan(None, name, values.shape, "F32", nbytes=values.nbytes))
    warnings = []
    for bits, count in sorted(requantized.items()):
        how = f"to {mix.name}" if mix is not None else "to the nearest ggml type"
        warnings.append(
            f"{count} tensors quantized to {bits} bits in the MLX folder were converted from "
            f"their dequantized weights {how}, i.e. re-quantized (only 4- and 5-bit groups of a "
            "multiple of 32 carry over without loss, when exported without --type)"
        )
    if model.kind == "gguf":
        stored = sorted({i.dtype for i in infos if i.dtype not in _FLOAT_TYPE_OF})
        if stored:
            warnings.append(
                f"this GGUF is already quantized ({', '.join(stored)}); its tensors are converted "
                "from their dequantized values, which loses more than converting the original"
            )
    return plans, warnings


def _read_finite(model, name: str, rows: tuple[int, int] | None) -> np.ndarray:
    w = np.asarray(model.weights.read(name, rows), dtype=np.float32)
    if not np.isfinite(w).all():
        raise non_finite(name, model.name)
    return w


def _encode(w: np.ndarray, type_name: str) -> np.ndarray:
    """float32 rows as a GGUF stores them in `type_name` (F16/BF16 values, or block bytes)."""
    if type_name == "F16":
        with np.errstate(over="ignore"):
            h = w.astype(np.float16)
        if not np.isfinite(h).all():
            raise OverflowError("beyond float16's range")
        return h
    if type_name == "BF16":
        return gguf.quants.quantize(w, QType.BF16).view(np.uint8)
    return quantize_rows(w, type_name)


def _convert(plan: TensorPlan, model, computed: dict[str, np.ndarray]) -> np.ndarray:
    """The bytes (or float array) of one planned tensor, in llama.cpp's row order."""
    if plan.source is None:
        return computed[plan.name]
    if plan.repack:
        packed = repack(model.weights.quantized(plan.source))
        if not np.isfinite(packed.max_abs_error):
            raise MlxedgeError(
                f"tensor {plan.source!r} has scales or biases beyond float16's range, which "
                "Q4_1/Q5_1 store",
                path=model.name,
                fix="pass --type (e.g. Q8_0) to re-quantize from the dequantized weights",
            )
        plan.repack_error = packed.max_abs_error
        data = packed.data
    elif plan.type_name == "F32" or len(plan.shape) < 2:
        data = np.ascontiguousarray(_read_finite(model, plan.source, None), dtype=np.float32)
    else:
        # Blocks of rows: memory holds the (smaller) output and one float32 block, never the
        # whole tensor in float32. Rows are encoded independently, so the bytes do not change.
        rows, cols = plan.shape
        step = max(1, BLOCK_WEIGHTS // cols)
        data = None
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            try:
                part = _encode(_read_finite(model, plan.source, (lo, hi)), plan.type_name)
            except OverflowError:
                raise MlxedgeError(
                    f"tensor {plan.source!r} holds values beyond float16's range",
                    path=model.name,
                    fix="pass --type BF16 or F32 (or a quantized type)",
                ) from None
            if data is None:
                data = np.empty((rows, *part.shape[1:]), dtype=part.dtype)
            data[lo:hi] = part
    return plan.entry.to_gguf(data)  # rows are whole blocks: permuting bytes permutes weights


def write_gguf(
    model,
    path: Path,
    type_name: str | None = "Q4_K_M",
    pre_tokenizer: str | None = None,
    pure: bool = False,
    force: bool = False,
    on_plan: Callable[[list[TensorPlan]], None] | None = None,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> ExportReport:
    """Write `model` (a `model.Model`) as the GGUF file `path`.

    Args:
        type_name: a llama.cpp mix (`Q4_K_M`, `Q8_0`, `F16`, ...; see `mixes.MIXES`); None
            keeps an MLX folder's own precision (4/5-bit groups repacked without loss).
        pre_tokenizer: llama.cpp's pre-tokenizer name; None takes a GGUF source's own, else reads
            it from tokenizer.json.
        pure: every quantizable tensor gets the mix's default type.
        force: replace `path` if it exists.

    Raises:
        MlxedgeError: unknown type, an architecture or tokenizer GGUF cannot express, NaN/Inf
            weights, an existing output without `force`, a full disk. Nothing is left behind.
    """
    is_mlx = getattr(model.weights, "scheme", None) is not None
    if type_name is None and not is_mlx:
        raise MlxedgeError(
            "only an MLX folder has a precision of its own to keep",
            path=model.name,
            fix="pass --type (e.g. Q4_K_M)",
        )
    mix = mix_named(type_name) if type_name is not None else None
    if model.tokenizer.raw is None:
        raise MlxedgeError(
            "the model has no tokenizer.json; a GGUF file must carry its tokenizer",
            path=model.name,
            fix="add the original model's tokenizer files to the folder",
        )
    tok_json = model.tokenizer.json
    config = model.config
    arch = arch_for(config, "config.json")
    plans, warnings = plan_tensors(model, mix, pure)
    computed = dict(arch.gguf_computed_tensors())
    file_type = mix.file_type if mix is not None else _dominant_file_type(plans)
    pre = pre_tokenizer or model.gguf_metadata.get("tokenizer.ggml.pre")
    with atomic_file(Path(path), force=force, protect=[model.path]) as temp:
        writer = gguf.GGUFWriter(str(temp), arch.gguf_arch_name)
        try:
            mark_gguf(writer)
            writer.add_type("model")
            writer.add_name(model.name)
            arch.add_gguf_hyperparameters(writer)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            adds_bos = _add_tokenizer(writer, model, tok_json, pre)
            for p in plans:
                _add_tensor_info(writer, p)
            if on_plan is not None:
                on_plan(plans)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p in plans:
                data = _convert(p, model, computed)
                writer.write_tensor_data(np.ascontiguousarray(data))
                if on_tensor is not None:
                    on_tensor(p)
        finally:
            writer.close()
    lossy = [p for p in plans if p.repack_error > 0]
    if lossy:
        worst = max(lossy, key=lambda p: p.repack_error)
        warnings.append(
            f"{len(lossy)} repacked tensors have scales or biases that are not float16 values "
            f"(bfloat16 scales, say): they were rounded, largest weight error "
            f"{worst.repack_error:.3g} in {worst.source}; quantize with --dtype float16 for an "
            "exact repack"
        )
    name = mix.name if mix else "MLX"
    return ExportReport(Path(path), name, file_type, plans, warnings, adds_bos)


def _add_tokenizer(writer: gguf.GGUFWriter, model, tok_json: dict, pre: str | None) -> bool:
    """`tokenizer_export.add_tokenizer`, with its errors naming the tokenizer file."""
    where = model.tokenizer.where
    try:
        return add_tokenizer(
            writer, int(model.config["vocab_size"]), tok_json, model.tokenizer.config, pre
        )
    except MlxedgeError as e:
        if e.path is not None:
            raise
        raise MlxedgeError(e.message, path=where, fix=e.fix) from None
    except (KeyError, TypeError, ValueError) as e:
        raise MlxedgeError(f"malformed tokenizer ({type(e).__name__}: {e})", path=where) from None


def _add_tensor_info(writer: gguf.GGUFWriter, p: TensorPlan) -> None:
    if p.type_name in ("F32", "F16"):
        dtype = np.float32 if p.type_name == "F32" else np.float16
        writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), p.nbytes)
    else:  # block types and BF16 are written as raw bytes
        raw = QType[p.type_name]
        block, size = gguf.GGML_QUANT_SIZES[raw]
        byte_shape = (*p.shape[:-1], p.shape[-1] // block * size)
        writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes, raw)


def _dominant_file_type(plans: list[TensorPlan]) -> int:
    """general.file_type of an MLX repack: the first mix whose default type holds most weights."""
    weights: dict[str, int] = {}
    for p in plans:
        if p.type_name != "F32":
            weights[p.type_name] = weights.get(p.type_name, 0) + p.params
    top = max(weights, key=weights.get) if weights else "F32"
    return next((m.file_type for m in MIXES.values() if m.default == top), MIXES["F16"].file_type)
