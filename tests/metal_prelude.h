// What MLX's utils.h and the Metal standard library give our kernels, in C++, so that the text
// MLX generates compiles unchanged with g++ and runs on the CPU (tests/metal_harness.py).
// Only the subset our kernels use is here (metal_kernels/README.md lists it); a kernel that needs
// more brings its faithful emulation here with it.
//
// Faithful means bit for bit under the rules of metal_kernels/README.md: float arithmetic with
// contraction off (-ffp-contract=off), correctly rounded division (metal::precise::divide), rint
// ties to even, float -> half and float -> bfloat16 round to nearest even.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

// Address spaces and the kernel attribute mean nothing on the CPU. Threadgroup memory declared
// in a kernel body becomes a static of the kernel function: one copy, shared by the threads of
// the threadgroup, which run one threadgroup at a time.
#define device
#define constant
#define thread
#define threadgroup static

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

// --- Threads of one threadgroup as fibers, on a fixed schedule -------------------------------
//
// Each thread runs as a fiber (ucontext) on one OS thread. The scheduler resumes them in index
// order; a thread runs until it reaches a barrier or ends, so results never depend on timing and
// a missing barrier shows: thread 0 then reads what threads 1.. have not written yet. A barrier
// opens when every thread of the threadgroup has reached it; threads that end while others wait
// at a barrier are reported (undefined behaviour on the GPU).
namespace emu {
struct Fiber {
    ucontext_t context;
    bool done = false;
    bool waiting = false;
};

// Fiber stacks, kept from one threadgroup to the next (allocating and clearing them for each
// threadgroup cost more than running the kernels).
inline char* stack(unsigned t, size_t size) {
    static std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() <= t) {
        stacks.emplace_back(new char[size]);
    }
    return stacks[t].get();
}

struct Threadgroup {
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    int current = -1;
    std::function<void(int)> body;
};

constexpr size_t STACK = 1 << 16;  // per thread: our kernels keep at most a few KiB of locals

inline Threadgroup*& active() {
    static Threadgroup* group = nullptr;
    return group;
}

inline void barrier() {
    Threadgroup* g = active();
    Fiber& f = g->fibers[g->current];
    f.waiting = true;
    swapcontext(&f.context, &g->scheduler);
}

inline void entry() {
    Threadgroup* g = active();
    g->body(g->current);
    g->fibers[g->current].done = true;  // uc_link returns to the scheduler
}

// Runs `body(t)` for t in [0, n) as one threadgroup; false when a barrier was left waiting.
inline bool run_threadgroup(unsigned n, std::function<void(int)> body) {
    Threadgroup g;
    g.fibers.resize(n);
    g.body = std::move(body);
    active() = &g;
    for (unsigned t = 0; t < n; t++) {
        Fiber& f = g.fibers[t];
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = stack(t, STACK);
        f.context.uc_stack.ss_size = STACK;
        f.context.uc_link = &g.scheduler;
        makecontext(&f.context, entry, 0);
    }
    bool ok = true;
    for (;;) {
        for (unsigned t = 0; t < n; t++) {
            if (!g.fibers[t].done && !g.fibers[t].waiting) {
                g.current = int(t);
                swapcontext(&g.scheduler, &g.fibers[t].context);
            }
        }
        unsigned done = 0, waiting = 0;
        for (const Fiber& f : g.fibers) {
            done += f.done;
            waiting += !f.done && f.waiting;
        }
        if (done == n) {
            break;
        }
        if (done > 0) {  // some ended while others wait: the barrier can never open
            ok = false;
            break;
        }
        for (Fiber& f : g.fibers) {
            f.waiting = false;  // every thread is at the barrier: open it
        }
    }
    active() = nullptr;
    return ok;
}
}  // namespace emu

namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
}  // namespace metal
using metal::mem_flags;
inline void threadgroup_barrier(mem_flags) { emu::barrier(); }
