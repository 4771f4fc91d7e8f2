"""The Core ML package: an ML program built from our own quantized weights (in progress).

`blockwise.py` carries MLX's grouped affine codes into Core ML's block-wise constants
(`constexpr_blockwise_shift_scale`) without re-quantizing them.
"""
