// Shared device helpers: bf16 <-> f32, 16-byte vector loads, warp/block sums, and the
// PTX primitives of the tensor-core kernels (cp.async, ldmatrix, mma.sync).
//
// build.rs compiles every kernels/*.cu as ONE translation unit (a generated file that
// #includes them all), so the runtime loads a single module. Consequence for authors:
// helpers private to a .cu file go in `namespace palign::<file>` to avoid clashes, and
// kernels are `extern "C"` so their names in the fatbin are the plain names.
#pragma once

#ifdef PALIGN_KEMU
#include "kemu.h" // the CPU emulator's stand-in for the CUDA headers (tools/kemu)
#else
#include <cuda_bf16.h>
#endif
#include <stdint.h>

#include "params.h"

namespace palign {

__device__ __forceinline__ float bf2f(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as torch's .to(bfloat16) and half::bf16::from_f32.
__device__ __forceinline__ __nv_bfloat16 f2bf(float x) { return __float2bfloat16_rn(x); }

// The value an f32 takes after a round trip through bf16 (emulates a bf16 tensor).
__device__ __forceinline__ float round_bf16(float x) { return bf2f(f2bf(x)); }

__device__ __forceinline__ bool aligned16(const void *p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// 8 bf16 = 16 bytes: one vector load/store. Caller checks alignment and bounds.
__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float out[8]) {
    uint4 u = *reinterpret_cast<const uint4 *>(p);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 f = __bfloat1622float2(h[k]);
        out[2 * k] = f.x;
        out[2 * k + 1] = f.y;
    }
}

__device__ __forceinline__ void store8(__nv_bfloat16 *p, const float in[8]) {
    uint4 u;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&u);
#pragma unroll
    for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(in[2 * k], in[2 * k + 1]);
    *reinterpret_cast<uint4 *>(p) = u;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32.
// The fixed tree makes the result deterministic. Safe to call repeatedly in a kernel.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // an earlier call may still be reading `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < n_warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}

// ---------------------------------------------------------------- PTX primitives
// The tensor-core kernels' building blocks (sm_80+; PTX ISA: cp.async, ldmatrix, mma).
// All inline PTX outside the sm_90a-only wgmma path lives here, so that the CPU emulator
// (tools/kemu, PALIGN_KEMU) can stand in for it with the same semantics.

// A kernel's dynamic shared memory, declared in the kernel's body. kemu: a reference to
// this OS thread's kemu::dyn_smem (a local: no thread-local initializer for fibers to share).
#ifdef PALIGN_KEMU
#define PALIGN_DYNAMIC_SMEM(name)                                                          \
    uint8_t(&name)[::kemu::kDynSmemMax] = ::kemu::dyn_smem;                                 \
    (void)name /* a statement: at namespace scope, a compile error */
#else
#define PALIGN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) uint8_t name[]
#endif

#ifndef PALIGN_KEMU
// The dynamic shared memory this launch got (kernels trap if the launcher gave too little).
__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
    uint32_t n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronous; !valid writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
// 4 bytes global -> shared, asynchronous (cp.async.ca: the .cg form takes only 16).
__device__ __forceinline__ void cp_async4(void *dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// A 16-entry f32 table in shared memory at a 256-byte aligned address: entry at byte
// offset (byte j of `offsets`), a multiple of 4 below 64. One prmt forms the address
// (the offset byte under the base's upper three bytes), so a lookup takes no add.
__device__ __forceinline__ bool smem_aligned256(const void *p) { return (smem_addr(p) & 255u) == 0; }
__device__ __forceinline__ float lut_ld(const float *lut, uint32_t offsets, int j) {
    const uint32_t a = __byte_perm(offsets, smem_addr(lut), 0x7650u | (uint32_t)j);
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(a));
    return v;
}
// The same table's entry at byte offset x & 0x3C: one lop3 forms the address (mask and
// OR into the aligned base), for a code whose 4·code is not in a byte of its own.
__device__ __forceinline__ float lut_ld_masked(const float *lut, uint32_t x) {
    const uint32_t a = (x & 0x3Cu) | smem_addr(lut);
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(a));
    return v;
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, lane l gets
// in r[i] the pair (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
// Transposed: lane l gets (rows 2(l%4), 2(l%4)+1; col l/4) of matrix i.
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t r[2], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(p)));
}

// c[16x8] += a[16x16] · b[16x8], bf16 inputs, f32 accumulators. Fragments (g = lane/4,
// t = lane%4): a = (g, 2t..) (g+8, 2t..) (g, 2t+8..) (g+8, 2t+8..); b = (k 2t.., n g),
// (k 2t+8.., n g); c = (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
__device__ __forceinline__ void mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
    mma_bf16(c, a[0], a[1], a[2], a[3], b0, b1);
}

// 2^x by the SFU alone (subnormal results flush to 0; 2^-inf = +0).
__device__ __forceinline__ float ex2_approx_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

#else // PALIGN_KEMU: the same primitives on the emulator (tools/kemu/runtime.cpp)

__device__ __forceinline__ uint32_t dynamic_smem_bytes() { return kemu::dynamic_smem_bytes(); }
__device__ __forceinline__ uint32_t smem_addr(const void *p) { return kemu::smem_addr(p); }
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    kemu::cp_async(dst, src, 16, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async4(void *dst, const void *src) {
    kemu::cp_async(dst, src, 4, 4);
}
__device__ __forceinline__ void cp_async_commit() { kemu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { kemu::cp_async_wait(N); }
__device__ __forceinline__ bool smem_aligned256(const void *p) {
    return (reinterpret_cast<uintptr_t>(p) & 255u) == 0;
}
__device__ __forceinline__ float lut_ld(const float *lut, uint32_t offsets, int j) {
    const uint32_t off = (offsets >> (8 * j)) & 255u;
    return *reinterpret_cast<const float *>(reinterpret_cast<const char *>(lut) + off);
}
__device__ __forceinline__ float lut_ld_masked(const float *lut, uint32_t x) {
    return *reinterpret_cast<const float *>(reinterpret_cast<const char *>(lut) + (x & 0x3Cu));
}
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void *p) {
    kemu::ldmatrix(r, 4, false, p);
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void *p) {
    kemu::ldmatrix(r, 4, true, p);
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t r[2], const void *p) {
    kemu::ldmatrix(r, 2, true, p);
}
__device__ __forceinline__ void mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
    const uint32_t a[4] = {a0, a1, a2, a3};
    kemu::mma_m16n8k16_bf16(c, a, b0, b1);
}
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
    kemu::mma_m16n8k16_bf16(c, a, b0, b1);
}
__device__ __forceinline__ float ex2_approx_ftz(float x) {
    const float y = std::exp2(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

#endif // PALIGN_KEMU

} // namespace palign
