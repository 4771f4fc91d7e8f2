"""Build the optional native quantization kernel (mlxedge/quant/_affine.c).

Everything else is declared in pyproject.toml. The extension is optional: where no C compiler is
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
        )
    ]
)
