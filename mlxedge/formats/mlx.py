"""The MLX folder: what `mlx_lm.load` and mlx-swift-lm read as they are; its writer's pieces and
its reader.

Contents: config.json with a `quantization` block in mlx-lm's shape (defaults plus one entry per
module whose scheme differs), safetensors shards with their index, the tokenizer and generation
files carried over, and a README model card. Nothing here holds a timestamp, a duration or an
absolute path, so a rerun writes identical bytes.

Read back, a folder's quantized tensors are presented dequantized to float32 (scales and biases
cast to float32 before the product, as MLX computes), so the numpy reference runs an artifact's
own weights exactly as they are stored.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import MlxedgeError
from ..model import Model, TensorInfo, TensorSource
from ..plan import TensorPlan
from ..quant import backend
from ..quant.defaults import DEFAULT_METHOD, DEFAULT_RECIPE
from ..quant.recipes import QuantOptions, plan_tensors
from ..quant.schemes import AffineScheme, QuantizedTensor, dequantize
from .safetensors import ShardedWriter

MODE = "affine"
MAX_SHARD_BYTES = 5 * 2**30
FLOAT32_SOURCE_DEFAULT = "bfloat16"  # the 16-bit dtype a float32 source is written in by default

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the output depends on."""
    out = {}
    for dist in ("mlxedge", "mlx", "mlx-lm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def output_infos(plan: TensorPlan) -> list[TensorInfo]:
    """The tensors one planned source tensor becomes in the MLX folder."""
    name, shape, dtype = plan.name, plan.shape, plan.dtype
    if plan.scheme is None:
        return [TensorInfo(name, shape, dtype)]
    rows, cols = shape
    groups = (rows, cols // plan.scheme.group_size)
    return [
        TensorInfo(name, (rows, plan.scheme.packed_cols(cols)), "uint32"),
        TensorInfo(f"{plan.module}.scales", groups, dtype),
        TensorInfo(f"{plan.module}.biases", groups, dtype),
    ]


def quantization_block(plans: list[TensorPlan], default: AffineScheme) -> dict:
    """mlx-lm's `quantization` config: defaults, then each module quantized differently."""
    block: dict = {"group_size": default.group_size, "bits": default.bits, "mode": MODE}
    for p in plans:
        if p.scheme is not None and p.scheme != default:
            block[p.module] = {
                "group_size": p.scheme.group_size,
                "bits": p.scheme.bits,
                "mode": MODE,
            }
    return block


def config_json(config: dict, quantization: dict, dtype: str) -> bytes:
    """config.json bytes: the model's config with the quantization block, keys sorted, as mlx-lm."""
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    out.pop("_name_or_path", None)
    out["quantization"] = quantization
    out["quantization_config"] = quantization  # Hugging Face tooling looks for this key
    out["torch_dtype"] = dtype
    return (json.dumps(dict(sorted(out.items())), indent=4) + "\n").encode()


@dataclass
class CardFacts:
    """What the model card states; everything deterministic."""

    model_name: str
    origin: str
    command: str
    license: str | None
    base_model: str | None
    method: str
    kernels: str  # which implementation quantized (all give the same bytes)
    dtype: str
    default: AffineScheme
    recipe: str
    bits_per_weight: float
    bytes_in: int
    bytes_out: int
    params: int
    mean_rel_rmse: float
    worst: list[tuple[str, float]] = field(default_factory=list)  # (tensor, rel_rmse), worst first
    kept: list[tuple[str, str]] = field(default_factory=list)  # (tensor, why kept in float)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def model_card(facts: CardFacts) -> bytes:
    """README.md for the folder: front matter for the Hub, then how it was made and its error."""
    front = ["---", "library_name: mlx", "tags:", "- mlx", "- mlxedge", "- quantized"]
    if facts.license:
        front.append(f"license: {facts.license}")
    if facts.base_model:
        front.append(f"base_model: {facts.base_model}")
    front.append("---")
    v = versions()
    lines = front + [
        "",
        f"# {facts.model_name} — {facts.default.bits}-bit MLX",
        "",
        f"Quantized from `{facts.origin}` with mlxedge:",
        "",
        "```",
        facts.command,
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| method | {facts.method} |",
        f"| quantized by | {facts.kernels} kernels |",
        f"| recipe | {facts.recipe} |",
        f"| default bits / group size | {facts.default.bits} / {facts.default.group_size} |",
        f"| scales, biases and float tensors | {facts.dtype} |",
        f"| parameters (source) | {facts.params:,} |",
        f"| size before | {_mib(facts.bytes_in)} |",
        f"| size after | {_mib(facts.bytes_out)} |",
        f"| bits per weight | {facts.bits_per_weight:.3f} |",
        f"| mean relative RMS error | {facts.mean_rel_rmse:.4f} |",
        "",
        "Bits per weight: every byte of every tensor written × 8 ÷ the source model's parameter "
        "count. Relative RMS error: ‖W − Ŵ‖ / ‖W‖ per quantized tensor.",
        "",
    ]
    if facts.worst:
        lines += ["Largest errors:", "", "| tensor | relative RMS error |", "|---|---|"]
        lines += [f"| `{n}` | {e:.4f} |" for n, e in facts.worst]
        lines.append("")
    if facts.kept:
        lines += ["Kept in float although the recipe asked for bits:", ""]
        lines += [f"- `{n}`: {why}" for n, why in facts.kept]
        lines.append("")
    lines += [
        "Load it with mlx-lm:",
        "",
        "```python",
        "from mlx_lm import load, generate",
        'model, tokenizer = load("path/to/this/folder")',
        'print(generate(model, tokenizer, prompt="Hello", max_tokens=32))',
        "```",
        "",
        "Written by " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]
    return "\n".join(lines).encode()


# ------------------------------------------------------------------------------------ writing


def default_dtype(model: Model) -> str:
    """The source's own 16-bit dtype; a float32 source gets FLOAT32_SOURCE_DEFAULT."""
    stated = model.config.get("torch_dtype") or model.config.get("dtype")
    if stated in ("float16", "bfloat16"):
        return stated
    counts = Counter(i.dtype for i in model.weights.infos() if i.dtype in ("float16", "bfloat16"))
    if counts:
        return counts.most_common(1)[0][0]
    return FLOAT32_SOURCE_DEFAULT


def default_output_name(model: Model, opts: QuantOptions, method: str) -> str:
    """`<model>-<bits>bit-g<group>[-<recipe>][-<method>]`, recipe and method named only when they
    are not the defaults, e.g. `SmolLM2-135M-Instruct-4bit-g64`, `...-4bit-g64-uniform-rtn`."""
    name = f"{model.name}-{opts.bits}bit-g{opts.group_size}"
    if opts.recipe != DEFAULT_RECIPE:
        name += f"-{opts.recipe}"
    if method != DEFAULT_METHOD:
        name += f"-{method}"
    return name


def card_command(model: str, opts: dict) -> str:
    """The command stated in the model card: options in a fixed order, no output path."""
    parts = ["mlxedge", "quantize", Path(model).name if Path(model).exists() else model]
    for key in (
        "bits",
        "group_size",
        "method",
        "recipe",
        "dtype",
        "embed_bits",
        "embed_group_size",
    ):
        if opts.get(key) is not None:
            parts += [f"--{key.replace('_', '-')}", str(opts[key])]
    for ov in opts.get("override", ()):
        parts += ["--override", ov]
    return shlex.join(parts)


class MLXFolderWriter:
    """The MLX folder as a `pipeline.Writer`: config and side files first, then the safetensors
    shards tensor by tensor, the model card last."""

    def __init__(
        self, folder: Path, model: Model, opts: QuantOptions, dtype: str, command: str
    ) -> None:
        self.folder, self.model, self.opts = folder, model, opts
        self.dtype, self.command = dtype, command
        self._shards: ShardedWriter | None = None

    def begin(self, plans: list[TensorPlan]) -> None:
        # Small files first: a failure in the long tensor loop then costs nothing extra.
        default = AffineScheme(self.opts.bits, self.opts.group_size)
        block = quantization_block(plans, default)
        config = config_json(self.model.arch.output_config(), block, self.dtype)
        (self.folder / "config.json").write_bytes(config)
        for name, data in sorted(self.model.side_files.items()):
            (self.folder / name).write_bytes(data)
        infos = [i for p in plans for i in output_infos(p)]
        self._shards = ShardedWriter(self.folder, infos, {"format": "mlx"}, MAX_SHARD_BYTES)

    def write(self, plan: TensorPlan, arrays: list[np.ndarray]) -> None:
        for info, array in zip(output_infos(plan), arrays, strict=True):
            self._shards.write(info.name, array)

    def finish(self, report) -> None:
        self._shards.close()
        errors = [(r.name, r.rel_rmse) for r in report.quantized]
        facts = CardFacts(
            model_name=self.model.name,
            origin=self.model.origin,
            command=self.command,
            license=self.model.license,
            base_model=self.model.base_model,
            method=report.method,
            kernels=backend.kernel_family(report.method),
            dtype=self.dtype,
            default=AffineScheme(self.opts.bits, self.opts.group_size),
            recipe=self.opts.recipe,
            bits_per_weight=report.bits_per_weight,
            bytes_in=report.bytes_in,
            bytes_out=report.bytes_out,
            params=report.params,
            mean_rel_rmse=float(np.mean([e for _, e in errors])) if errors else 0.0,
            worst=sorted(errors, key=lambda x: -x[1])[:5],
            kept=[(r.name, r.note) for r in report.kept],
        )
        (self.folder / "README.md").write_bytes(model_card(facts))

    def abort(self) -> None:
        if self._shards is not None:
            self._shards.abort()


def quantize_to_mlx(
    model: Model,
    output: Path,
    opts: QuantOptions,
    method: str = DEFAULT_METHOD,
    dtype: str | None = None,
    force: bool = False,
    command: str = "",
    on_plan: Callable[[list[TensorPlan]], None] | None = None,
    on_tensor: Callable[[TensorPlan], None] | None = None,
):
    """Quantize a model into an MLX folder that mlx-lm and mlx-swift-lm load.

    Args:
        model: the model (see `source.resolve`); not an MLX folder already.
        output: the folder to create; it must not exist unless `force`.
        opts: bits, group size, recipe, embedding settings and overrides.
        method: "rtn" (MLX's rounding, bit-exact with `mx.quantize`), "mse" or "mse-zero".
        dtype: storage dtype of scales, biases and float tensors; None for `default_dtype`.
        force: replace an existing output (one mlxedge wrote).
        command: the command line to state in the model card (no absolute paths).
        on_plan: called once with every tensor's plan before work starts (for progress bars).
        on_tensor: called after each source tensor is written.

    Returns:
        The `pipeline.ConvertReport`: every tensor's scheme, sizes and error; bits per weight.

    Raises:
        MlxedgeError: bad options, bad input (NaN/Inf weights, corrupt files), an already
            quantized source, an output mlxedge may not write, or a full disk. Nothing is left
            at `output` on failure.
    """
    from ..pipeline import ConvertReport, convert
    from ..quant.defaults import METHODS
    from ..quant.schemes import storage_dtype

    if method not in METHODS:
        raise MlxedgeError(f"method {method!r} is not supported", fix=f"choose one of {METHODS}")
    if model.quantization is not None:
        raise MlxedgeError(
            "this is an already-quantized MLX folder",
            path=model.path,
            fix="quantize from the original (unquantized) model; mlxedge inspect shows this folder",
        )
    dtype = dtype or default_dtype(model)
    storage_dtype(dtype)
    plans = plan_tensors(model.arch, model.weights.infos(), opts, dtype)
    params = sum(p.params for p in plans)
    if on_plan is not None:
        on_plan(plans)
    log.info("quantizing %d tensors of %s with %s", len(plans), model.name,
             backend.active_backend(method))  # fmt: skip
    report = ConvertReport(output=Path(output), params=params, method=method, dtype=dtype)
    with atomic_output(output, force=force, protect=[model.path]) as tmp:
        writer = MLXFolderWriter(tmp, model, opts, dtype, command)
        try:
            convert(model, plans, writer, report, method, on_tensor)
        except BaseException:
            writer.abort()
            raise
    return report


# ------------------------------------------------------------------------------------ reading


class DequantizedMLX:
    """The tensors of a quantized MLX folder, with every quantized weight dequantized on read."""

    def __init__(self, checkpoint: TensorSource, quantization: dict, folder: Path) -> None:
        self._ckpt = checkpoint
        raw = {i.name: i for i in checkpoint.infos()}
        self._stored = {name: info.dtype for name, info in raw.items()}  # dtypes as written
        self._schemes: dict[str, AffineScheme] = {}
        infos = []
        for name, info in raw.items():
            module = name.rsplit(".", 1)[0]
            quantized = module + ".scales" in raw
            if quantized and name.endswith((".scales", ".biases")):
                continue  # folded into the weight
            if quantized and name.endswith(".weight"):
                scheme = module_scheme(module, quantization, folder)
                cols = _check_quantized(name, raw, scheme, folder)
                infos.append(TensorInfo(name, (info.shape[0], cols), "float32"))
                self._schemes[name] = scheme
            else:
                infos.append(info)
        self._infos = infos

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def scheme(self, name: str) -> AffineScheme | None:
        """How weight `name` is quantized, or None when it is stored in float."""
        return self._schemes.get(name)

    def quantized(self, name: str, rows: tuple[int, int] | None = None) -> QuantizedTensor:
        """The stored codes, scales and biases of quantized weight `name`."""
        module = name[: -len(".weight")]
        return QuantizedTensor(
            self._ckpt.read(name, rows).view(np.uint32),
            self._ckpt.read(module + ".scales", rows),
            self._ckpt.read(module + ".biases", rows),
            self._schemes[name],
        )

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        if name not in self._schemes:
            return self._ckpt.read(name, rows)
        return dequantize(self.quantized(name, rows))

    def plain_twin(self, name: str, w: np.ndarray) -> np.ndarray:
        """Float weights `w` stored as this folder stores `name`, by MLX's round-to-nearest
        (the quality gate's yardstick, see `twin`)."""
        from ..quant import backend
        from ..twin import round_to_float

        dtypes = self._stored
        scheme = self._schemes.get(name)
        if scheme is None:
            return round_to_float(w, dtypes[name])
        module = name[: -len(".weight")]
        qt, _ = backend.quantize(w, scheme, dtypes[module + ".scales"], "rtn")
        return dequantize(qt)


def _check_quantized(name: str, raw: dict[str, TensorInfo], scheme: AffineScheme,
                     folder: Path) -> int:  # fmt: skip
    """The column count of quantized weight `name`, after checking that its codes, scales and
    biases fit together and its scheme: MLX itself does not check, and a `.scales` of the wrong
    shape kills it (SIGFPE) instead of raising.

    Raises:
        MlxedgeError: naming the tensor, its shapes and the folder.
    """
    module = name[: -len(".weight")]
    weight, scales, biases = raw[name], raw[module + ".scales"], raw.get(module + ".biases")
    fix = "the folder is damaged or was not written by mlx-lm or mlxedge; quantize it again"
    if biases is None:
        raise MlxedgeError(f"quantized weight {name!r} has .scales but no .biases "
                           f"({MODE} quantization stores both)", path=folder, fix=fix)  # fmt: skip
    if len(weight.shape) != 2 or weight.dtype not in ("uint32", "U32"):
        raise MlxedgeError(f"quantized weight {name!r} is {weight.dtype} {list(weight.shape)}, "
                           "not a 2-D uint32 array of packed codes", path=folder,
                           fix=fix)  # fmt: skip
    rows, packed = weight.shape
    cols = packed * 32 // scheme.bits
    if packed * 32 % scheme.bits or cols % scheme.group_size:
        raise MlxedgeError(f"quantized weight {name!r} has {packed} words per row, which is no "
                           f"whole number of {scheme.bits}-bit groups of {scheme.group_size}",
                           path=folder, fix=fix)  # fmt: skip
    groups = (rows, cols // scheme.group_size)
    for info in (scales, biases):
        if tuple(info.shape) != groups:
            raise MlxedgeError(
                f"{info.name!r} has shape {list(info.shape)}, but {name!r} at {scheme.bits} bits "
                f"in groups of {scheme.group_size} needs {list(groups)}",
                path=folder,
                fix=fix,
            )
    return cols


def module_scheme(module: str, quantization: dict, folder: Path) -> AffineScheme:
    """The scheme an MLX folder's `quantization` block gives a module (its own entry, else the
    defaults).

    Raises:
        MlxedgeError: the block is unreadable for that module.
    """
    entry = quantization.get(module)
    source = entry if isinstance(entry, dict) else quantization
    where = folder / "config.json"
    values = []
    for key in ("bits", "group_size"):
        value = source.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise MlxedgeError(
                f"the quantization block gives {module} no whole-number {key} ({value!r:.40})",
                path=where,
                fix="the config is damaged; use the one the folder was written with",
            )
        values.append(value)
    try:
        return AffineScheme(*values)
    except MlxedgeError as e:
        raise MlxedgeError(f"the quantization block for {module}: {e.message}", path=where,
                           fix=e.fix) from None  # fmt: skip


def mlx_weights(
    checkpoint: TensorSource, quantization: dict, folder: Path
) -> tuple[DequantizedMLX, int | None]:
    """An MLX folder's tensors as float (see `DequantizedMLX`) and its default bit width.

    Raises:
        MlxedgeError: an unreadable quantization block.
    """
    if not isinstance(quantization, dict):
        raise MlxedgeError(
            f"the quantization block is a {type(quantization).__name__}, not an object",
            path=folder / "config.json",
            fix="the config is damaged; use the one the folder was written with",
        )
    default = module_scheme("the default", {k: v for k, v in quantization.items()
                                            if not isinstance(v, dict)}, folder)  # fmt: skip
    return DequantizedMLX(checkpoint, quantization, folder), default.bits
