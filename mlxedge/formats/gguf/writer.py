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

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from mlxedge.archs import Architecture
from mlxedge.archs.spec import Role
from mlxedge.atomic import TEXT_MARK, atomic_set, mark_gguf
from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf.mixes import (
    FLOAT_TYPES,
    MIXES,
    Mix,
    ModelShape,
    mix_named,
    tensor_type,
)
from mlxedge.formats.gguf.ollama import modelfile_path, modelfile_text
from mlxedge.formats.gguf.tokenizer_export import add_tokenizer
from mlxedge.model import Model
from mlxedge.plan import TensorPlan, stored_bytes
from mlxedge.quant.repack import REPACKABLE, repackable

log = logging.getLogger(__name__)

# MLX bit widths that have no lossless ggml form go to the nearest block type (re-quantized).
_NEAREST = {2: "Q2_K", 3: "Q3_K", 6: "Q6_K", 8: "Q8_0"}
_FLOAT_TYPE_OF = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # TensorInfo dtypes


def _model_shape(arch: Architecture) -> ModelShape:
    s = arch.spec
    return ModelShape(n_layer=s.n_layers, n_head=s.n_heads, n_head_kv=s.n_kv_heads,
                      is_70b=arch.llama_cpp_is_70b(), tied=s.tied)  # fmt: skip


def plan_tensors(model: Model, mix: Mix | None, pure: bool = False):
    """Every tensor of the output file with its type, and the warnings the plan calls for.

    Args:
        model: a float model or an MLX folder.
        mix: a llama.cpp mix; None for an MLX folder's own precision (lossless repack).
        pure: every quantizable tensor gets the mix's default type (llama-quantize --pure).

    Returns:
        (plans in file order, warnings).
    """
    arch = model.arch
    infos = [i for i in model.weights.infos() if arch.role(i.name) != Role.DROP]
    shape = _model_shape(arch)
    quantized = getattr(model.weights, "scheme", lambda name: None)
    plans: list[TensorPlan] = []
    requantized: dict[int, int] = {}
    for info in infos:
        entry = arch.entry(info.name)
        plan = TensorPlan(info.name, entry.gguf_name, tuple(info.shape), entry, info.dtype,
                          ggml_type="F32")  # fmt: skip
        scheme = quantized(info.name)
        if entry.role in (Role.NORM, Role.BIAS) or len(info.shape) < 2:
            pass
        elif mix is not None:
            plan.ggml_type = tensor_type(mix, entry, info.shape, shape, pure)
            if scheme is not None:
                requantized[scheme.bits] = requantized.get(scheme.bits, 0) + 1
        elif scheme is None:  # a float tensor of an MLX folder keeps its dtype
            plan.ggml_type = _FLOAT_TYPE_OF.get(info.dtype, "F16")
        elif repackable(scheme):
            plan.ggml_type, plan.repack = REPACKABLE[scheme.bits], True
        else:
            t = _NEAREST.get(scheme.bits, "Q8_0")
            plan.ggml_type = tensor_type(Mix(t, 0, t), entry, info.shape, shape, pure=True)
            plan.requantized_from = scheme.bits
            requantized[scheme.bits] = requantized.get(scheme.bits, 0) + 1
        plan.nbytes = stored_bytes(plan.shape, plan.ggml_type)
        plans.append(plan)
    head = arch.gguf_head_copy()
    if head is not None:  # llama.cpp's loader for this architecture needs output.weight
        embedding = next(p for p in plans if p.source == "model.embed_tokens.weight")
        plan = dataclasses.replace(embedding, name=head.gguf_name, entry=head)
        if mix is not None:
            plan.ggml_type = tensor_type(mix, head, plan.shape, shape, pure)
            plan.nbytes = stored_bytes(plan.shape, plan.ggml_type)
        plans.append(plan)
    for name, values in arch.gguf_computed_tensors():
        plans.append(TensorPlan(None, name, values.shape, ggml_type="F32", nbytes=values.nbytes))
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


class GGUFFileWriter:
    """A GGUF file as a `pipeline.Writer`: header, metadata and tensor table first (planned from
    the shapes alone), then each tensor's bytes appended in llama.cpp's row order. gguf-py's
    `GGUFWriter` does the file layout (aligned key/values and data)."""

    def __init__(self, path: Path, model: Model, file_type: int, pre_tokenizer: str | None):
        self.path, self.model = path, model
        self.file_type, self.pre = file_type, pre_tokenizer
        self.adds_bos = False
        self._computed = dict(model.arch.gguf_computed_tensors())
        self._writer: gguf.GGUFWriter | None = None

    def begin(self, plans: list[TensorPlan]) -> None:
        model, arch = self.model, self.model.arch
        if model.tokenizer.raw is None:
            raise MlxedgeError(
                "the model has no tokenizer.json; a GGUF file must carry its tokenizer",
                path=model.name,
                fix="add the original model's tokenizer files to the folder",
            )
        tok_json = model.tokenizer.json
        self._writer = writer = gguf.GGUFWriter(str(self.path), arch.gguf_arch_name)
        mark_gguf(writer)
        writer.add_type("model")
        writer.add_name(model.name)
        arch.add_gguf_hyperparameters(writer)
        writer.add_file_type(self.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        self.adds_bos = _add_tokenizer(writer, model, tok_json, self.pre)
        for p in plans:
            _add_tensor_info(writer, p)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

    def write(self, plan: TensorPlan, arrays: list[np.ndarray]) -> None:
        if plan.source is None:
            data = self._computed[plan.name]
        else:
            # rows are whole blocks: permuting bytes permutes weights
            data = plan.entry.to_gguf(arrays[0])
        self._writer.write_tensor_data(np.ascontiguousarray(data))

    def finish(self, report) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_gguf(
    model: Model,
    path: Path,
    type_name: str | None = "Q4_K_M",
    pre_tokenizer: str | None = None,
    pure: bool = False,
    force: bool = False,
    on_plan: Callable[[list[TensorPlan]], None] | None = None,
    on_tensor: Callable[[TensorPlan], None] | None = None,
    protect=(),
    ollama: bool = False,
):
    """Write `model` as the GGUF file `path`.

    Args:
        model: a float model or an MLX folder (see `source.resolve`).
        type_name: a llama.cpp mix (`Q4_K_M`, `Q8_0`, `F16`, ...; see `mixes.MIXES`); None
            keeps an MLX folder's own precision (4/5-bit groups repacked without loss).
        pre_tokenizer: llama.cpp's pre-tokenizer name; None takes a GGUF source's own, else reads
            it from tokenizer.json.
        pure: every quantizable tensor gets the mix's default type.
        force: replace `path` if it exists (and mlxedge wrote it).
        on_plan, on_tensor: progress callbacks.
        protect: further paths the output must not touch (the model's own is always protected).
        ollama: also write `<stem>.Modelfile` beside the file (see `ollama`); the two are
            committed as one unit (`atomic.atomic_set`).

    Returns:
        The `pipeline.ConvertReport` (mix, file type, adds_bos, warnings; `modelfile`, the
        Modelfile's path, with `ollama`).

    Raises:
        MlxedgeError: unknown type, an architecture or tokenizer GGUF cannot express, NaN/Inf
            weights, an output mlxedge may not write, a full disk. Nothing is left behind.
    """
    from mlxedge.pipeline import ConvertReport, convert

    is_mlx = getattr(model.weights, "scheme", None) is not None
    if type_name is None and not is_mlx:
        raise MlxedgeError(
            "only an MLX folder has a precision of its own to keep",
            path=model.name,
            fix="pass --type (e.g. Q4_K_M)",
        )
    mix = mix_named(type_name) if type_name is not None else None
    plans, warnings = plan_tensors(model, mix, pure)
    file_type = mix.file_type if mix is not None else _dominant_file_type(plans)
    pre = pre_tokenizer or model.gguf_metadata.get(gguf.Keys.Tokenizer.PRE)
    params = sum(p.params for p in plans if p.source is not None)
    report = ConvertReport(output=Path(path), params=params, warnings=warnings,
                           mix=mix.name if mix else "MLX", file_type=file_type)  # fmt: skip
    if on_plan is not None:
        on_plan(plans)
    _log_kernels(plans)
    path = Path(path)
    targets = [(path, False)] + ([(modelfile_path(path), False)] if ollama else [])
    with atomic_set(targets, force=force, protect=[model.path, *protect]) as temps:
        writer = GGUFFileWriter(temps[0], model, file_type, pre)
        try:
            convert(model, plans, writer, report, on_tensor=on_tensor)
        finally:
            writer.close()
        report.adds_bos = writer.adds_bos
        if ollama:
            text, notes = modelfile_text(path.name, model.tokenizer.config, report.adds_bos)
            temps[1].write_text(TEXT_MARK + text, encoding="utf-8")
            report.warnings += notes
            report.modelfile = targets[1][0]
    lossy = [r for r in report.rows if r.repack_error > 0]
    if lossy:
        worst = max(lossy, key=lambda r: r.repack_error)
        report.warnings.append(
            f"{len(lossy)} repacked tensors have scales or biases that are not float16 values "
            f"(bfloat16 scales, say): they were rounded, largest weight error "
            f"{worst.repack_error:.3g} in {worst.name}; quantize with --dtype float16 for an "
            "exact repack"
        )
    return report


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
    if p.ggml_type in ("F32", "F16"):
        dtype = np.float32 if p.ggml_type == "F32" else np.float16
        writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), p.nbytes)
    else:  # block types and BF16 are written as raw bytes
        raw = QType[p.ggml_type]
        block, size = gguf.GGML_QUANT_SIZES[raw]
        byte_shape = (*p.shape[:-1], p.shape[-1] // block * size)
        writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes, raw)


def _log_kernels(plans) -> None:
    """Which implementation quantizes each block type (-v)."""
    from ...quant import backend

    blocks = sorted({p.ggml_type for p in plans
                     if p.ggml_type not in FLOAT_TYPES and not p.repack})  # fmt: skip
    for t in blocks:
        log.info("%s blocks quantized by the %s kernels", t, backend.kernel_family(ggml_type=t))


def _dominant_file_type(plans: list[TensorPlan]) -> int:
    """general.file_type of an MLX repack: the first mix whose default type holds most weights."""
    weights: dict[str, int] = {}
    for p in plans:
        if p.ggml_type != "F32":
            weights[p.ggml_type] = weights.get(p.ggml_type, 0) + p.params
    top = max(weights, key=weights.get) if weights else "F32"
    return next((m.file_type for m in MIXES.values() if m.default == top), MIXES["F16"].file_type)
