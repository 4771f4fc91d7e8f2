"""`mlxedge recommend`: which settings fit a memory budget, best measured quality first.

Sizes are exact for our output format: planned tensor by tensor from config.json alone (so a Hub
model needs only its config), with the KV cache of the stated context added. Quality is the mean KL
divergence that `bench/quality.py` measured on SmolLM2 (choice text), shipped in
`data/quality_smollm2.json`; settings it did not measure (5 and 6 bits, groups of 128) are
estimated (see `_kl_for`) and marked so. Those figures rank settings; a larger
model loses less at the same setting than a 135M one does, so read them as an upper bound.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .archs import arch_for, unwrap
from .errors import MlxedgeError
from .model import TensorInfo
from .quant.defaults import DEFAULT_METHOD, DEFAULT_RECIPE
from .quant.recipes import QuantOptions, plan_tensors

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
RECIPES = ("uniform", "mixed")
DTYPE = "bfloat16"  # of scales, biases and float tensors (float16 takes as many bytes)
KV_BYTES = 2  # float16 KV cache, as mlx-lm and llama.cpp keep it by default

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(k|m|g|t)?i?b?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'8GB', '8GiB', '6.5g', '8000MB' → bytes. GB and GiB both mean 2**30, as Macs count memory."""
    m = _SIZE.match(text)
    if not m:
        raise MlxedgeError(
            f"cannot read {text!r} as an amount of memory", fix="write it like 8GB, 16GiB or 6000MB"
        )
    scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, None: 1}[
        (m.group(2) or "").lower() or None
    ]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class Choice:
    """One setting and what it costs and keeps."""

    bits: int
    group_size: int
    recipe: str
    method: str
    weights_bytes: int
    kv_bytes: int
    kl: float | None
    measured: bool

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    def command(self, model: str) -> str:
        cmd = f"mlxedge quantize {model} --bits {self.bits} --group-size {self.group_size}"
        if self.recipe != DEFAULT_RECIPE:
            cmd += f" --recipe {self.recipe}"
        if self.method != DEFAULT_METHOD:
            cmd += f" --method {self.method}"
        return cmd


def weights_bytes(config: dict, opts: QuantOptions) -> int:
    """Bytes of every tensor mlxedge writes for this config and these options."""
    arch = arch_for(config, "config.json")
    infos = [TensorInfo(e.name, e.shape, "bfloat16") for e in arch.tensors()]
    return sum(plan.nbytes for plan in plan_tensors(arch, infos, opts, DTYPE))


def kv_cache_bytes(config: dict, context: int) -> int:
    """K and V for every layer at `context` tokens, float16; a sliding-window layer keeps only
    its window's tokens (as mlx-lm's rotating caches and llama.cpp's sliding-window cache do)."""
    s = arch_for(config, "config.json").spec
    tokens = sum(context if w is None else min(w, context) for w in s.windows)
    return 2 * tokens * s.n_kv_heads * s.head_dim * KV_BYTES


def quality_table() -> dict:
    """The measured table shipped with the package (see bench/quality.py)."""
    return json.loads(files("mlxedge").joinpath("data/quality_smollm2.json").read_text())


def _kl_for(table: dict, bits: int, group: int, recipe: str, method: str):
    """(mean KL, measured?) for a setting. Unmeasured bit widths are interpolated in log-KL between
    the neighbouring measured ones; groups of 128 (which SmolLM2 cannot show: its hidden size is
    not a multiple of 128) are extrapolated from 32 and 64 as KL(64)^2 / KL(32)."""
    points = {
        (r["bits"], r["group_size"], r["recipe"], r["method"]): r["kl_mean"]
        for r in table["settings"]
        if r.get("embed_bits") is None and r["group_size"] != 128
    }

    def at(b: int, g: int) -> tuple[float | None, bool]:
        if (b, g, recipe, method) in points:
            return points[(b, g, recipe, method)], True
        if g == 128:
            k64, m64 = at(b, 64)
            k32, m32 = at(b, 32)
            return (k64 * k64 / k32 if k64 and k32 else None), False
        known = sorted(x for (x, gg, r, m) in points if (gg, r, m) == (g, recipe, method))
        lower, upper = [x for x in known if x < b], [x for x in known if x > b]
        if not lower or not upper:
            return None, False
        b0, b1 = lower[-1], upper[0]
        t = (b - b0) / (b1 - b0)
        k0, k1 = points[(b0, g, recipe, method)], points[(b1, g, recipe, method)]
        return math.exp((1 - t) * math.log(k0) + t * math.log(k1)), False

    return at(bits, group)


def recommend(config: dict, memory: int, context: int, method: str | None = None) -> list[Choice]:
    """Settings whose weights plus KV cache fit `memory`, best (lowest KL) first, for `method`
    (default: the default method)."""
    table = quality_table()
    method = method or DEFAULT_METHOD
    kv = kv_cache_bytes(config, context)
    out = []
    for bits in BITS:
        for group in GROUPS:
            for recipe in RECIPES:
                opts = QuantOptions(bits=bits, group_size=group, recipe=recipe)
                size = weights_bytes(config, opts)
                if size + kv > memory:
                    continue
                kl, measured = _kl_for(table, bits, group, recipe, method)
                out.append(Choice(bits, group, recipe, method, size, kv, kl, measured))
    out.sort(key=lambda c: (math.inf if c.kl is None else c.kl, c.weights_bytes))
    return out


def model_config(model: str, revision: str | None = None) -> tuple[str, dict]:
    """(name, config.json) of MODEL without its weights; of a Hub id only config.json is fetched."""
    path = Path(model).expanduser()
    if path.is_dir():
        from .source import read_config

        config = unwrap(read_config(path), None)[0]
        arch_for(config, str(path / "config.json"))  # validated here, where the file is known
        return path.absolute().name, config
    if path.suffix.lower() == ".gguf" or model == "smollm2" or path.exists():
        from .source import resolve

        source = resolve(model, revision)
        return source.name, source.config
    from .source import is_hub_id, read_json_object

    if not is_hub_id(model):
        raise MlxedgeError("no such file or folder, and not a Hub id (org/name)", path=model)
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(model, "config.json", revision=revision)
    except Exception as e:  # network, auth, missing repo: one message with the cause
        raise MlxedgeError(
            f"cannot fetch config.json ({type(e).__name__})",
            path=model,
            fix="check the id and your network, or set HF_TOKEN for a gated model",
        ) from None
    config = unwrap(read_json_object(Path(local)), None)[0]
    arch_for(config, f"{model}: config.json")
    return model.split("/")[-1], config
