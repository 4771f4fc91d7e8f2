"""ggml's block formats in numpy: quantize and dequantize rows into the bytes a GGUF file stores.

A registry of block types, each a vectorized numpy `quantize(x) -> bytes-as-uint8 (n_blocks, size)`
and `dequantize(blocks) -> float32`. These are the specification the GGUF writer uses; tests hold
the legacy types to gguf-py's quantizer byte for byte and every type to gguf-py's dequantizer.
K-quants (super-blocks of 256, Q2_K..Q6_K) are written with llama.cpp's reference algorithms,
byte-identical with its own quantizer (tests/test_kquants_llamacpp.py).

Legacy 32-weight blocks (scales in float16, computed and applied in float32 as llama.cpp does):
- Q4_0: d, 16 bytes of nibbles; w = d * (q - 8), d = (signed max) / -8.
- Q4_1: d, m, nibbles; w = d * q + m.
- Q5_0: d, 4 bytes of high bits, nibbles; w = d * (q - 16), d = (signed max) / -16.
- Q5_1: d, m, high bits, nibbles; w = d * q + m.
- Q8_0: d, 32 int8; w = d * q, d = max|w| / 127, rounding half away from zero.
Element j (< 16) of a block is the low nibble of byte j, element j + 16 the high nibble; the fifth
bit of element e is bit e of the little-endian 32-bit word `qh`.

`quantize_rows` runs the native kernel (`_ggml_quants.c`, built at install time where a C compiler
exists) when it is available: the same bytes as the numpy functions here, which stay the
specification (tests/test_native_ggml.py holds the two together), about ten times faster, over row
chunks on `threads.thread_count()` threads. MLXEDGE_NATIVE=0 switches it off, as it does for the
quantization backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlxedge.threads import parallel_map, thread_count

try:  # optional: the install builds it where a C compiler exists
    from mlxedge.quant import _ggml_quants
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _ggml_quants = None

NATIVE_ENV = "MLXEDGE_NATIVE"  # the same switch as mlxedge.quant.backend
_NATIVE_MIN_SPLIT = 1 << 18  # weights: below this one call is faster than a thread hand-off

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """One ggml block type."""

    name: str
    type_id: int  # GGMLQuantizationType value
    block_size: int  # weights per block
    type_size: int  # bytes per block
    quantize: Callable[[np.ndarray], np.ndarray]  # (n, block_size) float32 -> (n, type_size) u8
    dequantize: Callable[[np.ndarray], np.ndarray]  # (n, type_size) u8 -> (n, block_size) f32


def _f16(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> (n, 2) bytes of its float16."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _read_f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes < 16 -> (n, 16) bytes: element j low, element j + 16 high."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _unnibble(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> (n, 4) bytes whose bit e is bit 4 of element e."""
    return np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")


def _unhigh(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little")[:, :BLOCK] << 4


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The element of largest magnitude, with its sign (the first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _symmetric_codes(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: d = (signed max) / -half, codes trunc(x / d + half + 0.5) capped at 2*half - 1."""
    d = _signed_max(x) / np.float32(-half)
    q = (x * _inverse(d)[:, None] + np.float32(half + 0.5)).astype(np.int8)
    return np.minimum(q, 2 * half - 1).astype(np.uint8), d


def _min_max_codes(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: d = (max - min) / levels, codes trunc((x - min) / d + 0.5) capped at levels."""
    # the first element holding the minimum / maximum (llama.cpp's strict scan): the sign of a
    # zero extreme reaches the bytes, and x.min()'s choice between -0 and +0 is not specified
    lo = np.take_along_axis(x, x.argmin(axis=1)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(x, x.argmax(axis=1)[:, None], axis=1)[:, 0]
    d = (hi - lo) / np.float32(levels)
    q = (x - lo[:, None]) * _inverse(d)[:, None] + np.float32(0.5)
    return np.minimum(q.astype(np.int8).astype(np.uint8), levels), d, lo


def _q4_0(x: np.ndarray) -> np.ndarray:
    q, d = _symmetric_codes(x, 8)
    return np.concatenate([_f16(d), _nibbles(q)], axis=1)


def _dq4_0(b: np.ndarray) -> np.ndarray:
    return _read_f16(b, 0)[:, None] * (_unnibble(b[:, 2:]).astype(np.float32) - 8)


def pack_q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_1 blocks from codes (n, 32) < 16 and float d, m (n,): w = d * q + m."""
    return np.concatenate([_f16(d), _f16(m), _nibbles(q.astype(np.uint8))], axis=1)


def _q4_1(x: np.ndarray) -> np.ndarray:
    return pack_q4_1(*_min_max_codes(x, 15))


def _dq4_1(b: np.ndarray) -> np.ndarray:
    q = _unnibble(b[:, 4:]).astype(np.float32)
    return _read_f16(b, 0)[:, None] * q + _read_f16(b, 2)[:, None]


def _q5_0(x: np.ndarray) -> np.ndarray:
    q, d = _symmetric_codes(x, 16)
    return np.concatenate([_f16(d), _high_bits(q), _nibbles(q & 0x0F)], axis=1)


def _dq5_0(b: np.ndarray) -> np.ndarray:
    q = (_unnibble(b[:, 6:]) | _unhigh(b[:, 2:6])).astype(np.float32)
    return _read_f16(b, 0)[:, None] * (q - 16)


def pack_q5_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q5_1 blocks from codes (n, 32) < 32 and float d, m (n,): w = d * q + m."""
    q = q.astype(np.uint8)
    return np.concatenate([_f16(d), _f16(m), _high_bits(q), _nibbles(q & 0x0F)], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    return pack_q5_1(*_min_max_codes(x, 31))


def _dq5_1(b: np.ndarray) -> np.ndarray:
    q = (_unnibble(b[:, 8:]) | _unhigh(b[:, 4:8])).astype(np.float32)
    return _read_f16(b, 0)[:, None] * q + _read_f16(b, 2)[:, None]


def _round_half_away(a: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.rint rounds them to even). Written as
    floor(|a|) + floor(2 * frac(|a|)): floor(|a| + 0.5) would round 0.49999997 up in float32."""
    mag = np.abs(a)
    whole = np.floor(mag)
    return np.sign(a) * (whole + np.floor(np.float32(2) * (mag - whole)))


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1) / np.float32(127)
    q = _round_half_away(x * _inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([_f16(d), q.view(np.uint8)], axis=1)


def _dq8_0(b: np.ndarray) -> np.ndarray:
    return _read_f16(b, 0)[:, None] * b[:, 2:].copy().view(np.int8).astype(np.float32)


# --- K-quants: super-blocks of 256 weights ----------------------------------------------------
#
# Each layout is described by where every element's bits live: for element e (0..255), the byte
# holding its low bits and their shift, and for 5/6-bit codes the byte and shift of its high bits.
# Dequantization gathers those bits for all elements at once. Scales: float16 d (and dmin), times
# per-sub-block integer scales (and mins); w = (d * sc) * q - (dmin * m), in float32.

QK_K = 256
_E = np.arange(QK_K)
_H, _R = _E // 128, _E % 128  # 128-element halves; position inside one
_G, _L = _R // 32, _R % 32  # 32-element quarter of a half; position inside it


def _bits(blocks: np.ndarray, byte: np.ndarray, shift: np.ndarray, mask: int) -> np.ndarray:
    """(n, 256) integers: (blocks[:, byte[e]] >> shift[e]) & mask for every element e."""
    return (blocks[:, byte] >> shift.astype(np.uint8)) & np.uint8(mask)


def _k4_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: eight 6-bit scales and mins from the 12 packed bytes (n, 12) -> (n, 8) each."""
    lo, mid, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _dq2_k(b: np.ndarray) -> np.ndarray:
    q = _bits(b, 16 + 32 * _H + _L, 2 * _G, 3).astype(np.float32)
    sub = b[:, 0:16][:, _E // 16]
    d, dmin = _read_f16(b, 80)[:, None], _read_f16(b, 82)[:, None]
    return (d * (sub & 15).astype(np.float32)) * q - dmin * (sub >> 4).astype(np.float32)


def _dq3_k(b: np.ndarray) -> np.ndarray:
    low = _bits(b, 32 + 32 * _H + _L, 2 * _G, 3).astype(np.int16)
    high = _bits(b, _E % 32, _E // 32, 1).astype(np.int16)
    q = (low - 4 * (1 - high)).astype(np.float32)  # a set high bit means "no -4"
    s = np.arange(16)
    low4 = np.where(s < 8, b[:, 96 + s % 8] & 15, b[:, 96 + s % 8] >> 4)
    high2 = (b[:, 104 + s % 4] >> (2 * (s // 4)).astype(np.uint8)) & 3
    sc = ((low4 | (high2 << 4)).astype(np.int16) - 32).astype(np.float32)[:, _E // 16]
    return (_read_f16(b, 108)[:, None] * sc) * q


def _dq4_k(b: np.ndarray) -> np.ndarray:
    c, r = _E // 64, _E % 64
    q = _bits(b, 16 + 32 * c + r % 32, 4 * (r // 32), 15).astype(np.float32)
    sc, mn = _k4_scale_min(b[:, 4:16])
    d, dmin = _read_f16(b, 0)[:, None], _read_f16(b, 2)[:, None]
    return (d * sc[:, _E // 32]) * q - dmin * mn[:, _E // 32]


def _dq5_k(b: np.ndarray) -> np.ndarray:
    c, r = _E // 64, _E % 64
    low = _bits(b, 48 + 32 * c + r % 32, 4 * (r // 32), 15)
    high = _bits(b, 16 + _E % 32, _E // 32, 1)
    q = (low | (high << 4)).astype(np.float32)
    sc, mn = _k4_scale_min(b[:, 4:16])
    d, dmin = _read_f16(b, 0)[:, None], _read_f16(b, 2)[:, None]
    return (d * sc[:, _E // 32]) * q - dmin * mn[:, _E // 32]


def _dq6_k(b: np.ndarray) -> np.ndarray:
    low = _bits(b, 64 * _H + 32 * (_G % 2) + _L, 4 * (_G // 2), 15)
    high = _bits(b, 128 + 32 * _H + _L, 2 * _G, 3)
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.float32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)[:, _E // 16]
    return (_read_f16(b, 208)[:, None] * sc) * q


# --- K-quant writers: llama.cpp's reference algorithms (quantize_row_qX_K_ref), in numpy ---------
#
# Written to give llama.cpp's bytes: float32 throughout, no fused multiply-adds, sums taken in index
# order (a loop over the elements of a sub-block, vectorized across sub-blocks, never np.sum), and
# round-half-to-even (llama.cpp's nearest_int) as np.rint.

GROUP_MAX_EPS = np.float32(1e-15)
_F = np.float32


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the element of largest magnitude (first on ties, as a strict '>' scan) and |it|."""
    i = np.abs(x).argmax(axis=1)
    mx = np.take_along_axis(x, i[:, None], axis=1)[:, 0]
    return mx, np.abs(mx)


def _qx_sums(x: np.ndarray, iscale: np.ndarray, nmax: int):
    """Codes l = clamp(rint(iscale * x), -nmax, nmax - 1) and the weighted sums (weights x²)."""
    sumlx = np.zeros(len(x), _F)
    suml2 = np.zeros(len(x), _F)
    ls = np.empty(x.shape, _F)
    for i in range(x.shape[1]):
        xi = x[:, i]
        li = np.clip(np.rint(iscale * xi), -nmax, nmax - 1).astype(_F)
        ls[:, i] = li
        w = xi * xi
        sumlx += (w * xi) * li
        suml2 += (w * li) * li
    return ls, sumlx, suml2


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes in [0, 2*nmax) and scale per row of x (n, 16), weights x²
    (llama.cpp's make_qx_quants with rmse_type 1 and no importance)."""
    mx, amax = _signed_absmax(x)
    tiny = amax < GROUP_MAX_EPS
    safe_max = np.where(tiny, _F(1), mx)
    iscale = -_F(nmax) / safe_max
    ls, sumlx, suml2 = _qx_sums(x, iscale, nmax)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F(1)), _F(0)).astype(_F)
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        iscale = -(_F(nmax) + _F(0.1) * _F(step)) / safe_max
        cand, sumlx, suml2 = _qx_sums(x, iscale, nmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        ls = np.where(better[:, None], cand, ls)
        new_scale = sumlx / np.where(suml2 > 0, suml2, _F(1))
        scale = np.where(better, new_scale, scale).astype(_F)
        best = np.where(better, scale * sumlx, best).astype(_F)
    codes = (ls + nmax).astype(np.int16)
    codes[tiny] = 0
    scale[tiny] = 0
    return codes, scale


def _pack_bit_plane(bits: np.ndarray) -> np.ndarray:
    """(n, 256) single bits -> (n, 32): element e at bit e // 32 of byte e % 32 (Q3_K's hmask,
    Q5_K's qh; the inverse of `_bits(b, at + _E % 32, _E // 32, 1)`)."""
    planes = bits.reshape(len(bits), 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    return planes.sum(axis=1, dtype=np.uint8)


def _pack_crumbs(c: np.ndarray) -> np.ndarray:
    """(n, 256) 2-bit values -> (n, 64): element 128h + 32g + l at bits 2g of byte 32h + l
    (Q2_K/Q3_K's qs, Q6_K's qh; the inverse of `_bits(b, at + 32 * _H + _L, 2 * _G, 3)`)."""
    quarters = (
        c.reshape(len(c), 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    )
    return quarters.sum(axis=2, dtype=np.uint8).reshape(len(c), 64)


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric codes in [0, nmax], scale and (positive) min per row of x, weighted by w
    (llama.cpp's make_qkx2_quants): x ≈ scale * L - min."""
    n = x.shape[1]
    lo, hi = x[:, 0].copy(), x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        lo = np.where(x[:, i] < lo, x[:, i], lo)
        hi = np.where(x[:, i] > hi, x[:, i], hi)
        sum_w += w[:, i]
        sum_x += w[:, i] * x[:, i]
    lo = np.where(lo > 0, _F(0), lo)
    flat = hi == lo
    span = np.where(flat, _F(1), hi - lo)

    def codes(iscale, mn):
        return np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(_F)

    def error(scale, mn, q):
        err = np.zeros(len(x), _F)
        for i in range(n):
            diff = (scale * q[:, i] + mn) - x[:, i]
            err += w[:, i] * (np.abs(diff) if mad else diff * diff)
        return err

    iscale = _F(nmax) / span
    scale = _F(1) / iscale
    q = codes(iscale, lo)
    best = error(scale, lo, q)
    mn = lo
    for step in range(nstep + 1):
        # llama.cpp moves `min` to each accepted candidate's, so later candidates start from it
        span = np.where(flat, _F(1), hi - mn)
        iscale = ((_F(rmin) + _F(rdelta) * _F(step)) + _F(nmax)) / span
        qa = codes(iscale, mn)
        sum_l = np.zeros(len(x), _F)
        sum_l2 = np.zeros(len(x), _F)
        sum_xl = np.zeros(len(x), _F)
        for i in range(n):
            wl = w[:, i] * qa[:, i]
            sum_l += wl
            sum_l2 += wl * qa[:, i]
            sum_xl += wl * x[:, i]
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, _F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        clip = this_min > 0
        this_min = np.where(clip, _F(0), this_min)
        this_scale = np.where(clip, sum_xl / np.where(sum_l2 != 0, sum_l2, _F(1)), this_scale)
        cur = error(this_scale.astype(_F), this_min.astype(_F), qa)
        better = ok & (cur < best)
        q = np.where(better[:, None], qa, q)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale).astype(_F)
        mn = np.where(better, this_min, mn).astype(_F)
    q[flat] = 0
    scale = np.where(flat, _F(0), scale).astype(_F)
    return q.astype(np.int16), scale, (-mn).astype(_F)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (n, 8) into Q4_K/Q5_K's 12 bytes (inverse of _k4_scale_min)."""
    out = np.zeros((len(ls), 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return out


def _requantize(
    x: np.ndarray,
    first: np.ndarray,
    dj: np.ndarray,
    size: int,
    lo: int,
    hi: int,
    dmj: np.ndarray | None = None,
) -> np.ndarray:
    """llama.cpp's second pass over a super-block: codes in [0, hi - lo] from each sub-block's
    stored (float16-rounded) scale dj (and min dmj), `size` weights per sub-block,
    clip(rint((x + dmj) / dj), lo, hi) - lo. A sub-block whose scale is zero is skipped there, so
    it keeps the first pass's codes `first`."""
    dj_e = np.repeat(dj, size, axis=1)
    num = x if dmj is None else x + np.repeat(dmj, size, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint(num / dj_e), lo, hi) - lo
    return np.where(dj_e != 0, requant, first).astype(np.uint8)


def _k_scales_mins(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The shared first half of Q4_K and Q5_K: sub-block fits, 6-bit scales/mins, d and dmin,
    then codes recomputed from the stored (float16-rounded) values."""
    n = len(x)
    sub = x.reshape(n * 8, 32)
    sum_x2 = np.zeros(len(sub), _F)
    for i in range(32):
        sum_x2 += sub[:, i] * sub[:, i]
    av_x = np.sqrt(sum_x2 / _F(32))
    weights = av_x[:, None] + np.abs(sub)
    codes, scales, mins = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    codes, scales, mins = codes.reshape(n, 256), scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    inv_scale = np.where(max_scale > 0, _F(63) / np.where(max_scale > 0, max_scale, 1), _F(0))
    inv_min = np.where(max_min > 0, _F(63) / np.where(max_min > 0, max_min, 1), _F(0))
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins)).astype(np.uint8)
    d16 = (max_scale / _F(63)).astype(np.float16)
    dmin16 = (max_min / _F(63)).astype(np.float16)
    dj = d16.astype(_F)[:, None] * ls.astype(_F)
    dmj = dmin16.astype(_F)[:, None] * lm.astype(_F)
    codes = _requantize(x, codes, dj, 32, 0, nmax, dmj)
    head = np.concatenate(
        [d16.reshape(-1, 1).view(np.uint8), dmin16.reshape(-1, 1).view(np.uint8),
         _pack_k4_scales(ls, lm)], axis=1,
    )  # fmt: skip
    return head, codes


def _k_nibbles(codes: np.ndarray) -> np.ndarray:
    """(n, 256) codes < 16 -> (n, 128): element 64c + l low nibble, 64c + 32 + l high nibble."""
    c = codes.reshape(len(codes), 4, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(len(codes), 128)


def _q4_k(x: np.ndarray) -> np.ndarray:
    head, codes = _k_scales_mins(x, 15, -1.0, 20)
    return np.concatenate([head, _k_nibbles(codes)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    head, codes = _k_scales_mins(x, 31, -0.5, 15)
    return np.concatenate([head, _pack_bit_plane(codes >> 4), _k_nibbles(codes & 15)], axis=1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = x.reshape(n * 16, 16)
    codes, scales, mins = _make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    codes, scales, mins = codes.reshape(n, 256), scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    has_s, has_m = max_scale > 0, max_min > 0
    inv_s = np.where(has_s, _F(15) / np.where(has_s, max_scale, 1), _F(0))
    inv_m = np.where(has_m, _F(15) / np.where(has_m, max_min, 1), _F(0))
    ls = np.where(has_s[:, None], np.rint(inv_s[:, None] * scales), 0).astype(np.int64)
    lm = np.where(has_m[:, None], np.rint(inv_m[:, None] * mins), 0).astype(np.int64)
    packed = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)  # stored as a byte, as llama.cpp does
    d16 = np.where(has_s, max_scale / _F(15), _F(0)).astype(np.float16)
    dmin16 = np.where(has_m, max_min / _F(15), _F(0)).astype(np.float16)
    dj = d16.astype(_F)[:, None] * (packed & 15).astype(_F)
    dmj = dmin16.astype(_F)[:, None] * (packed >> 4).astype(_F)
    codes = _requantize(x, codes, dj, 16, 0, 3, dmj)
    return np.concatenate(
        [packed, _pack_crumbs(codes), d16.reshape(-1, 1).view(np.uint8),
         dmin16.reshape(-1, 1).view(np.uint8)], axis=1,
    )  # fmt: skip


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes in [0, 2*nmax) and scale per row of x (n, 16), refined by llama.cpp's
    coordinate descent (make_q3_quants with do_rmse): up to five sweeps, a row stops after a sweep
    that changes nothing."""
    mx, amax = _signed_absmax(x)
    tiny = amax < GROUP_MAX_EPS
    iscale = _F(-nmax) / np.where(tiny, _F(1), mx)
    L = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(_F)
    w = x * x
    sumlx = np.zeros(len(x), _F)
    suml2 = np.zeros(len(x), _F)
    for i in range(x.shape[1]):
        sumlx += (w[:, i] * x[:, i]) * L[:, i]
        suml2 += (w[:, i] * L[:, i]) * L[:, i]
    active = ~tiny
    for _ in range(5):
        changed = np.zeros(len(x), bool)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - (wi * xi) * li
            sl2 = suml2 - (wi * li) * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(np.rint((xi * sl2) / slx), -nmax, nmax - 1).astype(_F)
            try_it = active & (slx > 0) & (new != li)
            slx = slx + (wi * xi) * new
            sl2 = sl2 + (wi * new) * new
            take = try_it & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[:, i] = np.where(take, new, li)
            sumlx = np.where(take, slx, sumlx).astype(_F)
            suml2 = np.where(take, sl2, suml2).astype(_F)
            changed |= take
        active &= changed
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F(1)), _F(0)).astype(_F)
    codes = (L + nmax).astype(np.int16)
    codes[tiny] = 0
    scale[tiny] = 0
    return codes, scale


def _q3_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    codes, scales = _make_q3_quants(x.reshape(n * 16, 16), 4)
    codes, scales = codes.reshape(n, 256), scales.reshape(n, 16)
    max_scale, _ = _signed_absmax(scales)
    has = max_scale != 0
    iscale = _F(-32) / np.where(has, max_scale, _F(1))
    l6 = np.where(has[:, None], np.clip(np.rint(iscale[:, None] * scales), -32, 31) + 32, 0)
    l6 = l6.astype(np.uint8)
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:8] = (l6[:, 0:8] & 15) | ((l6[:, 8:16] & 15) << 4)
    high = (l6 >> 4) << (2 * (np.arange(16) // 4)).astype(np.uint8)  # scale j -> byte 8 + j % 4
    packed[:, 8:12] = high.reshape(n, 4, 4).sum(axis=1, dtype=np.uint8)
    d16 = np.where(has, _F(1) / iscale, _F(0)).astype(np.float16)
    sc = np.where(has[:, None], l6.astype(np.int16) - 32, 0)
    codes = _requantize(x, codes, d16.astype(_F)[:, None] * sc.astype(_F), 16, -4, 3)
    hb = (codes > 3).astype(np.uint8)
    low = codes - 4 * hb
    return np.concatenate(
        [_pack_bit_plane(hb), _pack_crumbs(low), packed, d16.reshape(-1, 1).view(np.uint8)], axis=1
    )


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = x.reshape(n * 16, 16)
    codes, scales = _make_qx_quants(sub, 32)
    codes, scales = codes.reshape(n, 256), scales.reshape(n, 16)
    max_scale, max_abs = _signed_absmax(scales)
    empty = max_abs < GROUP_MAX_EPS  # such a block is written as zeros
    iscale = _F(-128) / np.where(empty, _F(1), max_scale)
    d16 = (_F(1) / iscale).astype(np.float16)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    codes = _requantize(x, codes, d16.astype(_F)[:, None] * sc.astype(_F), 16, -32, 31)
    # pack: element 128h + 32g + l -> low nibble of ql[64h + 32(g%2) + l] (high nibble if g >= 2),
    # high two bits at bits 2g of qh[32h + l]
    c = codes.reshape(n, 2, 4, 32)  # (block, half, quarter, l)
    ql = np.concatenate(
        [
            (c[:, :, 0] & 15) | ((c[:, :, 2] & 15) << 4),
            (c[:, :, 1] & 15) | ((c[:, :, 3] & 15) << 4),
        ],
        axis=2,
    ).reshape(n, 128)
    qh = _pack_crumbs(codes >> 4)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.reshape(-1, 1).view(np.uint8)], axis=1)
    out[empty] = 0
    return out.astype(np.uint8)


TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q4_0", 2, BLOCK, 18, _q4_0, _dq4_0),
        BlockType("Q4_1", 3, BLOCK, 20, _q4_1, _dq4_1),
        BlockType("Q5_0", 6, BLOCK, 22, _q5_0, _dq5_0),
        BlockType("Q5_1", 7, BLOCK, 24, _q5_1, _dq5_1),
        BlockType("Q8_0", 8, BLOCK, 34, _q8_0, _dq8_0),
        BlockType("Q2_K", 10, QK_K, 84, _q2_k, _dq2_k),
        BlockType("Q3_K", 11, QK_K, 110, _q3_k, _dq3_k),
        BlockType("Q4_K", 12, QK_K, 144, _q4_k, _dq4_k),
        BlockType("Q5_K", 13, QK_K, 176, _q5_k, _dq5_k),
        BlockType("Q6_K", 14, QK_K, 210, _q6_k, _dq6_k),
    )
}


def native_available() -> bool:
    """Whether `quantize_rows` uses the native kernel (built, and not switched off)."""
    return _ggml_quants is not None and os.environ.get(NATIVE_ENV, "1") != "0"


def _native_rows(x: np.ndarray, t: BlockType) -> np.ndarray:
    """The native kernel over row chunks on `thread_count()` threads (it releases the GIL). Every
    block is quantized on its own, so the chunking never changes a byte."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.empty((rows, cols // t.block_size * t.type_size), dtype=np.uint8)

    def run(span: tuple[int, int]) -> None:
        lo, hi = span
        _ggml_quants.quantize(t.type_id, x[lo:hi], hi - lo, cols, out[lo:hi])

    if rows < 2 or x.size < _NATIVE_MIN_SPLIT:
        run((0, rows))
        return out
    threads = thread_count()
    if threads == 1:
        run((0, rows))
        return out
    n_chunks = min(rows, 4 * threads)  # a few per thread, so an uneven load evens out
    bounds = np.linspace(0, rows, n_chunks + 1).astype(int)
    parallel_map(run, zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    return out


def quantize_rows(x: np.ndarray, type_name: str, native: bool = True) -> np.ndarray:
    """A 2-D float tensor (rows, cols) as the bytes a GGUF stores: uint8 (rows, cols/bs*size);
    `native=False` runs the numpy specification even where the native kernel is built."""
    t = TYPES[type_name]
    rows, cols = x.shape
    if cols % t.block_size:
        raise ValueError(f"{type_name} needs rows in multiples of {t.block_size}, not {cols}")
    if native and native_available():
        return _native_rows(x, t)
    blocks = t.quantize(np.asarray(x, dtype=np.float32).reshape(-1, t.block_size))
    return blocks.reshape(rows, cols // t.block_size * t.type_size)


def dequantize_rows(data: np.ndarray, type_name: str, cols: int) -> np.ndarray:
    """The inverse of `quantize_rows`: float32 (rows, cols)."""
    t = TYPES[type_name]
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, t.type_size)
    return t.dequantize(blocks).reshape(-1, cols)
