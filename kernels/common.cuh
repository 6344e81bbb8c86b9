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

// ---------------------------------------------------------------- sm_90a wgmma
// Warpgroup MMAs (wgmma.mma_async, PTX ISA 8.0+), compiled only for the sm_90a image (and
// kemu); a kernel built on them wraps its body in PALIGN_SM90A_ONLY, so every other image
// gets a stub that traps (the launchers run them only on compute capability 9.0).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(PALIGN_KEMU)
#define PALIGN_SM90A_ONLY(call) call

// Matrix descriptors (PTX ISA, "Matrix Descriptor Format"): start address >> 4 in bits
// 0-13, leading-dimension byte offset >> 4 in 16-29, stride-dimension byte offset >> 4 in
// 32-45, base offset 0 (tiles on 1024-byte boundaries) in 49-51, swizzle 1 = 128 B in
// 62-63. Both forms below describe tiles of 128-byte rows, 8 rows a 1024-byte atom, in
// which 16-byte chunk c of row r sits at chunk c ^ (r % 8) (the hardware XORs address
// bits [4:6] with [7:9]).
// K-major (transpose flag 0): one row per m (A) or n (B), 64 k a row; the stride offset
// is the 1024 B from one 8-row group to the next; the leading offset is unused (1).
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) |
           ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
// MN-major (transpose flag 1, B only here): one row per k, 64 n a row, so a [keys][64]
// tile of V is B = V (n = head dim) as stored. PTX ISA canonical layout for 128B-swizzled
// MN-major operands, ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)): the stride offset goes from
// one 8-k group to the next (1024 B here), the leading offset from one 64-wide n block to
// the next. The kernels use n = 64 (one n block), so the leading offset never applies;
// it is set to 1024 B as well, which reads the same under either role.
__device__ __forceinline__ uint64_t wg_desc_mn(uint32_t saddr) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)(1024 >> 4) << 16) |
           ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

#ifndef PALIGN_KEMU
__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads.
__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accumulator reads/writes across a wgmma wait or fence.
template <int N> __device__ __forceinline__ void wg_pin(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// d[64] (+)= A(64 x 16) · B(128 x 16)ᵀ, both from shared memory, K-major (no transpose,
// no negation); `accumulate` false (scale-d 0) overwrites d.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db,
                                                 bool accumulate = true) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
          "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
          "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
          "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),
          "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
          "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate ? 1 : 0));
}

// d[128] += A(64 x 16) · B(256 x 16)ᵀ, A from registers: a[4] is this thread's fragment
// (mma.sync m16n8k16's A layout for rows 16·(warp % 4) .. +15 of the warpgroup's 64: reg
// 0 (row g, k 2t, 2t+1), reg 1 row g+8, regs 2/3 the same rows at k 2t+8, 2t+9), B from
// shared memory (K-major, 128B swizzle) through its descriptor. PTX ISA: wgmma.mma_async
// with a register A operand takes no transpose flag for A.
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4],
                                                    uint64_t db) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
          "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
          "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
          "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),
          "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
          "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]),
          "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),
          "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]),
          "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]),
          "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]),
          "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]),
          "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]),
          "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// d[32] (+)= A(64 x 16) · B(16 x 64), both from shared memory; TA / TB the transpose
// flags (1: that operand MN-major, wg_desc_mn; 0: K-major, wg_desc).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t da, uint64_t db,
                                                bool accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %35, %36;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
          "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
          "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
          "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate ? 1 : 0), "n"(TA), "n"(TB));
}

// d[32] += A(64 x 16) · B(16 x 64), A from registers (the fragment above), B from shared
// memory MN-major (transpose flag 1: wg_desc_mn), e.g. O += P·V with V as stored.
__device__ __forceinline__ void wgmma_m64n64k16_rs_t(float (&d)[32], const uint32_t (&a)[4],
                                                     uint64_t db) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
          "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
          "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
          "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

#else // the CPU emulator (tools/kemu): wgmma deferred to wgmma.wait_group, like cp.async

__device__ __forceinline__ void wg_fence() { kemu::wgmma_fence(); }
__device__ __forceinline__ void wg_commit() { kemu::wgmma_commit(); }
template <int N> __device__ __forceinline__ void wg_wait() { kemu::wgmma_wait(N); }
__device__ __forceinline__ void fence_proxy_async_smem() {}
template <int N> __device__ __forceinline__ void wg_pin(float (&)[N]) {}
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db,
                                                 bool accumulate = true) {
    kemu::wgmma_m64n128k16(d, da, db, accumulate);
}
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4],
                                                    uint64_t db) {
    kemu::wgmma_m64n256k16_rs(d, a, db);
}
__device__ __forceinline__ void wgmma_m64n64k16_rs_t(float (&d)[32], const uint32_t (&a)[4],
                                                     uint64_t db) {
    kemu::wgmma_m64n64k16_rs_t(d, a, db);
}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t da, uint64_t db,
                                                bool accumulate) {
    kemu::wgmma_m64n64k16(d, da, db, accumulate, TA, TB);
}

#endif // PALIGN_KEMU (wgmma)

#else
#define PALIGN_SM90A_ONLY(call) __trap()
#endif // __CUDA_ARCH_FEAT_SM90_ALL || PALIGN_KEMU

} // namespace palign
