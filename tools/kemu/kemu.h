// kemu: palign's CUDA kernels compiled as host C++ and run on the CPU, for tests.
//
// kernels/*.cu are built by g++ with PALIGN_KEMU defined; this header stands in for
// the CUDA headers. Each CUDA thread of a block is a fiber with its own stack; a block
// runs on one OS thread, blocks of a launch spread over a few. __syncthreads and the
// warp-collective operations (shuffles, ldmatrix, mma.sync, wgmma) are barriers or
// deferred operations between the fibers, so code that is wrong on a GPU in the ways
// that matter for results fails here too: reading cp.async or wgmma data before waiting
// for it, writing a wgmma's accumulator (or its shared operands) while it is in flight
// (reading one early reads NaNs: kemu sets the value aside until the wait), a wgmma with no
// wgmma.fence since the block's start or the last wgmma.wait_group, the threads of a
// warpgroup at different wgmma.wait_group instructions (told apart by call site, so a
// wait the host compiler merges out of both arms of a branch is missed), a misaligned
// ldmatrix row or vector access, a warp operation with an exited
// lane or lanes at different operations, a deadlock, a block over __launch_bounds__,
// shared memory over the opt-in limit, an access past the end of an allocation, a race
// that the thread order decides (KEMU_ORDER=reverse), and in the racecheck build
// (build.sh --racecheck) any two accesses of different threads to one address, one a
// write, that no barrier orders (ThreadSanitizer). What it cannot tell: speed; the
// tensor cores' exact rounding; the weaker orderings of the GPU memory model (fences,
// acquire/release scopes: no kernel uses them); races between blocks whose linear
// indices are equal modulo the racecheck's OS threads (4, or KEMU_THREADS: one thread
// runs them in turn, so KEMU_THREADS=1 orders every block of a launch);
// static __shared__ memory read before it is written (it keeps the previous block's values).
//
// Together with driver.cpp / cublas.cpp it builds one library that answers to the names
// libcuda.so and libcublas.so, so the GPU tests run unchanged through cudarc
// (tools/kemu/build.sh, tools/kemu/run-gpu-tests.sh).
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

// ---------------------------------------------------------------- CUDA keywords
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------- vector types
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

// ---------------------------------------------------------------- bf16
// Bit patterns as cuda_bf16.h: round to nearest even, NaN -> 0x7fff (the canonical NaN).
struct __nv_bfloat16 {
    uint16_t x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    return std::bit_cast<float>(uint32_t(h.x) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if (std::isnan(f)) return {uint16_t(0x7fff)};
    u += 0x7fff + ((u >> 16) & 1);
    return {uint16_t(u >> 16)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
    return {__bfloat162float(h.x), __bfloat162float(h.y)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ---------------------------------------------------------------- math and bits
// The kernels are built with contraction on (nvcc's --fmad=true default: a*b + c may
// become one fma), so code that needs each operation rounded must say so with these,
// which never merge (CUDA Math API): the empty asm hides a product from the add after it.
inline float __fmul_rn(float a, float b) {
    float r = a * b;
    asm("" : "+x"(r));
    return r;
}
inline float __fadd_rn(float a, float b) {
    asm("" : "+x"(a), "+x"(b));
    return a + b;
}
inline float __fsub_rn(float a, float b) {
    asm("" : "+x"(a), "+x"(b));
    return a - b;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline float __uint_as_float(unsigned i) { return std::bit_cast<float>(i); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes {x (0..3), y (4..7)}.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = uint64_t(x) | uint64_t(y) << 32;
    unsigned r = 0;
    for (int n = 0; n < 4; n++) r |= unsigned(v >> (8 * ((s >> (4 * n)) & 7)) & 0xff) << (8 * n);
    return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
    return unsigned((uint64_t(a) * uint64_t(b)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    return unsigned(((uint64_t(hi) << 32) | lo) >> (shift & 31));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <class T> inline T __ldg(const T *p) { return *p; }

// CUDA's min/max overloads (host C++ has only std::min of one type).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
using std::fmaxf;
using std::fminf;

// ---------------------------------------------------------------- the emulator
namespace kemu {

constexpr int kDynSmemMax = 232448; // the largest opt-in (sm_90: 227 KiB)

// This OS thread's dynamic shared memory (one block at a time runs on it).
extern thread_local uint8_t dyn_smem[kDynSmemMax];

// The running fiber's coordinates and its launch's shape.
const uint3 &thread_idx();
const uint3 &block_idx();
const dim3 &block_dim();
const dim3 &grid_dim();
uint32_t dynamic_smem_bytes();

// Fails the launch (a GPU trap): the fiber stops, the launch returns an error.
[[noreturn]] void trap(const char *why);

void syncthreads();
void syncwarp(unsigned mask);
uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width);

// Warp-collective tensor-core operations and cp.async (runtime.cpp).
void ldmatrix(uint32_t *r, int count, bool trans, const void *row_addr);
void mma_m16n8k16_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
void cp_async(void *dst, const void *src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);

// sm_90a: the shared-window address of a dynamic shared memory pointer, and the wgmmas
// the kernels issue (128-byte-swizzled shared operands, K-major or, for the _t form's B,
// MN-major; A from shared memory or from registers; see runtime.cpp).
uint32_t smem_addr(const void *p);
void wgmma_m64n128k16(float *d, uint64_t desc_a, uint64_t desc_b, bool accumulate);
void wgmma_m64n256k16_rs(float *d, const uint32_t a[4], uint64_t desc_b);
void wgmma_m64n64k16_rs_t(float *d, const uint32_t a[4], uint64_t desc_b);
void wgmma_m64n64k16(float *d, uint64_t desc_a, uint64_t desc_b, bool accumulate, bool a_mn,
                     bool b_mn);
void wgmma_commit();
void wgmma_fence();
void wgmma_wait(int n);

template <class T> T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    b = shfl_xor_bits(mask, b, lane_mask, width);
    T r;
    std::memcpy(&r, &b, sizeof(T));
    return r;
}

template <class T> T atomic_add(T *p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}

} // namespace kemu

#define threadIdx (::kemu::thread_idx())
#define blockIdx (::kemu::block_idx())
#define blockDim (::kemu::block_dim())
#define gridDim (::kemu::grid_dim())

inline void __syncthreads() { kemu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { kemu::syncwarp(mask); }
[[noreturn]] inline void __trap() { kemu::trap("__trap()"); }
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return kemu::shfl_xor(mask, v, lane_mask, width);
}
// The vote as five butterfly shuffles: the same result for a full mask, the only mask the
// kernels pass.
inline int __any_sync(unsigned mask, int pred) {
    int v = pred != 0;
    for (int o = 1; o < 32; o <<= 1) v |= kemu::shfl_xor(mask, v, o, 32);
    return v;
}
inline float atomicAdd(float *p, float v) { return kemu::atomic_add(p, v); }
inline double atomicAdd(double *p, double v) { return kemu::atomic_add(p, v); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return kemu::atomic_add(p, v); }
inline int atomicAdd(int *p, int v) { return kemu::atomic_add(p, v); }
