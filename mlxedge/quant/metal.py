"""Our Metal kernels (`metal_kernels/*.metal`) as `mx.fast.metal_kernel` objects, built once.

Each `KernelSpec` names a kernel body, its inputs, outputs and template; `call` runs it on the GPU
(on a Mac), and `generated_source` gives the exact text MLX compiles for one instantiation —
obtainable on any machine, since MLX generates it while tracing under `mx.export_function` even
without a Metal back end. The test harness compiles that very text as C++ and runs it on the CPU
(tests/metal_harness.py), so the kernel that runs on a Mac is the one checked on Linux.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parents[2] / "metal_kernels"


@dataclass(frozen=True)
class KernelSpec:
    """One kernel body and its interface, as `mx.fast.metal_kernel` takes them."""

    name: str  # the body's file is metal_kernels/NAME.metal
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body: str | None = None  # the text itself instead of the file (tests alter copies)

    @property
    def source(self) -> str:
        if self.body is not None:
            return self.body
        return (KERNEL_DIR / f"{self.name}.metal").read_text()


AFFINE_RTN = KernelSpec("affine_quantize_rtn", ("w", "n_groups"), ("codes", "scales", "biases"))
GGML_LEGACY = KernelSpec("ggml_quantize_legacy", ("x", "n_blocks"), ("blocks",))
AFFINE_RTN_COALESCED = KernelSpec("affine_quantize_rtn_coalesced", ("w",),
                                  ("codes", "scales", "biases"))  # fmt: skip
AFFINE_SEARCH = KernelSpec("affine_quantize_search", ("w", "n_groups"),
                           ("codes", "scales", "biases"))  # fmt: skip
AFFINE_DEQUANT = KernelSpec("affine_dequantize", ("codes", "scales", "biases", "n_groups"), ("w",))
GGML_LEGACY_DEQUANT = KernelSpec("ggml_dequantize_legacy", ("blocks", "n_blocks"), ("x",))
KERNELS = (AFFINE_RTN, AFFINE_RTN_COALESCED, AFFINE_SEARCH, GGML_LEGACY, AFFINE_DEQUANT,
           GGML_LEGACY_DEQUANT)  # fmt: skip
METAL_METHODS = ("rtn", "mse", "mse-zero")  # affine methods with a Metal kernel
_SEARCH_ZERO = {"mse": 0, "mse-zero": 1}
METAL_GGML_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# the TYPE template value of each legacy block type, and its bytes per block of 32
LEGACY_TYPES = {"Q8_0": (0, 34), "Q4_0": (1, 18), "Q4_1": (2, 20), "Q5_0": (3, 22), "Q5_1": (4, 24)}


def header() -> str:
    return (KERNEL_DIR / "header.metal").read_text()


@cache
def kernel(spec: KernelSpec):
    """The `mx.fast.metal_kernel` of `spec`, built once per process (MLX caches the library)."""
    import mlx.core as mx

    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=spec.source,
        header=header(),
    )


@dataclass(frozen=True)
class Launch:
    """One call of a kernel: its inputs (mx arrays), outputs, grid and template."""

    inputs: tuple
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: tuple[tuple[str, object], ...]


def call(spec: KernelSpec, launch: Launch, verbose: bool = False) -> list:
    return kernel(spec)(
        inputs=list(launch.inputs),
        output_shapes=list(launch.output_shapes),
        output_dtypes=list(launch.output_dtypes),
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        template=list(launch.template),
        verbose=verbose,
    )


def generated_source(spec: KernelSpec, launch: Launch) -> str:
    """The Metal text MLX generates for this launch (signature, template and attributes
    included; without MLX's `utils.h` prelude), captured from its verbose output while the call
    is traced by `mx.export_function`, which works without a Metal back end."""
    import mlx.core as mx

    def traced(*arrays):
        return call(spec, replace(launch, inputs=arrays), verbose=True)

    with tempfile.TemporaryFile() as captured:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(captured.fileno(), 1)  # MLX prints from C++, below Python's sys.stdout
        try:
            mx.export_function(lambda *_: None, traced, *launch.inputs)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode()
    found = re.search(r"```\n(.*?)```", text, re.S)
    if found is None:
        raise RuntimeError(f"MLX printed no kernel source for {spec.name}: {text[:200]!r}")
    return found.group(1)


# ---------------------------------------------------------------------------------------------
# Launches of each kernel


def affine_rtn_launch(w, bits: int, group_size: int, dtype: str, threadgroup: int = 256) -> Launch:
    """The launch that quantizes weights `w` (an mx array (rows, cols), already in the storage
    dtype `dtype`) with round-to-nearest at `bits` and `group_size`."""
    import mlx.core as mx

    n = int(np.prod(w.shape))
    groups = n // group_size
    from .schemes import storage_dtype

    storage_dtype(dtype)  # a clear error for a dtype that is not one of ours
    t = getattr(mx, dtype)
    return Launch(
        inputs=(mx.reshape(w.astype(t), (n,)), mx.array(groups, dtype=mx.uint32)),
        output_shapes=((n * bits // 32,), (groups,), (groups,)),
        output_dtypes=(mx.uint32, t, t),
        grid=(groups, 1, 1),
        threadgroup=(min(threadgroup, groups), 1, 1),
        template=(("T", t), ("GROUP", group_size), ("BITS", bits)),
    )


def ggml_legacy_launch(x, type_name: str, threadgroup: int = 256) -> Launch:
    """The launch that quantizes float32 rows `x` (an mx array whose size is a multiple of 32)
    into llama.cpp's `type_name` blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)."""
    import mlx.core as mx

    n = int(np.prod(x.shape))
    blocks = n // 32
    type_id, size = LEGACY_TYPES[type_name]
    return Launch(
        inputs=(mx.reshape(x.astype(mx.float32), (n,)), mx.array(blocks, dtype=mx.uint32)),
        output_shapes=((blocks * size,),),
        output_dtypes=(mx.uint8,),
        grid=(blocks, 1, 1),
        threadgroup=(min(threadgroup, blocks), 1, 1),
        template=(("TYPE", type_id),),
    )


def affine_dequant_launch(codes, scales, biases, bits: int, group_size: int,
                          threadgroup: int = 256) -> Launch:  # fmt: skip
    """The launch that dequantizes MLX codes (uint32 stream), scales and biases (mx arrays of
    one dtype) to float32 weights."""
    import mlx.core as mx

    groups = int(np.prod(scales.shape))
    return Launch(
        inputs=(
            mx.reshape(codes, (-1,)),
            mx.reshape(scales, (-1,)),
            mx.reshape(biases, (-1,)),
            mx.array(groups, dtype=mx.uint32),
        ),  # fmt: skip
        output_shapes=((groups * group_size,),),
        output_dtypes=(mx.float32,),
        grid=(groups, 1, 1),
        threadgroup=(min(threadgroup, groups), 1, 1),
        template=(("T", scales.dtype), ("GROUP", group_size), ("BITS", bits)),
    )


def ggml_legacy_dequant_launch(blocks, type_name: str, threadgroup: int = 256) -> Launch:
    """The launch that turns llama.cpp `type_name` block bytes (an mx uint8 array) into float32."""
    import mlx.core as mx

    type_id, size = LEGACY_TYPES[type_name]
    n_blocks = int(np.prod(blocks.shape)) // size
    return Launch(
        inputs=(mx.reshape(blocks, (-1,)), mx.array(n_blocks, dtype=mx.uint32)),
        output_shapes=((n_blocks * 32,),),
        output_dtypes=(mx.float32,),
        grid=(n_blocks, 1, 1),
        threadgroup=(min(threadgroup, n_blocks), 1, 1),
        template=(("TYPE", type_id),),
    )


def affine_search_launch(w, bits: int, group_size: int, dtype: str, method: str,
                         threadgroup: int = 256) -> Launch:  # fmt: skip
    """`affine_rtn_launch` for the squared-error searches, `method` "mse" or "mse-zero"."""
    rtn = affine_rtn_launch(w, bits, group_size, dtype, threadgroup)
    return replace(rtn, template=rtn.template + (("ZERO", _SEARCH_ZERO[method]),))


def affine_launch(w, bits: int, group_size: int, dtype: str, method: str) -> tuple:
    """(kernel, launch) quantizing `w` with `method`."""
    if method == "rtn":
        return AFFINE_RTN, affine_rtn_launch(w, bits, group_size, dtype)
    return AFFINE_SEARCH, affine_search_launch(w, bits, group_size, dtype, method)


def affine_rtn_coalesced_launch(w, bits: int, group_size: int, dtype: str) -> Launch:
    """`affine_rtn_launch` for the coalesced variant: a threadgroup of 32 per group."""
    rtn = affine_rtn_launch(w, bits, group_size, dtype)
    return replace(rtn, inputs=rtn.inputs[:1], grid=(rtn.grid[0] * 32, 1, 1),
                               threadgroup=(32, 1, 1))  # fmt: skip
