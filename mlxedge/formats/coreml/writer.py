"""`mlxedge export coreml`: a folder holding `NAME.mlpackage`, the tokenizer files, config.json and
a model card, committed as one unit.

An MLX folder keeps its own quantization; any other source is quantized first, exactly as
`mlxedge quantize` would (float16 scales: Core ML's own scale type), into a scratch folder inside
the output's hidden partial, and its codes are then carried into block-wise constants. Bits 16
gives float16 weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ...atomic import atomic_output
from ...errors import MlxedgeError
from ...model import Model
from .program import WeightSource, build_program, convert_program

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048
META_NAME = "co.huggingface.exporters.name"  # the key swift-transformers reads: a Hub id


@dataclass
class CoreMLReport:
    """What an export did: where, how many tensors were carried or widened, and their cost."""

    output: Path
    package: Path
    context: int
    carried: int = 0  # quantized tensors carried as block-wise constants
    widened: list[tuple[str, int, int]] = field(default_factory=list)  # (name, bits, container)
    widened_bytes: int = 0  # what the wider containers cost over the codes' own width
    as_float: list[tuple[str, str]] = field(default_factory=list)  # (name, why float16)
    max_offset_error: float = 0.0  # largest |dw| of the float16 offsets
    offset_bound: float = 0.0  # the bound stated for it

    def widened_summary(self) -> str:
        """What widening cost, e.g. "30 tensors widened (6-bit in uint8: 30), +9.1 MiB"."""
        if not self.widened:
            return "no tensor widened"
        counts: dict[tuple[int, int], int] = {}
        for _, bits, container in self.widened:
            counts[bits, container] = counts.get((bits, container), 0) + 1
        kinds = ", ".join(f"{b}-bit in uint{c}: {n}" for (b, c), n in sorted(counts.items()))
        return (f"{len(self.widened)} tensors widened ({kinds}), "
                f"+{self.widened_bytes / 2**20:.1f} MiB")  # fmt: skip


def export_coreml(
    model: Model,
    output: Path,
    opts=None,
    method: str | None = None,
    context: int = DEFAULT_CONTEXT,
    force: bool = False,
) -> CoreMLReport:
    """Write `model` as a stateful Core ML package folder (see the module doc).

    Args:
        model: any source `resolve` opens.
        output: the folder to create.
        opts: `QuantOptions` for a source that is not already quantized; None keeps its
            weights in float16.
        method: the quantization method (default: quantize's default).
        context: KV-cache slots; at most the model's max_position_embeddings.
        force: replace an output mlxedge wrote.

    Raises:
        MlxedgeError: a context out of range, a source that cannot be quantized, or what
            writing an output can raise.
    """
    from ...quant.defaults import DEFAULT_METHOD

    spec = model.arch.spec
    if not 2 <= context <= spec.max_position_embeddings:
        raise MlxedgeError(
            f"--context {context} is outside 2..{spec.max_position_embeddings} (the model's "
            "max_position_embeddings)",
            fix="pass a smaller --context",
        )
    output = Path(output)
    name = model.name
    with atomic_output(output, force=force, protect=[model.path]) as tmp:
        source, scratch = model, None
        if model.quantization is None and opts is not None:
            from ...source import from_folder
            from ..mlx import quantize_to_mlx

            scratch = tmp / ".quantized"
            quantize_to_mlx(model, scratch, opts, method=method or DEFAULT_METHOD,
                            dtype="float16")  # fmt: skip
            source = from_folder(scratch, origin=model.origin)
        weights = _weight_source(source)
        program = build_program(source.arch, weights, context)
        mlmodel = convert_program(program, context)
        report = _report(output, output / f"{name}.mlpackage", context, weights)
        _metadata(mlmodel, model, source, context, report)
        mlmodel.save(str(tmp / f"{name}.mlpackage"))
        if scratch is not None:
            shutil.rmtree(scratch)
        for file_name, data in model.side_files.items():
            (tmp / file_name).write_bytes(data)
        config = source.arch.output_config()
        config.pop("quantization", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_card(model, report), encoding="utf-8")
    return report


def _weight_source(source: Model) -> WeightSource:
    weights = source.weights
    scheme = getattr(weights, "scheme", None)

    def quantized(name: str):
        if scheme is None or scheme(name) is None:
            return None
        return weights.quantized(name)

    return WeightSource(weights.read, quantized)


def _report(output: Path, package: Path, context: int, weights: WeightSource) -> CoreMLReport:
    report = CoreMLReport(output=output, package=package, context=context)
    for name, bw in weights.carried.items():
        report.carried += 1
        report.max_offset_error = max(report.max_offset_error, bw.max_abs_error)
        report.offset_bound = max(report.offset_bound, bw.bound)
        if bw.widened:
            report.widened.append((name, bw.bits, bw.container_bits))
            report.widened_bytes += bw.size * (bw.container_bits - bw.bits) // 8
    report.as_float = sorted(weights.as_float.items())
    return report


def _metadata(mlmodel, model: Model, source: Model, context: int, report: CoreMLReport) -> None:
    from ... import __version__

    bits = source.bits
    meta = mlmodel.user_defined_metadata
    meta[META_NAME] = model.base_model or model.name
    meta["co.huggingface.exporters.architecture"] = model.arch.hf_class
    meta["co.huggingface.exporters.framework"] = "mlxedge"
    meta["co.huggingface.exporters.precision"] = "float16" if bits is None else f"int{bits}"
    meta["mlxedge.context"] = str(context)
    meta["mlxedge.quantization"] = json.dumps(source.quantization or {}, sort_keys=True)
    meta["mlxedge.version"] = __version__
    mlmodel.short_description = f"{model.name}, {meta['co.huggingface.exporters.precision']}, " \
                                f"context {context} (written by mlxedge)"  # fmt: skip


def _card(model: Model, report: CoreMLReport) -> str:
    lines = [
        "---", "library_name: coreml", "tags:", "- coreml", "- mlxedge", "---", "",
        f"# {model.name} — Core ML", "",
        f"A stateful ML program (iOS 18 / macOS 15) exported from `{model.origin}` by mlxedge, "
        f"with a {report.context}-slot KV cache. Interface: `inputIds` (int32, 1 x 1..N), "
        "`causalMask` (float16), states `keyCache` / `valueCache`, output `logits`.", "",
        f"- quantized tensors carried as block-wise constants: {report.carried}",
        f"- float16 offset rounding: at most {report.max_offset_error:.3g} per weight "
        f"(bound {report.offset_bound:.3g})",
        f"- wider Core ML containers (same codes): {report.widened_summary()}",
    ]  # fmt: skip
    if report.as_float:
        lines.append(f"- stored as float16 (no block-wise form): {len(report.as_float)} tensors")
    return "\n".join(lines) + "\n"
