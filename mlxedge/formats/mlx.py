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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import MlxedgeError
from ..model import TensorInfo, TensorSource
from ..quant.recipes import TensorPlan
from ..quant.schemes import AffineScheme, QuantizedTensor, dequantize

MODE = "affine"


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the output depends on."""
    out = {}
    for dist in ("mlxedge", "mlx", "mlx-lm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def output_infos(plan: TensorPlan, dtype: str) -> list[TensorInfo]:
    """The tensors one planned source tensor becomes in the MLX folder (empty when dropped)."""
    name, shape = plan.info.name, plan.info.shape
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


# ------------------------------------------------------------------------------------ reading


class DequantizedMLX:
    """The tensors of a quantized MLX folder, with every quantized weight dequantized on read."""

    def __init__(self, checkpoint: TensorSource, quantization: dict, folder: Path) -> None:
        self._ckpt = checkpoint
        raw = {i.name: i for i in checkpoint.infos()}
        self._schemes: dict[str, AffineScheme] = {}
        infos = []
        for name, info in raw.items():
            module = name.rsplit(".", 1)[0]
            quantized = module + ".scales" in raw
            if quantized and name.endswith((".scales", ".biases")):
                continue  # folded into the weight
            if quantized and name.endswith(".weight"):
                scheme = _scheme(module, quantization, folder)
                rows, packed = info.shape
                infos.append(TensorInfo(name, (rows, packed * 32 // scheme.bits), "float32"))
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


def _scheme(module: str, quantization: dict, folder: Path) -> AffineScheme:
    entry = quantization.get(module)
    source = entry if isinstance(entry, dict) else quantization
    try:
        return AffineScheme(int(source["bits"]), int(source["group_size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise MlxedgeError(
            f"config.json's quantization block is unreadable for {module} ({e})",
            path=folder / "config.json",
        ) from None


def mlx_weights(
    checkpoint: TensorSource, quantization: dict, folder: Path
) -> tuple[DequantizedMLX, int | None]:
    """An MLX folder's tensors as float (see `DequantizedMLX`) and its default bit width.

    Raises:
        MlxedgeError: an unreadable quantization block.
    """
    if not isinstance(quantization, dict):
        raise MlxedgeError("config.json's quantization is not an object", path=folder)
    bits = quantization.get("bits")
    return DequantizedMLX(checkpoint, quantization, folder), (int(bits) if bits else None)
