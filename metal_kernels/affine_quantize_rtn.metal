// Affine round-to-nearest quantization, one thread per group: MLX's rule as `schemes.rtn_params`
// and `schemes.codes_for` compute it (the true maximum, ties to even), in float.
//
// Template: T (storage dtype of w, scales, biases), GROUP (32, 64, 128), BITS (2..8).
// Inputs:   w (n,) T, the weight flattened row by row; n_groups, a 0-d uint32.
// Outputs:  codes (n * BITS / 32,) uint32, MLX's LSB-first bit stream; scales, biases (n_groups,) T.
// Grid:     (n_groups, 1, 1); any threadgroup size. Thread g reads group g's GROUP weights and
//           writes its GROUP * BITS / 32 whole words of codes, its scale and its bias: no two
//           threads write the same word, so no synchronisation is needed.
    uint g = thread_position_in_grid.x;
    if (g >= n_groups) {
        return;
    }
    const uint levels = (1u << BITS) - 1u;
    const uint base = g * GROUP;
    float lo = float(w[base]);
    float hi = lo;
    for (uint i = 1; i < GROUP; i++) {
        float v = float(w[base + i]);
        lo = metal::min(lo, v);
        hi = metal::max(hi, v);
    }
    float scale = metal::max(metal::precise::divide(hi - lo, float(levels)), 1e-7f);
    bool negative_edge = metal::abs(lo) > metal::abs(hi);
    scale = negative_edge ? scale : -scale;
    float edge = negative_edge ? lo : hi;
    float q0 = metal::rint(metal::precise::divide(edge, scale));
    float bias = 0.0f;
    if (q0 != 0.0f) {
        scale = metal::precise::divide(edge, q0);
        bias = edge;
    }
    uint word = g * (GROUP * BITS / 32);
    uint64_t acc = 0;
    uint filled = 0;
    for (uint i = 0; i < GROUP; i++) {
        float d = float(w[base + i]) - bias;
        float q = metal::rint(metal::precise::divide(d, scale));
        q = metal::clamp(q, 0.0f, float(levels));
        acc |= uint64_t(uint32_t(q)) << filled;
        filled += BITS;
        if (filled >= 32) {
            codes[word] = uint32_t(acc & 0xffffffffull);
            word += 1;
            acc >>= 32;
            filled -= 32;
        }
    }
    scales[g] = T(scale);
    biases[g] = T(bias);
