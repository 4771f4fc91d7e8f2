// Affine quantization by squared-error search, one thread per group: `mse` (ZERO = 0) and
// `mse-zero` (ZERO = 1) as `schemes._search` with `_mse_chunk` / `_zero_chunk` compute them, the
// same float operations in the same order (the native kernel, _affine.c, does the same).
//
// Template: T (storage dtype), GROUP (32, 64, 128), BITS (2..8), ZERO (0: mse, 1: mse-zero).
// Inputs:   w (n,) T, row by row; n_groups, a 0-d uint32.
// Outputs:  codes (n * BITS / 32,) uint32, MLX's LSB-first stream; scales, biases (n_groups,) T.
// Grid:     (n_groups, 1, 1); any threadgroup size. Thread g searches group g and writes its
//           whole words, scale and bias.
//
// Sums run in eight interleaved lanes combined by `lane_total` (header.metal), the
// specification's `_lane_sum`; integer sums of codes are exact in int; an integer is turned into
// float as hi * 65536 + lo, one correctly rounded addition (int -> float conversion itself may
// round toward zero on the GPU).
    uint g = thread_position_in_grid.x;
    if (g >= n_groups) {
        return;
    }
    const float levels = float((1u << BITS) - 1u);
    const float eps = 1e-7f;
    const uint base = g * GROUP;
    float x[GROUP];
    for (uint i = 0; i < GROUP; i++) {
        x[i] = float(w[base + i]);
    }
    float lo = x[0];
    float hi = x[0];
    for (uint i = 1; i < GROUP; i++) {
        lo = metal::min(lo, x[i]);
        hi = metal::max(hi, x[i]);
    }
    // candidate 0: MLX's rule, scored with its stored (rounded) scale and bias
    float s32 = metal::max(metal::precise::divide(hi - lo, levels), eps);
    bool negative_edge = metal::abs(lo) > metal::abs(hi);
    s32 = negative_edge ? s32 : -s32;
    float edge = negative_edge ? lo : hi;
    float q0 = metal::rint(metal::precise::divide(edge, s32));
    float b32 = 0.0f;
    if (q0 != 0.0f) {
        s32 = metal::precise::divide(edge, q0);
        b32 = edge;
    }
    uint8_t best_q[GROUP];
    for (uint i = 0; i < GROUP; i++) {
        float t = x[i] - b32;
        best_q[i] = uint8_t(metal::clamp(metal::rint(metal::precise::divide(t, s32)), 0.0f, levels));
    }
    float best_s = float(T(s32));
    float best_b = float(T(b32));
    float best_err;
    {
        float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (uint i = 0; i < GROUP; i++) {
            float r = float(best_q[i]) * best_s;
            r = r + best_b;
            r = r - x[i];
            float rr = r * r;
            lane[i % 8] = lane[i % 8] + rr;
        }
        best_err = lane_total(lane);
    }
    float sw = 0.0f;  // the group's own lane sum (mse's least squares)
    {
        float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (uint i = 0; i < GROUP; i++) {
            lane[i % 8] = lane[i % 8] + x[i];
        }
        sw = lane_total(lane);
    }
    const float span = hi - lo;
    const float shrink[3] = {0.0f, 0.05f, 0.12f};
    uint8_t q[GROUP];
    for (uint a = 0; a < 3; a++) {
        for (uint c = 0; c < 3; c++) {
            float clo = shrink[a] * span;
            clo = lo + clo;
            float chi = shrink[c] * span;
            chi = hi - chi;
            float scale = metal::max(metal::precise::divide(chi - clo, levels), eps);
            float s;
            float b;
            if (ZERO == 0) {  // codes on the candidate grid, then least squares for scale and bias
                float inv = metal::precise::divide(1.0f, scale);
                int sq = 0;
                int sqq = 0;
                float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                for (uint i = 0; i < GROUP; i++) {
                    float t = x[i] - clo;
                    t = t * inv;
                    uint qi = uint(metal::clamp(metal::rint(t), 0.0f, levels));
                    sq += int(qi);
                    sqq += int(qi * qi);
                    float qw = float(qi) * x[i];
                    lane[i % 8] = lane[i % 8] + qw;
                }
                float sqw = lane_total(lane);
                int det = int(GROUP) * sqq - sq * sq;
                bool ok = det > 0;
                int dd = ok ? det : 1;
                float detf = float(dd >> 16) * 65536.0f;
                detf = detf + float(dd & 65535);
                float sqf = float(sq);
                float sqqf = float(sqq);
                float n_sqw = float(GROUP) * sqw;
                float sq_sw = sqf * sw;
                float ls = metal::precise::divide(n_sqw - sq_sw, detf);
                float sqq_sw = sqqf * sw;
                float sq_sqw = sqf * sqw;
                float lb = metal::precise::divide(sqq_sw - sq_sqw, detf);
                s = float(T(ok ? ls : scale));
                b = float(T(ok ? lb : clo));
                if (s == 0.0f) {
                    s = float(T(scale));
                }
            } else {  // zero kept a code: integer zero point k, least squares for the scale alone
                float inv = metal::precise::divide(1.0f, scale);
                // numpy's clip: x < 0 ? 0 : (x > levels ? levels : x), so rint's -0.0 stays
                // -0.0 and the bias -(k * s) keeps the specification's sign (clamp's fmax may not)
                float k = metal::rint((-clo) * inv);
                k = k < 0.0f ? 0.0f : (k > levels ? levels : k);
                float kb = k * scale;
                kb = -kb;
                float lane_d[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                float lane_n[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                for (uint i = 0; i < GROUP; i++) {
                    float t = x[i] - kb;
                    t = t * inv;
                    float qk = metal::clamp(metal::rint(t), 0.0f, levels) - k;
                    float dk = qk * qk;
                    float nk = qk * x[i];
                    lane_d[i % 8] = lane_d[i % 8] + dk;
                    lane_n[i % 8] = lane_n[i % 8] + nk;
                }
                float den = lane_total(lane_d);
                float num = lane_total(lane_n);
                bool ok = den > 0.0f;
                s = float(T(ok ? metal::precise::divide(num, den) : scale));
                if (s == 0.0f) {
                    s = float(T(scale));
                }
                float ks = k * s;
                b = float(T(-ks));
            }
            // codes with the stored scale and bias, and their error
            float inv_s = metal::precise::divide(1.0f, s);
            float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            for (uint i = 0; i < GROUP; i++) {
                float t = x[i] - b;
                t = t * inv_s;
                q[i] = uint8_t(metal::clamp(metal::rint(t), 0.0f, levels));
                float r = float(q[i]) * s;
                r = r + b;
                r = r - x[i];
                float rr = r * r;
                lane[i % 8] = lane[i % 8] + rr;
            }
            float err = lane_total(lane);
            if (err < best_err) {
                best_err = err;
                best_s = s;
                best_b = b;
                for (uint i = 0; i < GROUP; i++) {
                    best_q[i] = q[i];
                }
            }
        }
    }
    uint word = g * (GROUP * BITS / 32);
    uint64_t acc = 0;
    uint filled = 0;
    for (uint i = 0; i < GROUP; i++) {
        acc |= uint64_t(best_q[i]) << filled;
        filled += BITS;
        if (filled >= 32) {
            codes[word] = uint32_t(acc & 0xffffffffull);
            word += 1;
            acc >>= 32;
            filled -= 32;
        }
    }
    scales[g] = T(best_s);
    biases[g] = T(best_b);
