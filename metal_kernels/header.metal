// Prepended to every kernel (the `header` of mx.fast.metal_kernel): contraction off, so that
// a * b + c is two correctly rounded operations on the GPU as in the numpy specification.
#if defined(__METAL_VERSION__) && __METAL_VERSION__ >= 320
#pragma METAL fp contract(off)
#endif
