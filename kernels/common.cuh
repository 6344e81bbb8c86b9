// Shared device helpers: bf16 <-> f32, 16-byte vector loads, warp/block sums.
//
// build.rs compiles every kernels/*.cu as ONE translation unit (a generated file that
// #includes them all), so the runtime loads a single module. Consequence for authors:
// helpers private to a .cu file go in `namespace palign::<file>` to avoid clashes, and
// kernels are `extern "C"` so their names in the fatbin are the plain names.
#pragma once

#include <cuda_bf16.h>
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

} // namespace palign
