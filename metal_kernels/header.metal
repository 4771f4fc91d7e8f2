// Prepended to every kernel (the `header` of mx.fast.metal_kernel): contraction off, so that
// a * b + c is two correctly rounded operations on the GPU as in the numpy specification.
#if defined(__METAL_VERSION__) && __METAL_VERSION__ >= 320
#pragma METAL fp contract(off)
#endif

// Eight interleaved lane sums combined in the specification's fixed order (`schemes._lane_sum`):
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline float lane_total(thread const float* lane) {
    float a0 = lane[0] + lane[4];
    float a1 = lane[1] + lane[5];
    float a2 = lane[2] + lane[6];
    float a3 = lane[3] + lane[7];
    return (a0 + a2) + (a1 + a3);
}
