// Affine round-to-nearest quantization with coalesced loads: one threadgroup of 32 threads per
// group, thread t reading weights t, t + 32, ... so neighbouring threads read neighbouring
// weights. The same rule and bytes as affine_quantize_rtn.metal (`schemes.quantize`, "rtn");
// bench/metal.py measures which of the two is faster on a Mac.
//
// Template: T (storage dtype), GROUP (32, 64, 128), BITS (2..8).
// Inputs:   w (n,) T, row by row.
// Outputs:  codes (n * BITS / 32,) uint32, MLX's LSB-first stream; scales, biases (n_groups,) T.
// Grid:     (n_groups * 32, 1, 1), threadgroup (32, 1, 1): threadgroup g quantizes group g.
//           The minimum and maximum are reduced through threadgroup memory (min and max do not
//           depend on the order), every thread then derives the same scale and bias, writes its
//           codes to threadgroup memory, and threads 0.. assemble one output word each.
    const uint t = thread_position_in_threadgroup.x;
    const uint g = threadgroup_position_in_grid.x;
    const uint levels = (1u << BITS) - 1u;
    const uint base = g * GROUP;
    threadgroup float lows[32];
    threadgroup float highs[32];
    threadgroup uint8_t group_codes[GROUP];
    float lo = float(w[base + t]);
    float hi = lo;
    for (uint i = t + 32; i < GROUP; i += 32) {
        float v = float(w[base + i]);
        lo = metal::min(lo, v);
        hi = metal::max(hi, v);
    }
    lows[t] = lo;
    highs[t] = hi;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint stride = 16; stride > 0; stride >>= 1) {
        if (t < stride) {
            lows[t] = metal::min(lows[t], lows[t + stride]);
            highs[t] = metal::max(highs[t], highs[t + stride]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    lo = lows[0];
    hi = highs[0];
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
    for (uint i = t; i < GROUP; i += 32) {
        float d = float(w[base + i]) - bias;
        float q = metal::rint(metal::precise::divide(d, scale));
        group_codes[i] = uint8_t(metal::clamp(q, 0.0f, float(levels)));
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint words = GROUP * BITS / 32;
    if (t < words) {  // word t holds stream bits 32 t .. 32 t + 31
        uint32_t word = 0;
        for (uint b = 0; b < 32; b++) {
            uint bit = t * 32 + b;
            uint code = group_codes[bit / BITS];
            word |= ((code >> (bit % BITS)) & 1u) << b;
        }
        codes[g * words + t] = word;
    }
    if (t == 0) {
        scales[g] = T(scale);
        biases[g] = T(bias);
    }
