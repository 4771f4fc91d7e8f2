/*
 * Native grouped affine quantization: the same functions as mlxedge/quant/schemes.py (the
 * specification), written in C because numpy needs a dozen passes over temporaries per search
 * candidate and mx.quantize runs on one core. Here a group is quantized in registers/L1, the
 * search costs a few cycles per weight, and the caller spreads chunks of groups over threads
 * (the GIL is released).
 *
 * Results are bit-identical with the numpy specification. That holds because both sides do the
 * same float32 operations in the same order:
 *   - no fused multiply-add and no reassociation (built with -ffp-contract=off, no fast-math);
 *   - sums over a group use eight interleaved partial sums (element i goes to lane i % 8),
 *     combined as ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)): `lane_sum` here, `_lane_sum` there;
 *   - sums of integer codes are exact integers on both sides;
 *   - rounding is round-half-to-even (rintf / np.rint).
 * Groups of 32, 64 or 128 weights keep every packed group on whole 32-bit words, so chunks of
 * groups can be written independently.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { M_RTN = 0, M_MSE = 1, M_ZERO = 2 };
#define MAX_GROUP 128
#define EPS 1e-7f

#define INLINE static inline __attribute__((always_inline))

INLINE uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
INLINE float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* float32 -> bfloat16 bits, round to nearest even. A NaN stays a (quiet) NaN: rounding its bits
 * would carry some payloads (top half 0x7FFF, 0xFFFF) over into +-0, past the finite check. */
INLINE uint16_t to_bf16(float x) {
    uint32_t u = f32_bits(x);
    uint32_t nan = (uint16_t)((u >> 16) | 0x0040u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}
INLINE float from_bf16(uint16_t h) { return bits_f32((uint32_t)h << 16); }

INLINE uint16_t to_f16(float x) { _Float16 h = (_Float16)x; uint16_t u; memcpy(&u, &h, 2); return u; }
INLINE float from_f16(uint16_t u) { _Float16 h; memcpy(&h, &u, 2); return (float)h; }

/* x as it is after a round trip through the storage dtype. */
INLINE float round_store(float x, int store) {
    if (store == DT_BF16) return from_bf16(to_bf16(x));
    if (store == DT_F16) return from_f16(to_f16(x));
    return x;
}

/* One group of the source as float32, cast to the storage dtype first (the weight as MLX sees it).
 * The dtype switch sits outside the loops so that each loop vectorizes. */
INLINE void load_group(const void *src, int src_dtype, int sdt, Py_ssize_t g, int gs, float *w) {
    const Py_ssize_t at = g * gs;
    if (src_dtype == DT_BF16) {
        const uint16_t *p = (const uint16_t *)src + at;
        for (int i = 0; i < gs; i++) w[i] = from_bf16(p[i]);
    } else if (src_dtype == DT_F16) {
        const uint16_t *p = (const uint16_t *)src + at;
        for (int i = 0; i < gs; i++) w[i] = from_f16(p[i]);
    } else {
        memcpy(w, (const float *)src + at, (size_t)gs * sizeof(float));
    }
    if (sdt == DT_BF16 && src_dtype != DT_BF16)
        for (int i = 0; i < gs; i++) w[i] = from_bf16(to_bf16(w[i]));
    else if (sdt == DT_F16 && src_dtype != DT_F16)
        for (int i = 0; i < gs; i++) w[i] = from_f16(to_f16(w[i]));
}

INLINE void put(void *dst, int dtype, Py_ssize_t i, float x) {
    if (dtype == DT_BF16) ((uint16_t *)dst)[i] = to_bf16(x);
    else if (dtype == DT_F16) ((uint16_t *)dst)[i] = to_f16(x);
    else ((float *)dst)[i] = x;
}

/* Eight float32 lanes as one value: the lane sums below map onto one AVX2 register (two SSE or
 * NEON registers elsewhere), whatever the auto-vectorizer decides. Lane-wise IEEE arithmetic. */
typedef float v8f __attribute__((vector_size(32)));

INLINE v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Combine eight lane sums in the fixed order ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). */
INLINE float combine(v8f acc) {
    float a4[4];
    for (int l = 0; l < 4; l++) a4[l] = acc[l] + acc[l + 4];
    return (a4[0] + a4[2]) + (a4[1] + a4[3]);
}

INLINE float lane_sum(const float *x, int n) {
    v8f acc = {0};
    for (int k = 0; k < n; k += 8) acc += load8(x + k);
    return combine(acc);
}

/* Codes for one group: clip(rint((w - b) / s), 0, levels) — MLX's division form. */
INLINE float clamp(float x, float levels) {
    x = x < 0.0f ? 0.0f : x;
    return x > levels ? levels : x;
}

INLINE void codes_div(const float *restrict w, int n, float s, float b, float levels, float *restrict q) {
    for (int i = 0; i < n; i++) q[i] = clamp(rintf((w[i] - b) / s), levels);
}

/* Sum of squared error of (q * s + b) against w. */
INLINE float sse(const float *w, const float *q, int n, float s, float b) {
    v8f acc = {0};
    for (int k = 0; k < n; k += 8) {
        v8f r = (load8(q + k) * s + b) - load8(w + k);
        acc += r * r;
    }
    return combine(acc);
}

/* Search candidates compute codes with the reciprocal of the scale (a division per weight would
 * be the slowest step). Codes and sums are separate loops: each then vectorizes on its own. */
INLINE void codes_mul(const float *restrict w, int n, float inv, float b, float levels,
                      float *restrict q) {
    for (int i = 0; i < n; i++) q[i] = clamp(rintf((w[i] - b) * inv), levels);
}

/* The sums a least-squares refit needs. The code sums are whole numbers below 2^24 (at most
 * 128 * 255^2), so float32 holds them exactly in any order. */
INLINE void refit_sums(const float *w, const float *q, int n, float *sq, float *sqq, float *sqw) {
    v8f a_q = {0}, a_qq = {0}, a_qw = {0};
    for (int k = 0; k < n; k += 8) {
        v8f c = load8(q + k);
        a_q += c;
        a_qq += c * c;
        a_qw += c * load8(w + k);
    }
    *sq = combine(a_q);
    *sqq = combine(a_qq);
    *sqw = combine(a_qw);
}

/* MLX's affine rule (see schemes.rtn_params): float32 scale and bias used to compute codes. */
INLINE void rtn_params(float w_min, float w_max, float levels, float *scale, float *bias) {
    int neg_edge = fabsf(w_min) > fabsf(w_max);
    float s = (w_max - w_min) / levels;
    s = s > EPS ? s : EPS;
    s = neg_edge ? s : -s;
    float edge = neg_edge ? w_min : w_max;
    float q0 = rintf(edge / s);
    if (q0 != 0.0f) {
        *scale = edge / q0;
        *bias = edge;
    } else {
        *scale = s;
        *bias = 0.0f;
    }
}

static const float SHRINK[3] = {0.0f, 0.05f, 0.12f};

/* `mse` refit (see schemes._mse_chunk): least-squares scale and bias for the range's codes. */
INLINE void refit_mse(const float *w, int n, float levels, int store, float lo, float scale,
                      float sw, float *q, float *s_out, float *b_out) {
    float sq, sqq, sqw;
    codes_mul(w, n, 1.0f / scale, lo, levels, q);
    refit_sums(w, q, n, &sq, &sqq, &sqw);
    int32_t det = n * (int32_t)sqq - (int32_t)sq * (int32_t)sq;
    float s, b;
    if (det > 0) {
        float detf = (float)det;
        s = ((float)n * sqw - sq * sw) / detf;
        b = (sqq * sw - sq * sqw) / detf;
    } else {
        s = scale;
        b = lo;
    }
    s = round_store(s, store);
    *b_out = round_store(b, store);
    *s_out = s == 0.0f ? round_store(scale, store) : s;
}

/* `mse-zero` refit (see schemes._zero_chunk): an integer zero point k (the code of 0.0) and a
 * least-squares refit of the scale alone; the bias follows as -k * s. */
INLINE void refit_zero(const float *w, int n, float levels, int store, float lo, float scale,
                       float *q, float *s_out, float *b_out) {
    float inv = 1.0f / scale;
    float k = clamp(rintf((-lo) * inv), levels);
    codes_mul(w, n, inv, -(k * scale), levels, q);
    v8f a_den = {0}, a_num = {0};
    for (int j = 0; j < n; j += 8) {
        v8f qk = load8(q + j) - k;
        a_den += qk * qk;
        a_num += qk * load8(w + j);
    }
    float den = combine(a_den), num = combine(a_num);
    float s = round_store(den > 0.0f ? num / den : scale, store);
    if (s == 0.0f) s = round_store(scale, store);
    *s_out = s;
    *b_out = round_store(-(k * s), store);
}

/* The frame both searches share (see schemes._search): candidate 0 is MLX's rule; each shrunk
 * range is refitted by `method`, and codes are recomputed with the rounded scale and bias. */
INLINE void search(const float *w, int n, float levels, int store, int method, float w_min,
                   float w_max, float *best_q, float *best_s, float *best_b) {
    float s32, b32, q[MAX_GROUP];
    rtn_params(w_min, w_max, levels, &s32, &b32);
    codes_div(w, n, s32, b32, levels, best_q);
    float bs = round_store(s32, store), bb = round_store(b32, store);
    float best_err = sse(w, best_q, n, bs, bb);

    const float span = w_max - w_min;
    const float sw = method == M_MSE ? lane_sum(w, n) : 0.0f;
    for (int a = 0; a < 3; a++) {
        for (int c = 0; c < 3; c++) {
            float lo = w_min + SHRINK[a] * span;
            float hi = w_max - SHRINK[c] * span;
            float scale = (hi - lo) / levels;
            scale = scale > EPS ? scale : EPS;
            float s, b;
            if (method == M_MSE)
                refit_mse(w, n, levels, store, lo, scale, sw, q, &s, &b);
            else
                refit_zero(w, n, levels, store, lo, scale, q, &s, &b);
            codes_mul(w, n, 1.0f / s, b, levels, q);
            float err = sse(w, q, n, s, b);
            if (err < best_err) {
                best_err = err;
                bs = s;
                bb = b;
                memcpy(best_q, q, (size_t)n * sizeof(float));
            }
        }
    }
    *best_s = bs;
    *best_b = bb;
}

/* Little-endian bit stream of `bits`-bit codes, 8 codes (= `bits` bytes) at a time. */
INLINE void pack_codes(const float *q, int n, int bits, uint8_t *out) {
    for (int k = 0; k < n; k += 8) {
        uint64_t v = 0;
        for (int l = 0; l < 8; l++) v |= (uint64_t)(uint32_t)q[k + l] << (l * bits);
        for (int j = 0; j < bits; j++) out[j] = (uint8_t)(v >> (8 * j));
        out += bits;
    }
}

/* Quantize groups [0, n_groups) of `src`; returns the first group holding NaN/Inf, or -1. */
INLINE Py_ssize_t quantize_body(const void *src, int src_dtype, int sdt, int bits, int gs,
                                int method, Py_ssize_t n_groups, uint8_t *packed, void *scales,
                                void *biases) {
    const float levels = (float)((1 << bits) - 1);
    float w[MAX_GROUP], q[MAX_GROUP];
    for (Py_ssize_t g = 0; g < n_groups; g++) {
        load_group(src, src_dtype, sdt, g, gs, w);
        float w_min = w[0], w_max = w[0];
        int finite = 1;
        for (int i = 0; i < gs; i++) {
            finite &= isfinite(w[i]) != 0;
            w_min = w[i] < w_min ? w[i] : w_min;
            w_max = w[i] > w_max ? w[i] : w_max;
        }
        if (!finite) return g;
        float s, b;
        if (method == M_RTN) {
            float s32, b32;
            rtn_params(w_min, w_max, levels, &s32, &b32);
            codes_div(w, gs, s32, b32, levels, q);
            s = round_store(s32, sdt);
            b = round_store(b32, sdt);
        } else {
            search(w, gs, levels, sdt, method, w_min, w_max, q, &s, &b);
        }
        pack_codes(q, gs, bits, packed + (size_t)g * gs * bits / 8);
        put(scales, sdt, g, s);
        put(biases, sdt, g, b);
    }
    return -1;
}

#define QUANTIZE_ARGS                                                                           \
    const void *src, int src_dtype, int sdt, int bits, int gs, int method, Py_ssize_t n_groups, \
        uint8_t *packed, void *scales, void *biases
#define QUANTIZE_CALL src, src_dtype, sdt, bits, gs, method, n_groups, packed, scales, biases

static Py_ssize_t quantize_portable(QUANTIZE_ARGS) { return quantize_body(QUANTIZE_CALL); }

/* The same code compiled for AVX2 (8 floats per instruction, rounding and float16 conversion in
 * hardware), chosen at run time where the CPU has it. Contraction stays off, so no FMA enters. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) static Py_ssize_t quantize_avx2(QUANTIZE_ARGS) {
    return quantize_body(QUANTIZE_CALL);
}
#endif

static Py_ssize_t quantize_groups(QUANTIZE_ARGS) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        return quantize_avx2(QUANTIZE_CALL);
#endif
    return quantize_portable(QUANTIZE_CALL);
}

static int itemsize(int dtype) { return dtype == DT_F32 ? 4 : 2; }

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    Py_buffer src, packed, scales, biases;
    int src_dtype, store_dtype, bits, gs, method;
    if (!PyArg_ParseTuple(args, "y*iiiiiw*w*w*", &src, &src_dtype, &store_dtype, &bits, &gs,
                          &method, &packed, &scales, &biases))
        return NULL;
    const char *problem = NULL;
    Py_ssize_t n_groups = 0;
    if (src_dtype < 0 || src_dtype > 2 || store_dtype < 0 || store_dtype > 2)
        problem = "unknown dtype code";
    else if (bits < 2 || bits > 8 || bits == 7)
        problem = "bits must be 2, 3, 4, 5, 6 or 8";
    else if (gs != 32 && gs != 64 && gs != 128)
        problem = "group size must be 32, 64 or 128";
    else if (method != M_RTN && method != M_MSE && method != M_ZERO)
        problem = "unknown method code";
    else if (src.len % ((Py_ssize_t)gs * itemsize(src_dtype)) != 0)
        problem = "source is not a whole number of groups";
    else {
        n_groups = src.len / ((Py_ssize_t)gs * itemsize(src_dtype));
        if (packed.len != n_groups * gs * bits / 8)
            problem = "packed buffer has the wrong size";
        else if (scales.len != n_groups * itemsize(store_dtype) ||
                 biases.len != n_groups * itemsize(store_dtype))
            problem = "scales or biases buffer has the wrong size";
    }
    Py_ssize_t bad = -1;
    if (problem == NULL) {
        Py_BEGIN_ALLOW_THREADS
        bad = quantize_groups(src.buf, src_dtype, store_dtype, bits, gs, method, n_groups,
                              (uint8_t *)packed.buf, scales.buf, biases.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&packed);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&biases);
    if (problem != NULL) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    return PyLong_FromSsize_t(bad);
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(src, src_dtype, store_dtype, bits, group_size, method, packed, scales, biases)\n"
     "Fill packed/scales/biases for every group of src; return the first non-finite group or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_affine", NULL, -1, methods};

PyMODINIT_FUNC PyInit__affine(void) { return PyModule_Create(&module); }
