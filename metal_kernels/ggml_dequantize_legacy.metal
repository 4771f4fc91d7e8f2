// llama.cpp's legacy blocks back to float, one thread per block of 32, as `quant/ggml.py`'s
// dequantizers compute them (float arithmetic, each product and sum rounded on its own).
//
// Template: TYPE 0 = Q8_0 (34 bytes), 1 = Q4_0 (18), 2 = Q4_1 (20), 3 = Q5_0 (22), 4 = Q5_1 (24).
// Inputs:   blocks (n_blocks * size,) uint8; n_blocks, a 0-d uint32.
// Outputs:  x (n_blocks * 32,) float.
// Grid:     (n_blocks, 1, 1); any threadgroup size. Thread b reads block b, writes its 32 weights.
    uint b = thread_position_in_grid.x;
    if (b >= n_blocks) {
        return;
    }
    const uint size = TYPE == 0 ? 34u : TYPE == 1 ? 18u : TYPE == 2 ? 20u : TYPE == 3 ? 22u : 24u;
    const uint at = b * size;
    const float d = float(as_type<half>(ushort(uint(blocks[at]) | (uint(blocks[at + 1]) << 8))));
    float m = 0.0f;
    uint qs = at + 2;  // the nibbles (or Q8_0's bytes)
    uint qh = 0;       // Q5's high bits
    if (TYPE == 2 || TYPE == 4) {
        m = float(as_type<half>(ushort(uint(blocks[at + 2]) | (uint(blocks[at + 3]) << 8))));
        qs += 2;
    }
    if (TYPE == 3 || TYPE == 4) {
        qh = qs;
        qs += 4;
    }
    for (uint e = 0; e < 32; e++) {
        float v;
        if (TYPE == 0) {
            v = d * float(as_type<int8_t>(blocks[qs + e]));
        } else {
            uint byte = blocks[qs + (e & 15u)];
            uint q = e < 16 ? (byte & 15u) : (byte >> 4);
            if (TYPE == 3 || TYPE == 4) {
                q |= ((uint(blocks[qh + e / 8]) >> (e % 8)) & 1u) << 4;
            }
            if (TYPE == 1 || TYPE == 3) {
                float c = float(q) - (TYPE == 1 ? 8.0f : 16.0f);
                v = d * c;
            } else {
                float p = d * float(q);
                v = p + m;
            }
        }
        x[b * 32 + e] = v;
    }
