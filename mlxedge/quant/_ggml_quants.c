/*
 * Native ggml block quantizers: the same functions as mlxedge/formats/ggml_blocks.py (the
 * specification, itself byte-identical with llama.cpp's quantize_row_*_ref), written in C because
 * the numpy version walks every sub-block element by element in Python loops.
 *
 * Bytes are identical with the numpy specification because both sides do the same float32
 * operations in the same order:
 *   - no fused multiply-add and no reassociation (built with -ffp-contract=off, no fast-math);
 *   - every sum over a sub-block runs sequentially in element order; the numpy code vectorizes
 *     across sub-blocks and so does this file: a SIMD lane is one sub-block (eight sub-blocks per
 *     v8f, two v8f per pass), never a partial sum inside one;
 *   - per-lane decisions (accept a candidate, clip a min, skip an empty sub-block) are selects,
 *     exactly like the specification's np.where, so NaN produced by a degenerate candidate
 *     propagates and is rejected the same way;
 *   - rounding is round-half-to-even (rint / np.rint), clamping after it (np.clip keeps NaN);
 *   - float -> float16 is round-to-nearest-even (numpy's astype(np.float16));
 *   - float -> uint8 goes through int32 and keeps the low byte, as numpy's cast does on the
 *     values that can reach it.
 * Inputs are expected finite; a NaN or Inf weight gives bytes numpy itself leaves to the platform.
 *
 * Every block is quantized on its own, so callers may split rows over threads (the GIL is
 * released) without changing a byte.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Vector helpers are always inlined, so the vector-argument ABI note does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#define INLINE static inline __attribute__((always_inline))
#define QK 32
#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

enum {
    T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
};

/* ---- scalar helpers ------------------------------------------------------------------------ */

INLINE uint16_t to_f16(float x) { _Float16 h = (_Float16)x; uint16_t u; memcpy(&u, &h, 2); return u; }
INLINE float from_f16(uint16_t u) { _Float16 h; memcpy(&h, &u, 2); return (float)h; }
INLINE void put_f16(uint8_t *p, float x) { uint16_t u = to_f16(x); memcpy(p, &u, 2); }

/* numpy's float32 -> uint8 cast on values that fit an int32: the low byte. */
INLINE uint8_t low_byte(float x) { return (uint8_t)(uint32_t)(int32_t)x; }

/* ---- eight-lane float32 vectors (GCC/clang vector extensions) --------------------------------
 * One AVX2 register, two SSE or NEON registers. Arithmetic is lane-wise IEEE float32. */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#define LANES 8
#define G 2 /* v8f per pass: two independent chains hide the latency of the sequential sums */

/* An unaligned view for loads straight into registers (a memcpy into a stack array first costs
 * a store-forwarding stall). */
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));
INLINE v8f load8(const float *p) { return *(const v8f_u *)p; }

INLINE v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* np.where(m, a, b) for a comparison mask m (all ones or all zeros per lane). */
INLINE v8f sel(v8i m, v8f a, v8f b) { return (v8f)((m & (v8i)a) | (~m & (v8i)b)); }

INLINE v8f vabs(v8f a) { return (v8f)((v8i)a & 0x7FFFFFFF); }

/* np.clip(np.rint(a), lo, hi) for integer bounds of magnitude below 2^22: clamp first (the same
 * result, rint being monotonic), with selects that leave NaN as it is, then round to nearest
 * even by adding and removing 1.5 * 2^23. The only difference from rintf is the sign of a zero
 * code, which no sum, product or comparison downstream can see. */
INLINE v8f vcodes(v8f a, float lo, float hi) {
    const v8f magic = splat(12582912.0f);
    v8f r = sel(a < lo, splat(lo), a);
    r = sel(r > hi, splat(hi), r);
    return (r + magic) - magic;
}

INLINE float clampf_(float r, float lo, float hi) {
    r = r < lo ? lo : r;
    return r > hi ? hi : r;
}

/* Transposed load: X[i][g][l] = x[n * (8g + l) + i], sub-block 8g + l in lane l of vector g. */
INLINE void load_lanes(const float *x, int n, v8f X[][G]) {
    for (int i = 0; i < n; i++)
        for (int g = 0; g < G; g++)
            for (int l = 0; l < LANES; l++) X[i][g][l] = x[n * (LANES * g + l) + i];
}

/* Codes back to one byte per element in element order. */
INLINE void store_codes(const v8f Q[][G], int n, uint8_t *L) {
    for (int i = 0; i < n; i++)
        for (int g = 0; g < G; g++)
            for (int l = 0; l < LANES; l++) L[n * (LANES * g + l) + i] = low_byte(Q[i][g][l]);
}

/* ---- lane fitters: the specification's _make_qkx2_quants, _make_qx_quants, _make_q3_quants --- */

/* Weighted error of scale * q + mn against x: squared, or absolute when `mad`. */
INLINE v8f fit_error(const v8f X[][G], const v8f W[][G], const v8f Q[][G], int n, int g, v8f scale,
                     v8f mn, int mad) {
    v8f err = splat(0.0f);
    for (int i = 0; i < n; i++) {
        v8f diff = (scale * Q[i][g] + mn) - X[i][g];
        err += W[i][g] * (mad ? vabs(diff) : diff * diff);
    }
    return err;
}

/* Asymmetric fit x ~ scale * q - min, q in [0, nmax], weights W, with the candidate search
 * (llama.cpp's make_qkx2_quants). Q receives float codes; scale and the (positive) min per lane. */
INLINE void fit_qkx2(const v8f X[][G], const v8f W[][G], int n, int nmax, float rmin,
                     float rdelta, int nstep, int mad, v8f Q[][G], v8f scale_out[G],
                     v8f min_out[G]) {
    const float fmax_ = (float)nmax;
    v8f Qa[32][G];
    v8f lo[G], hi[G], sw[G], sx[G], mn[G], scale[G], best[G];
    v8i flat[G];
    for (int g = 0; g < G; g++) {
        lo[g] = hi[g] = X[0][g];
        sw[g] = W[0][g];
        sx[g] = sw[g] * X[0][g];
    }
    for (int i = 1; i < n; i++)
        for (int g = 0; g < G; g++) {
            v8f x = X[i][g];
            lo[g] = sel(x < lo[g], x, lo[g]);
            hi[g] = sel(x > hi[g], x, hi[g]);
            sw[g] += W[i][g];
            sx[g] += W[i][g] * x;
        }
    for (int g = 0; g < G; g++) {
        lo[g] = sel(lo[g] > 0.0f, splat(0.0f), lo[g]);
        flat[g] = hi[g] == lo[g];
        v8f span = sel(flat[g], splat(1.0f), hi[g] - lo[g]);
        v8f iscale = splat(fmax_) / span;
        scale[g] = splat(1.0f) / iscale;
        for (int i = 0; i < n; i++) Q[i][g] = vcodes(iscale * (X[i][g] - lo[g]), 0.0f, fmax_);
        best[g] = fit_error(X, W, Q, n, g, scale[g], lo[g], mad);
        mn[g] = lo[g];
    }
    for (int step = 0; step <= nstep; step++) {
        const float num = (rmin + rdelta * (float)step) + fmax_;
        v8f iscale[G], sl[G], sl2[G], sxl[G];
        for (int g = 0; g < G; g++) {
            iscale[g] = splat(num) / sel(flat[g], splat(1.0f), hi[g] - mn[g]);
            sl[g] = sl2[g] = sxl[g] = splat(0.0f);
        }
        for (int i = 0; i < n; i++)
            for (int g = 0; g < G; g++) {
                v8f q = vcodes(iscale[g] * (X[i][g] - mn[g]), 0.0f, fmax_);
                Qa[i][g] = q;
                v8f wl = W[i][g] * q;
                sl[g] += wl;
                sl2[g] += wl * q;
                sxl[g] += wl * X[i][g];
            }
        v8i better[G];
        v8f ts[G], tm[G];
        for (int g = 0; g < G; g++) {
            v8f det = sw[g] * sl2[g] - sl[g] * sl[g];
            v8i ok = det > 0.0f;
            v8f safe = sel(ok, det, splat(1.0f));
            ts[g] = (sw[g] * sxl[g] - sx[g] * sl[g]) / safe;
            tm[g] = (sl2[g] * sx[g] - sl[g] * sxl[g]) / safe;
            v8i clip = tm[g] > 0.0f;
            tm[g] = sel(clip, splat(0.0f), tm[g]);
            v8f only_scale = sxl[g] / sel(sl2[g] != 0.0f, sl2[g], splat(1.0f));
            ts[g] = sel(clip, only_scale, ts[g]);
            v8f cur = fit_error(X, W, Qa, n, g, ts[g], tm[g], mad);
            better[g] = ok & (cur < best[g]);
            best[g] = sel(better[g], cur, best[g]);
            scale[g] = sel(better[g], ts[g], scale[g]);
            mn[g] = sel(better[g], tm[g], mn[g]);
        }
        for (int i = 0; i < n; i++)
            for (int g = 0; g < G; g++) Q[i][g] = sel(better[g], Qa[i][g], Q[i][g]);
    }
    for (int g = 0; g < G; g++) {
        for (int i = 0; i < n; i++) Q[i][g] = sel(flat[g], splat(0.0f), Q[i][g]);
        scale_out[g] = sel(flat[g], splat(0.0f), scale[g]);
        min_out[g] = -mn[g];
    }
}

/* Per lane: the element of largest magnitude with its sign (first on ties) and its magnitude. */
INLINE void signed_absmax(const v8f X[][G], int n, int g, v8f *mx, v8f *amax) {
    v8f m = X[0][g], a = vabs(m);
    for (int i = 1; i < n; i++) {
        v8f ai = vabs(X[i][g]);
        v8i gt = ai > a;
        a = sel(gt, ai, a);
        m = sel(gt, X[i][g], m);
    }
    *mx = m;
    *amax = a;
}

/* Symmetric fit with weights x^2 and a scan of 18 nearby scales (make_qx_quants, rmse_type 1):
 * Q receives codes in [0, 2 nmax), scale per lane (0 and codes 0 for an all-but-zero lane). */
INLINE void fit_qx(const v8f X[][G], int n, int nmax, v8f Q[][G], v8f scale_out[G]) {
    const float lo = (float)-nmax, hi = (float)(nmax - 1);
    v8f W[16][G];
    for (int g = 0; g < G; g++) {
        v8f mx, amax;
        signed_absmax(X, n, g, &mx, &amax);
        v8i tiny = amax < GROUP_MAX_EPS;
        v8f safe_max = sel(tiny, splat(1.0f), mx);
        for (int i = 0; i < n; i++) W[i][g] = X[i][g] * X[i][g];
        v8f iscale = splat(-(float)nmax) / safe_max;
        v8f slx = splat(0.0f), sl2 = splat(0.0f);
        for (int i = 0; i < n; i++) {
            v8f l = vcodes(iscale * X[i][g], lo, hi);
            Q[i][g] = l;
            slx += (W[i][g] * X[i][g]) * l;
            sl2 += (W[i][g] * l) * l;
        }
        v8f scale = sel(sl2 != 0.0f, slx / sel(sl2 != 0.0f, sl2, splat(1.0f)), splat(0.0f));
        v8f best = scale * slx;
        for (int step = -9; step <= 9; step++) {
            if (step == 0) continue;
            iscale = splat(-((float)nmax + 0.1f * (float)step)) / safe_max;
            v8f cand[16];
            slx = sl2 = splat(0.0f);
            for (int i = 0; i < n; i++) {
                v8f l = vcodes(iscale * X[i][g], lo, hi);
                cand[i] = l;
                slx += (W[i][g] * X[i][g]) * l;
                sl2 += (W[i][g] * l) * l;
            }
            v8i pos = sl2 > 0.0f;
            v8i better = pos & (slx * slx > best * sl2);
            for (int i = 0; i < n; i++) Q[i][g] = sel(better, cand[i], Q[i][g]);
            scale = sel(better, slx / sel(pos, sl2, splat(1.0f)), scale);
            best = sel(better, scale * slx, best);
        }
        for (int i = 0; i < n; i++) Q[i][g] = sel(tiny, splat(0.0f), Q[i][g] + (float)nmax);
        scale_out[g] = sel(tiny, splat(0.0f), scale);
    }
}

/* Symmetric fit refined by coordinate descent (make_q3_quants with do_rmse): up to five sweeps,
 * a lane stops after a sweep that changes none of its codes. Codes in [0, 2 nmax). */
INLINE void fit_q3(const v8f X[][G], int n, int nmax, v8f Q[][G], v8f scale_out[G]) {
    const float lo = (float)-nmax, hi = (float)(nmax - 1);
    v8f W[16][G], sumlx[G], suml2[G];
    v8i tiny[G], active[G];
    for (int g = 0; g < G; g++) {
        v8f mx, amax;
        signed_absmax(X, n, g, &mx, &amax);
        tiny[g] = amax < GROUP_MAX_EPS;
        v8f iscale = splat(-(float)nmax) / sel(tiny[g], splat(1.0f), mx);
        sumlx[g] = suml2[g] = splat(0.0f);
        for (int i = 0; i < n; i++) {
            W[i][g] = X[i][g] * X[i][g];
            Q[i][g] = vcodes(iscale * X[i][g], lo, hi);
        }
        for (int i = 0; i < n; i++) {
            sumlx[g] += (W[i][g] * X[i][g]) * Q[i][g];
            suml2[g] += (W[i][g] * Q[i][g]) * Q[i][g];
        }
        active[g] = ~tiny[g];
    }
    for (int sweep = 0; sweep < 5; sweep++) {
        v8i changed[G];
        int any = 0;
        for (int g = 0; g < G; g++) {
            changed[g] = (v8i){0};
            for (int i = 0; i < n; i++) {
                v8f wx = W[i][g] * X[i][g], li = Q[i][g];
                v8f slx = sumlx[g] - wx * li;
                v8f sl2 = suml2[g] - (W[i][g] * li) * li;
                v8f nl = vcodes((X[i][g] * sl2) / slx, lo, hi);
                v8i try_it = active[g] & (slx > 0.0f) & (nl != li);
                slx = slx + wx * nl;
                sl2 = sl2 + (W[i][g] * nl) * nl;
                v8i take = try_it & (sl2 > 0.0f) &
                           ((slx * slx) * suml2[g] > (sumlx[g] * sumlx[g]) * sl2);
                Q[i][g] = sel(take, nl, li);
                sumlx[g] = sel(take, slx, sumlx[g]);
                suml2[g] = sel(take, sl2, suml2[g]);
                changed[g] |= take;
            }
            active[g] &= changed[g];
            for (int l = 0; l < LANES; l++) any |= active[g][l];
        }
        if (!any) break;
    }
    for (int g = 0; g < G; g++) {
        v8i pos = suml2[g] > 0.0f;
        v8f scale = sel(pos, sumlx[g] / sel(pos, suml2[g], splat(1.0f)), splat(0.0f));
        for (int i = 0; i < n; i++) Q[i][g] = sel(tiny[g], splat(0.0f), Q[i][g] + (float)nmax);
        scale_out[g] = sel(tiny[g], splat(0.0f), scale);
    }
}

/* Requantize one sub-block from its stored scale: clip(rint((x + dm) / d), lo, hi) - lo. */
INLINE void requant(const float *x, int n, float d, float dm, float lo, float hi,
                    uint8_t *L) {
    for (int k = 0; k < n; k += LANES) {
        v8f q = vcodes((load8(x + k) + dm) / d, lo, hi) - lo;
        for (int l = 0; l < LANES; l++) L[k + l] = low_byte(q[l]);
    }
}

/* ---- packing ------------------------------------------------------------------------------- */

/* Element 128h + 32g + l at bits 2g of byte 32h + l (2-bit values). */
INLINE void pack_crumbs(const uint8_t *c, uint8_t *out) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *p = c + 128 * h + l;
            out[32 * h + l] = (uint8_t)(p[0] | (p[32] << 2) | (p[64] << 4) | (p[96] << 6));
        }
}

/* Element e at bit e / 32 of byte e % 32 (single bits). */
INLINE void pack_bit_plane(const uint8_t *bits, uint8_t *out) {
    for (int l = 0; l < 32; l++) {
        uint8_t b = 0;
        for (int k = 0; k < 8; k++) b |= (uint8_t)(bits[32 * k + l] << k);
        out[l] = b;
    }
}

/* Element 64c + l in the low nibble of byte 32c + l, 64c + 32 + l in its high nibble. */
INLINE void pack_k_nibbles(const uint8_t *c, uint8_t *out) {
    for (int q = 0; q < 4; q++)
        for (int l = 0; l < 32; l++)
            out[32 * q + l] = (uint8_t)((c[64 * q + l] & 15) | ((c[64 * q + 32 + l] & 15) << 4));
}

/* ---- K-quants ------------------------------------------------------------------------------ */

/* 16 sub-blocks of 16: one super-block per pass. */
INLINE void q2_k_block(const float *x, uint8_t *y) {
    v8f X[16][G], W[16][G], Q[16][G], sc[G], mn[G];
    load_lanes(x, 16, X);
    for (int i = 0; i < 16; i++)
        for (int g = 0; g < G; g++) W[i][g] = vabs(X[i][g]);
    fit_qkx2(X, W, 16, 3, -0.5f, 0.1f, 15, 1, Q, sc, mn);
    uint8_t L[QK_K];
    store_codes(Q, 16, L);
    float scales[16], mins[16];
    for (int g = 0; g < G; g++)
        for (int l = 0; l < LANES; l++) {
            scales[LANES * g + l] = sc[g][l];
            mins[LANES * g + l] = mn[g][l];
        }
    float max_scale = scales[0], max_min = mins[0];
    for (int j = 1; j < 16; j++) {
        max_scale = scales[j] > max_scale ? scales[j] : max_scale;
        max_min = mins[j] > max_min ? mins[j] : max_min;
    }
    max_scale = max_scale > 0.0f ? max_scale : 0.0f;
    max_min = max_min > 0.0f ? max_min : 0.0f;
    const int has_s = max_scale > 0.0f, has_m = max_min > 0.0f;
    const float inv_s = has_s ? 15.0f / max_scale : 0.0f;
    const float inv_m = has_m ? 15.0f / max_min : 0.0f;
    uint8_t *packed = y;
    for (int j = 0; j < 16; j++) {
        int64_t ls = has_s ? (int64_t)rintf(inv_s * scales[j]) : 0;
        int64_t lm = has_m ? (int64_t)rintf(inv_m * mins[j]) : 0;
        packed[j] = (uint8_t)((ls | (lm << 4)) & 0xFF);
    }
    const uint16_t d16 = to_f16(has_s ? max_scale / 15.0f : 0.0f);
    const uint16_t m16 = to_f16(has_m ? max_min / 15.0f : 0.0f);
    const float d = from_f16(d16), dmin = from_f16(m16);
    for (int j = 0; j < 16; j++) {
        const float dj = d * (float)(packed[j] & 15);
        if (dj == 0.0f) continue; /* keep the first-pass codes */
        const float dmj = dmin * (float)(packed[j] >> 4);
        requant(x + 16 * j, 16, dj, dmj, 0.0f, 3.0f, L + 16 * j);
    }
    pack_crumbs(L, y + 16);
    memcpy(y + 80, &d16, 2);
    memcpy(y + 82, &m16, 2);
}

/* The 16 sub-block scales of a super-block out of their lanes, and the one of largest magnitude
   (the first on ties, as llama.cpp's strict scan), with that magnitude. */
INLINE float scales_absmax(const v8f sc[G], float scales[16], float *amax) {
    for (int g = 0; g < G; g++)
        for (int l = 0; l < LANES; l++) scales[LANES * g + l] = sc[g][l];
    float max_scale = scales[0];
    *amax = fabsf(scales[0]);
    for (int j = 1; j < 16; j++)
        if (fabsf(scales[j]) > *amax) {
            *amax = fabsf(scales[j]);
            max_scale = scales[j];
        }
    return max_scale;
}

INLINE void q3_k_block(const float *x, uint8_t *y) {
    v8f X[16][G], Q[16][G], sc[G];
    load_lanes(x, 16, X);
    fit_q3(X, 16, 4, Q, sc);
    uint8_t L[QK_K];
    store_codes(Q, 16, L);
    float scales[16], amax;
    const float max_scale = scales_absmax(sc, scales, &amax);
    const int has = max_scale != 0.0f;
    const float iscale = -32.0f / (has ? max_scale : 1.0f);
    uint8_t l6[16], *packed = y + 96;
    memset(packed, 0, 12);
    for (int j = 0; j < 16; j++)
        l6[j] = has ? low_byte(clampf_(rintf(iscale * scales[j]), -32.0f, 31.0f) + 32.0f) : 0;
    for (int j = 0; j < 8; j++) packed[j] = (uint8_t)((l6[j] & 15) | ((l6[j + 8] & 15) << 4));
    for (int j = 0; j < 16; j++) packed[8 + j % 4] += (uint8_t)((l6[j] >> 4) << (2 * (j / 4)));
    const uint16_t d16 = to_f16(has ? 1.0f / iscale : 0.0f);
    const float d = from_f16(d16);
    for (int j = 0; j < 16; j++) {
        const float dj = d * (float)(has ? (int)l6[j] - 32 : 0);
        if (dj == 0.0f) continue;
        requant(x + 16 * j, 16, dj, 0.0f, -4.0f, 3.0f, L + 16 * j);
    }
    uint8_t hb[QK_K];
    for (int e = 0; e < QK_K; e++) {
        hb[e] = L[e] > 3;
        L[e] = (uint8_t)(L[e] - 4 * hb[e]);
    }
    pack_bit_plane(hb, y);
    pack_crumbs(L, y + 32);
    memcpy(y + 108, &d16, 2);
}

/* Q4_K / Q5_K: eight sub-blocks of 32 per super-block, so one pass covers two super-blocks
 * (x2 and y2 may be scratch when there is only one). Writes d, dmin, the 12 scale bytes and
 * returns the codes of both blocks in L (512 bytes). */
INLINE void k_scales_mins(const float *x1, const float *x2, uint8_t *y1, uint8_t *y2, int nmax,
                          float rmin, int nstep, uint8_t *L) {
    v8f X[32][G], W[32][G], Q[32][G], sc[G], mn[G];
    for (int i = 0; i < 32; i++)
        for (int l = 0; l < LANES; l++) {
            X[i][0][l] = x1[32 * l + i];
            X[i][1][l] = x2[32 * l + i];
        }
    for (int g = 0; g < G; g++) {
        v8f sum_x2 = splat(0.0f);
        for (int i = 0; i < 32; i++) sum_x2 += X[i][g] * X[i][g];
        v8f mean = sum_x2 / 32.0f, av_x = splat(0.0f);
        for (int l = 0; l < LANES; l++) av_x[l] = sqrtf(mean[l]);
        for (int i = 0; i < 32; i++) W[i][g] = av_x + vabs(X[i][g]);
    }
    fit_qkx2(X, W, 32, nmax, rmin, 0.1f, nstep, 0, Q, sc, mn);
    store_codes(Q, 32, L);
    for (int b = 0; b < 2; b++) {
        const float *x = b ? x2 : x1;
        uint8_t *y = b ? y2 : y1, *codes = L + QK_K * b;
        float max_scale = sc[b][0], max_min = mn[b][0];
        for (int j = 1; j < LANES; j++) {
            max_scale = sc[b][j] > max_scale ? sc[b][j] : max_scale;
            max_min = mn[b][j] > max_min ? mn[b][j] : max_min;
        }
        max_scale = max_scale > 0.0f ? max_scale : 0.0f;
        max_min = max_min > 0.0f ? max_min : 0.0f;
        const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
        const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
        uint8_t ls[8], lm[8];
        for (int j = 0; j < 8; j++) {
            float s = rintf(inv_scale * sc[b][j]), m = rintf(inv_min * mn[b][j]);
            ls[j] = low_byte(63.0f < s ? 63.0f : s);
            lm[j] = low_byte(63.0f < m ? 63.0f : m);
        }
        const uint16_t d16 = to_f16(max_scale / 63.0f), m16 = to_f16(max_min / 63.0f);
        memcpy(y, &d16, 2);
        memcpy(y + 2, &m16, 2);
        uint8_t *s = y + 4;
        for (int j = 0; j < 4; j++) {
            s[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
            s[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
            s[j + 8] = (uint8_t)((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4));
        }
        const float d = from_f16(d16), dmin = from_f16(m16);
        for (int j = 0; j < 8; j++) {
            const float dj = d * (float)ls[j];
            if (dj == 0.0f) continue;
            requant(x + 32 * j, 32, dj, dmin * (float)lm[j], 0.0f, (float)nmax,
                    codes + 32 * j);
        }
    }
}

INLINE void q4_k_pair(const float *x1, const float *x2, uint8_t *y1, uint8_t *y2) {
    uint8_t L[2 * QK_K];
    k_scales_mins(x1, x2, y1, y2, 15, -1.0f, 20, L);
    pack_k_nibbles(L, y1 + 16);
    pack_k_nibbles(L + QK_K, y2 + 16);
}

INLINE void q5_k_pair(const float *x1, const float *x2, uint8_t *y1, uint8_t *y2) {
    uint8_t L[2 * QK_K], hb[QK_K];
    k_scales_mins(x1, x2, y1, y2, 31, -0.5f, 15, L);
    for (int b = 0; b < 2; b++) {
        uint8_t *y = b ? y2 : y1, *c = L + QK_K * b;
        for (int e = 0; e < QK_K; e++) hb[e] = c[e] >> 4;
        pack_bit_plane(hb, y + 16);
        pack_k_nibbles(c, y + 48);
    }
}

INLINE void q6_k_block(const float *x, uint8_t *y) {
    v8f X[16][G], Q[16][G], scv[G];
    load_lanes(x, 16, X);
    fit_qx(X, 16, 32, Q, scv);
    float scales[16], max_abs;
    const float max_scale = scales_absmax(scv, scales, &max_abs);
    if (max_abs < GROUP_MAX_EPS) { /* written as zeros */
        memset(y, 0, 210);
        return;
    }
    uint8_t L[QK_K];
    store_codes(Q, 16, L);
    const float iscale = -128.0f / max_scale;
    const uint16_t d16 = to_f16(1.0f / iscale);
    const float d = from_f16(d16);
    int8_t sc[16];
    for (int j = 0; j < 16; j++) {
        float r = rintf(iscale * scales[j]);
        sc[j] = (int8_t)(int32_t)(127.0f < r ? 127.0f : r);
    }
    for (int j = 0; j < 16; j++) {
        const float dj = d * (float)sc[j];
        if (dj == 0.0f) continue;
        requant(x + 16 * j, 16, dj, 0.0f, -32.0f, 31.0f, L + 16 * j);
    }
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *c = L + 128 * h + l;
            y[64 * h + l] = (uint8_t)((c[0] & 15) | ((c[64] & 15) << 4));
            y[64 * h + 32 + l] = (uint8_t)((c[32] & 15) | ((c[96] & 15) << 4));
        }
    uint8_t high[QK_K];
    for (int e = 0; e < QK_K; e++) high[e] = L[e] >> 4;
    pack_crumbs(high, y + 128);
    memcpy(y + 192, sc, 16);
    memcpy(y + 208, &d16, 2);
}

/* ---- legacy 32-weight blocks --------------------------------------------------------------- */
/* A block is four v8f; codes are computed lane-wise without branches (the scalar form spends its
 * time in mispredicted comparisons), then packed. */

INLINE void load_block(const float *x, v8f v[4]) {
    for (int k = 0; k < 4; k++) v[k] = load8(x + LANES * k);
}

INLINE float lane_max(v8f a) {
    float m = a[0];
    for (int l = 1; l < LANES; l++) m = a[l] > m ? a[l] : m;
    return m;
}

INLINE float lane_min(v8f a) {
    float m = a[0];
    for (int l = 1; l < LANES; l++) m = a[l] < m ? a[l] : m;
    return m;
}

/* max |x| over the block (the order does not matter for a maximum). */
INLINE float abs_max32(const v8f v[4]) {
    v8f am = vabs(v[0]);
    for (int k = 1; k < 4; k++) am = sel(vabs(v[k]) > am, vabs(v[k]), am);
    return lane_max(am);
}

/* The element of largest magnitude with its sign, first on ties (np.argmax): each lane keeps
 * its first maximum and where it was, then the earliest of the lanes holding the maximum wins. */
INLINE float signed_max32(const v8f v[4]) {
    v8f am = vabs(v[0]), mx = v[0];
    v8i pos = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int k = 1; k < 4; k++) {
        v8i gt = vabs(v[k]) > am;
        am = sel(gt, vabs(v[k]), am);
        mx = sel(gt, v[k], mx);
        pos = (gt & ((v8i){0, 1, 2, 3, 4, 5, 6, 7} + LANES * k)) | (~gt & pos);
    }
    const float amax = lane_max(am);
    float best = mx[0];
    int first = QK;
    for (int l = 0; l < LANES; l++) {
        const int hit = am[l] == amax && pos[l] < first;
        first = hit ? pos[l] : first;
        best = hit ? mx[l] : best;
    }
    return best;
}

INLINE float inverse(float d) { return d == 0.0f ? 0.0f : 1.0f / d; }

/* Codes of a block: int8(trunc((x - sub) * s + b)) as numpy casts it, then capped at top
 * (after reinterpreting as uint8 when `unsigned_`), as eight-lane integer vectors. */
INLINE void block_codes(const v8f v[4], float sub, float s, float b, int top, int unsigned_,
                        v8i q[4]) {
    for (int k = 0; k < 4; k++) {
        v8i c = __builtin_convertvector((v[k] - sub) * s + b, v8i);
        c = unsigned_ ? c & 0xFF : (c << 24) >> 24;
        v8i over = c > top;
        q[k] = (over & top) | (~over & c);
    }
}

/* Element j (< 16) in the low nibble of byte j, element j + 16 in the high nibble. */
INLINE void nibbles(const v8i q[4], uint8_t *out) {
    for (int k = 0; k < 2; k++) {
        v8i b = (q[k] & 15) | ((q[k + 2] & 15) << 4);
        for (int l = 0; l < LANES; l++) out[LANES * k + l] = (uint8_t)b[l];
    }
}

/* Bit 4 of element e at bit e of a little-endian 32-bit word. */
INLINE void high_bits(const v8i q[4], uint8_t *out) {
    uint32_t qh = 0;
    for (int k = 0; k < 4; k++)
        for (int l = 0; l < LANES; l++) qh |= (uint32_t)((q[k][l] >> 4) & 1) << (LANES * k + l);
    for (int k = 0; k < 4; k++) out[k] = (uint8_t)(qh >> (8 * k));
}

/* Q4_0 / Q5_0: d = (signed max) / -half, codes min(int8(x / d + half + 0.5), 2 half - 1). */
INLINE float symmetric_codes(const float *x, int half, v8i q[4]) {
    v8f v[4];
    load_block(x, v);
    const float d = signed_max32(v) / (float)-half, id = inverse(d);
    block_codes(v, 0.0f, id, (float)half + 0.5f, 2 * half - 1, 0, q);
    return d;
}

/* Q4_1 / Q5_1: d = (max - min) / levels, codes min(uint8(int8((x - min) / d + 0.5)), levels). */
INLINE float min_max_codes(const float *x, int levels, v8i q[4], float *lo_out) {
    v8f v[4];
    load_block(x, v);
    v8f lo = v[0], hi = v[0];
    for (int k = 1; k < 4; k++) {
        lo = sel(v[k] < lo, v[k], lo);
        hi = sel(v[k] > hi, v[k], hi);
    }
    float mn = lane_min(lo), mx = lane_max(hi);
    /* the first element holding the extreme, for the sign of a zero one */
    if (mn == 0.0f)
        for (int i = 0; i < QK; i++)
            if (x[i] == 0.0f) { mn = x[i]; break; }
    if (mx == 0.0f)
        for (int i = 0; i < QK; i++)
            if (x[i] == 0.0f) { mx = x[i]; break; }
    const float d = (mx - mn) / (float)levels, id = inverse(d);
    block_codes(v, mn, id, 0.5f, levels, 1, q);
    *lo_out = mn;
    return d;
}

/* Q8_0: d = max|x| / 127, codes C's roundf(x / d) (halves away from zero): truncate, then one
 * step further from zero where the dropped fraction (exact: a - trunc(a)) is at least a half. */
INLINE void q8_0_block(const float *x, uint8_t *y) {
    v8f v[4];
    load_block(x, v);
    const float d = abs_max32(v) / 127.0f, id = inverse(d);
    put_f16(y, d);
    for (int k = 0; k < 4; k++) {
        v8f a = v[k] * id;
        v8i t = __builtin_convertvector(a, v8i);
        v8f frac = vabs(a - __builtin_convertvector(t, v8f));
        v8i away = (frac >= 0.5f) & (frac < 1.0f); /* -1 where a step is due (not for Inf/NaN) */
        v8i sign = (v8i)a < 0;                    /* -1 for negative a */
        v8i step = (away & ~sign & 1) | (away & sign);  /* +1, -1 or 0 */
        t += step;
        for (int l = 0; l < LANES; l++) y[2 + LANES * k + l] = (uint8_t)t[l];
    }
}

INLINE void legacy_block(int type, const float *x, uint8_t *y) {
    v8i q[4];
    float lo;
    switch (type) {
    case T_Q4_0:
        put_f16(y, symmetric_codes(x, 8, q));
        nibbles(q, y + 2);
        break;
    case T_Q5_0:
        put_f16(y, symmetric_codes(x, 16, q));
        high_bits(q, y + 2);
        nibbles(q, y + 6);
        break;
    case T_Q4_1: {
        float d = min_max_codes(x, 15, q, &lo);
        put_f16(y, d);
        put_f16(y + 2, lo);
        nibbles(q, y + 4);
        break;
    }
    case T_Q5_1: {
        float d = min_max_codes(x, 31, q, &lo);
        put_f16(y, d);
        put_f16(y + 2, lo);
        high_bits(q, y + 4);
        nibbles(q, y + 8);
        break;
    }
    case T_Q8_0:
        q8_0_block(x, y);
        break;
    }
}

/* ---- dispatch ------------------------------------------------------------------------------ */

static int block_size(int type) { return type >= T_Q2_K ? QK_K : QK; }

static int type_size(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q2_K: return 84;
    case T_Q3_K: return 110;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    default: return 0;
    }
}

INLINE void quantize_body(int type, const float *x, Py_ssize_t n_blocks, uint8_t *y) {
    const int ts = type_size(type);
    if (type == T_Q4_K || type == T_Q5_K) {
        static const float zeros[QK_K];
        uint8_t scratch[176];
        for (Py_ssize_t b = 0; b < n_blocks; b += 2) {
            const int two = b + 1 < n_blocks;
            const float *x1 = x + b * QK_K, *x2 = two ? x1 + QK_K : zeros;
            uint8_t *y1 = y + b * ts, *y2 = two ? y1 + ts : scratch;
            if (type == T_Q4_K) q4_k_pair(x1, x2, y1, y2);
            else q5_k_pair(x1, x2, y1, y2);
        }
        return;
    }
    for (Py_ssize_t b = 0; b < n_blocks; b++) {
        const float *xb = x + b * block_size(type);
        uint8_t *yb = y + b * ts;
        switch (type) {
        case T_Q2_K: q2_k_block(xb, yb); break;
        case T_Q3_K: q3_k_block(xb, yb); break;
        case T_Q6_K: q6_k_block(xb, yb); break;
        default: legacy_block(type, xb, yb); break;
        }
    }
}

static void quantize_portable(int type, const float *x, Py_ssize_t n_blocks, uint8_t *y) {
    quantize_body(type, x, n_blocks, y);
}

/* The same code compiled for AVX2 (eight lanes per instruction, hardware rounding and float16
 * conversion), chosen at run time where the CPU has it. Contraction stays off, so no FMA enters. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) static void quantize_avx2(int type, const float *x,
                                                               Py_ssize_t n_blocks, uint8_t *y) {
    quantize_body(type, x, n_blocks, y);
}
#endif

static void quantize_blocks(int type, const float *x, Py_ssize_t n_blocks, uint8_t *y) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
        quantize_avx2(type, x, n_blocks, y);
        return;
    }
#endif
    quantize_portable(type, x, n_blocks, y);
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer src, dst;
    int type;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "iy*nnw*", &type, &src, &rows, &cols, &dst)) return NULL;
    const char *problem = NULL;
    const int ts = type_size(type);
    Py_ssize_t n_blocks = 0;
    if (ts == 0) problem = "unknown ggml type id";
    else if (rows < 0 || cols < 0) problem = "negative shape";
    else if (cols % block_size(type) != 0) problem = "cols is not a whole number of blocks";
    else if (rows != 0 && cols > PY_SSIZE_T_MAX / 4 / rows) problem = "shape too large";
    else if (src.len != rows * cols * (Py_ssize_t)sizeof(float))
        problem = "source is not rows * cols float32 values";
    else if ((uintptr_t)src.buf % sizeof(float) != 0) problem = "source is not 4-byte aligned";
    else {
        n_blocks = rows * (cols / block_size(type));
        if (dst.len != n_blocks * ts) problem = "destination buffer has the wrong size";
    }
    if (problem == NULL) {
        Py_BEGIN_ALLOW_THREADS
        quantize_blocks(type, (const float *)src.buf, n_blocks, (uint8_t *)dst.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (problem != NULL) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(type_id, src, rows, cols, dst)\n"
     "Quantize float32 src (rows * cols, C order) into ggml blocks of type_id (GGMLQuantizationType\n"
     "value: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K), writing rows * cols / block_size * type_size\n"
     "bytes into dst. Releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ggml_quants", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ggml_quants(void) { return PyModule_Create(&module); }
