"""llama.cpp's file mixes: which ggml type each tensor of a `Q4_K_M` (etc.) file gets.

A mix name means the same here as in llama-quantize: the same type for the output head and the
token embedding, the same layers given more bits, the same fall-back where a row does not divide
into 256-weight super-blocks. The rules are llama.cpp's `llama_tensor_get_type`
(src/llama-quant.cpp, as vendored in llama-cpp-python 0.3.36) for the dense models we export,
restated here; tests/test_gguf_mix.py checks them against the types llama-quantize picks.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxedge.archs import Kind, Role, TensorEntry
from mlxedge.errors import MlxedgeError
from mlxedge.quant.ggml import TYPES
from mlxedge.quant.recipes import uses_more_bits


@dataclass(frozen=True)
class Mix:
    """A named file type: its `general.file_type` number and the type most tensors get."""

    name: str
    file_type: int  # llama_ftype
    default: str  # ggml type name


MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        Mix("F32", 0, "F32"),
        Mix("F16", 1, "F16"),
        Mix("BF16", 32, "BF16"),
        Mix("Q8_0", 7, "Q8_0"),
        Mix("Q4_0", 2, "Q4_0"),
        Mix("Q4_1", 3, "Q4_1"),
        Mix("Q5_0", 8, "Q5_0"),
        Mix("Q5_1", 9, "Q5_1"),
        Mix("Q2_K", 10, "Q2_K"),
        Mix("Q3_K_S", 11, "Q3_K"),
        Mix("Q3_K_M", 12, "Q3_K"),
        Mix("Q3_K_L", 13, "Q3_K"),
        Mix("Q4_K_S", 14, "Q4_K"),
        Mix("Q4_K_M", 15, "Q4_K"),
        Mix("Q5_K_S", 16, "Q5_K"),
        Mix("Q5_K_M", 17, "Q5_K"),
        Mix("Q6_K", 18, "Q6_K"),
    )
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# `quantize --format gguf --bits N`: the llama.cpp mix of that width most people use.
MIX_FOR_BITS = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}
# Bits per weight of each ggml type, for reports.
TYPE_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0} | {
    t.name: t.type_size * 8 / t.block_size for t in TYPES.values()
}
# Where a row does not divide into a type's blocks, llama.cpp substitutes a 32-weight type.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def mix_named(name: str) -> Mix:
    """The mix `name` (case-insensitive), or one clear error listing the valid names."""
    mix = MIXES.get(name.upper())
    if mix is None:
        raise MlxedgeError(
            f"unknown GGUF type {name!r}",
            fix=f"choose one of {', '.join(MIXES)}",
        )
    return mix


def _block_size(type_name: str) -> int:
    return 1 if type_name in FLOAT_TYPES else TYPES[type_name].block_size


@dataclass(frozen=True)
class ModelShape:
    """What the mix rules look at besides a tensor's name and row length."""

    n_layer: int
    n_head: int
    n_head_kv: int
    is_70b: bool  # llama.cpp's LLM_TYPE_70B (the architecture module knows when)
    tied: bool  # no output.weight: the token embedding is the output head too


def _impl_type(mix: Mix, entry: TensorEntry, row: int, shape: ModelShape) -> str:
    """llama.cpp's per-tensor choice before the row-length fall-back."""
    m, default = mix.name, mix.default
    i = entry.layer or 0
    n = shape.n_layer
    is_output = entry.kind == Kind.OUTPUT or (shape.tied and entry.kind == Kind.TOKEN_EMBD)
    if is_output:
        if row % _block_size(default) or default == "Q8_0":
            return "Q8_0"
        return "Q6_K"
    if entry.kind in (Kind.ATTN_V, Kind.ATTN_QKV):  # a fused q/k/v takes attn_v's rules
        if m == "Q2_K":
            t = "Q4_K" if shape.n_head // shape.n_head_kv >= 4 else "Q3_K"
        elif m == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif m == "Q3_K_L":
            t = "Q5_K"
        elif m in ("Q4_K_M", "Q5_K_M"):
            t = "Q6_K" if uses_more_bits(i, n) else default
        elif m == "Q4_K_S":
            t = "Q5_K" if i < 4 else default
        else:
            t = default
        if shape.is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
        return t
    if entry.kind == Kind.FFN_DOWN:
        if m == "Q2_K":
            return "Q3_K"
        if m == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if m == "Q3_K_L":
            return "Q5_K"
        if m in ("Q4_K_M", "Q5_K_M"):
            return "Q6_K" if uses_more_bits(i, n) else default
        if m == "Q4_K_S":
            return "Q5_K" if i < n // 8 else default
        return default
    if entry.kind == Kind.ATTN_OUT:
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(m, default)
    return default


def tensor_type(
    mix: Mix, entry: TensorEntry, shape: tuple[int, ...], model: ModelShape, pure: bool = False
) -> str:
    """The ggml type of a tensor (numpy `shape`, rows last) in a `mix` file.

    One-dimensional tensors, norms and biases stay F32, as llama.cpp never quantizes them. `pure`
    gives every other tensor the mix's default type (llama-quantize --pure), fall-backs still
    applying.
    """
    if len(shape) < 2 or entry.role in (Role.NORM, Role.BIAS):
        return "F32"
    if mix.default in FLOAT_TYPES:
        return mix.default
    row = shape[-1]
    t = mix.default if pure else _impl_type(mix, entry, row, model)
    if row % _block_size(t):
        t = _FALLBACK.get(t, t)
        if row % _block_size(t):
            t = "F16"
    return t


def nominal_bits(file_type: int | None) -> int | None:
    """The bit width a file type is named after (Q4_K_M: 4), None for float files (or none)."""
    mix = next((m for m in MIXES.values() if m.file_type == file_type), None)
    if mix is None or mix.default in FLOAT_TYPES:
        return None
    return int(mix.default[1])
