// What MLX's utils.h and the Metal standard library give our kernels, in C++, so that the text
// MLX generates compiles unchanged with g++ and runs on the CPU (tests/metal_harness.py).
// Only the subset our kernels use is here (metal_kernels/README.md lists it); a kernel that needs
// more brings its faithful emulation here with it.
//
// Faithful means bit for bit under the rules of metal_kernels/README.md: float arithmetic with
// contraction off (-ffp-contract=off), correctly rounded division (metal::precise::divide), rint
// ties to even, float -> half and float -> bfloat16 round to nearest even.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

// Address spaces and the kernel attribute mean nothing on the CPU.
#define device
#define constant
#define thread

typedef uint32_t uint;
typedef uint16_t ushort;
struct uint3 {
    uint32_t x, y, z;
};

typedef _Float16 float16_t;  // g++ rounds every _Float16 operation to half, as Metal does
typedef _Float16 half;

// bfloat16: storage and conversions only (our kernels compute in float).
struct bfloat16_t {
    uint16_t bits;
    bfloat16_t() = default;
    bfloat16_t(float f) {  // round to nearest even, NaN kept quiet
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            bits = uint16_t((u >> 16) | 0x40u);
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            bits = uint16_t(u >> 16);
        }
    }
    operator float() const {
        uint32_t u = uint32_t(bits) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};

// as_type<T>(x): the same bits as another type of the same size.
template <class To, class From>
inline To as_type(From from) {
    static_assert(sizeof(To) == sizeof(From), "as_type needs types of one size");
    To to;
    std::memcpy(&to, &from, sizeof(To));
    return to;
}

namespace metal {
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline uint32_t min(uint32_t a, uint32_t b) { return a < b ? a : b; }
inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float abs(float a) { return std::fabs(a); }
inline float rint(float a) { return std::nearbyint(a); }  // the default mode: ties to even
inline float round(float a) { return std::round(a); }     // ties away from zero, as in Metal
inline float trunc(float a) { return std::trunc(a); }
inline float floor(float a) { return std::floor(a); }
inline float clamp(float x, float lo, float hi) { return std::fmin(std::fmax(x, lo), hi); }
namespace precise {
inline float divide(float a, float b) { return a / b; }  // IEEE: correctly rounded
}  // namespace precise
}  // namespace metal
