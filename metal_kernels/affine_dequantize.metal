// Affine dequantization, one thread per group: w = scale * q + bias in float, as
// `schemes.dequantize` computes it (the product and the sum each rounded: no fused multiply-add).
//
// Template: T (dtype of scales and biases), GROUP (32, 64, 128), BITS (2..8).
// Inputs:   codes (n * BITS / 32,) uint32, MLX's LSB-first stream; scales, biases (n_groups,) T;
//           n_groups, a 0-d uint32.
// Outputs:  w (n,) float.
// Grid:     (n_groups, 1, 1); any threadgroup size. Thread g reads group g's words, scale and
//           bias and writes its GROUP weights.
    uint g = thread_position_in_grid.x;
    if (g >= n_groups) {
        return;
    }
    const uint64_t mask = (1ull << BITS) - 1ull;
    const float s = float(scales[g]);
    const float b = float(biases[g]);
    uint word = g * (GROUP * BITS / 32);
    uint64_t acc = 0;
    uint filled = 0;
    for (uint i = 0; i < GROUP; i++) {
        if (filled < BITS) {
            acc |= uint64_t(codes[word]) << filled;
            word += 1;
            filled += 32;
        }
        float q = float(uint32_t(acc & mask));
        acc >>= BITS;
        filled -= BITS;
        float v = q * s;
        w[g * GROUP + i] = v + b;
    }
