// llama.cpp's legacy block quantizers, one thread per block of 32 weights, writing the block
// bytes `quant/ggml.py` specifies (llama.cpp's quantize_row_*_ref, bit for bit).
//
// Template: TYPE 0 = Q8_0 (34 bytes), 1 = Q4_0 (18), 2 = Q4_1 (20), 3 = Q5_0 (22), 4 = Q5_1 (24).
// Inputs:   x (n,) float, the rows flattened; n_blocks, a 0-d uint32.
// Outputs:  blocks (n_blocks * size,) uint8, block b at b * size.
// Grid:     (n_blocks, 1, 1); any threadgroup size. Thread b reads block b's 32 weights and writes
//           its bytes only.
    uint b = thread_position_in_grid.x;
    if (b >= n_blocks) {
        return;
    }
    const uint size = TYPE == 0 ? 34u : TYPE == 1 ? 18u : TYPE == 2 ? 20u : TYPE == 3 ? 22u : 24u;
    const uint in = b * 32u;
    const uint out = b * size;
    float d = 0.0f;
    float m = 0.0f;
    uint q[32];
    if (TYPE == 0) {  // Q8_0: d = amax / 127, codes round(x / d), halves away from zero
        float amax = 0.0f;
        for (uint i = 0; i < 32; i++) {
            amax = metal::max(amax, metal::abs(x[in + i]));
        }
        d = metal::precise::divide(amax, 127.0f);
        float id = d != 0.0f ? metal::precise::divide(1.0f, d) : 0.0f;
        for (uint i = 0; i < 32; i++) {
            float t = x[in + i] * id;
            q[i] = uint(int(metal::round(t))) & 0xffu;  // the int8 code's byte
        }
    } else if (TYPE == 1 || TYPE == 3) {  // Q4_0 / Q5_0: symmetric around the signed maximum
        const float half_levels = TYPE == 1 ? 8.0f : 16.0f;
        const uint top = TYPE == 1 ? 15u : 31u;
        float vmax = x[in];
        float amax = metal::abs(vmax);
        for (uint i = 1; i < 32; i++) {  // the first element of largest magnitude, signed
            float v = x[in + i];
            if (metal::abs(v) > amax) {
                amax = metal::abs(v);
                vmax = v;
            }
        }
        d = metal::precise::divide(vmax, -half_levels);
        float id = d != 0.0f ? metal::precise::divide(1.0f, d) : 0.0f;
        for (uint i = 0; i < 32; i++) {
            float t = x[in + i] * id;
            t = t + (half_levels + 0.5f);
            q[i] = metal::min(uint(int(t)), top);  // truncation, as the C conversion does
        }
    } else {  // Q4_1 / Q5_1: min and max, the first element holding each
        const uint top = TYPE == 2 ? 15u : 31u;
        float lo = x[in];
        float hi = x[in];
        for (uint i = 1; i < 32; i++) {
            float v = x[in + i];
            if (v < lo) {
                lo = v;
            }
            if (v > hi) {
                hi = v;
            }
        }
        d = metal::precise::divide(hi - lo, float(top));
        m = lo;
        float id = d != 0.0f ? metal::precise::divide(1.0f, d) : 0.0f;
        for (uint i = 0; i < 32; i++) {
            float t = (x[in + i] - lo) * id;
            t = t + 0.5f;
            q[i] = metal::min(uint(int(t)), top);
        }
    }
    uint at = out;
    ushort dh = as_type<ushort>(half(d));
    blocks[at] = uint8_t(dh & 0xffu);
    blocks[at + 1] = uint8_t(dh >> 8);
    at += 2;
    if (TYPE == 2 || TYPE == 4) {
        ushort mh = as_type<ushort>(half(m));
        blocks[at] = uint8_t(mh & 0xffu);
        blocks[at + 1] = uint8_t(mh >> 8);
        at += 2;
    }
    if (TYPE == 0) {
        for (uint i = 0; i < 32; i++) {
            blocks[at + i] = uint8_t(q[i]);
        }
        return;
    }
    if (TYPE == 3 || TYPE == 4) {  // bit 4 of element e in bit e % 8 of byte e / 8
        for (uint k = 0; k < 4; k++) {
            uint byte = 0;
            for (uint j = 0; j < 8; j++) {
                byte |= ((q[8 * k + j] >> 4) & 1u) << j;
            }
            blocks[at + k] = uint8_t(byte);
        }
        at += 4;
    }
    for (uint j = 0; j < 16; j++) {  // element j in the low nibble, element j + 16 in the high
        blocks[at + j] = uint8_t((q[j] & 15u) | ((q[j + 16] & 15u) << 4));
    }
