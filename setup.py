"""Build the optional native kernels (mlxedge/quant/_affine.c, mlxedge/quant/_ggml_quants.c).

Everything else is declared in pyproject.toml. The extensions are optional: where no C compiler is
available the install still succeeds and mlxedge falls back to MLX ops and numpy (slower, same
bytes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mlxedge.quant._affine",
            sources=["mlxedge/quant/_affine.c"],
            # Bit-identical results with the numpy specification need IEEE float32 arithmetic
            # exactly as written: no contraction into fused multiply-adds, no fast-math.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"],
            optional=True,
        ),
        # ggml block quantizers (GGUF export), byte-identical with quant/ggml.py.
        Extension(
            "mlxedge.quant._ggml_quants",
            sources=["mlxedge/quant/_ggml_quants.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"],
            optional=True,
        ),
    ]
)
