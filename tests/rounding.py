"""Comparing dequantized weights from two implementations of `w = s * q + b`.

numpy rounds the product and then the sum; MLX's kernels may fuse the two into one multiply-add
(Metal contracts by default, as does Apple's clang), which rounds once. The two results are then
equal or one rounding step of float32 apart, never more. On Linux both round twice and agree bit
for bit; the bound below is what the arithmetic allows on any machine, not a widened tolerance.
"""

from __future__ import annotations

import numpy as np

# |fl(fl(s q) + b) - fl(s q + b)| <= u (|s q| + 2 |w|) with u = 2^-24, and |s q| <= |w| + |b|.
_U = 2.0**-24


def assert_same_multiply_add(ours: np.ndarray, theirs: np.ndarray, bias: np.ndarray) -> None:
    """`ours` and `theirs` (float32) compute s * q + b with the same s, q and b (`bias`, broadcast
    to the weights' shape): equal, or apart by at most the rounding a fused multiply-add saves."""
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape
    bound = _U * (3 * np.abs(theirs.astype(np.float64)) + np.abs(bias.astype(np.float64)))
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    assert (diff <= bound).all(), f"largest difference {diff.max():.3g} beyond one rounding"
