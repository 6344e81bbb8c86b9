// Elementwise and row-indexed kernels that glue the big ops together. bf16 storage,
// f32 math, one rounding to bf16 at the store (round to nearest even).
//
//   add_bf16:              y[i] = bf16(y[i] + x[i])                       residual adds
//   axpy_bf16:             y[i] = bf16(y[i] + f32(alpha * x[i]))          no FMA, as the
//                          CPU's `*y += alpha * x` rounds the product first
//   mul_bf16:              out[i] = bf16(a[i] * b[i])
//   dropout_bf16:          out[i] = keep(i) ? bf16(x[i] * scale) : 0,     scale = 1/(1-p)
//                          keep(i) = u(i) >= p, u(i) = (splitmix64(stream + i) >> 40) / 2^24
//                          which is src/backend/cpu/rng.rs `dropout_keep`, bit for bit.
//                          Backward is the same call on dy (the mask is recomputed).
//   gather_rows_bf16:      out[r, :] = x[rows[r], :]        rows[r] >= n_src: zero row
//   scatter_add_rows_bf16: dst[rows[r], :] = bf16(dst[rows[r], :] + src[r, :])
//                          rows must be distinct (no atomics; the caller guarantees it);
//                          rows[r] >= n_dst is skipped
//   copy_rows_bf16:        dst[dst_rows[r], :] = src[src_rows[r], :]     (KV-cache writes)
//                          pairs with either index out of range are skipped
//
// Flat kernels: grid-stride, 8 elements per thread per step, 16-byte vectors when every
// pointer is aligned. Row kernels: grid-stride over rows, the block's threads across a
// row, 16-byte vectors when cols % 8 == 0 and the bases are aligned. Out-of-range row
// indices never touch memory: the host cannot check device-side indices cheaply.
#include "common.cuh"

namespace palign {
namespace elementwise {

// SplitMix64 (Steele, Lea, Flood, OOPSLA 2014): must stay identical to cpu/rng.rs.
// uint64_t arithmetic wraps mod 2^64 like Rust's wrapping_add / wrapping_mul.
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The top 24 bits as a float are exact, and so is the scaling by 2^-24.
__device__ __forceinline__ bool dropout_keep(uint64_t stream, uint64_t i, float p) {
    const float u = (float)(uint32_t)(splitmix64(stream + i) >> 40) * (1.0f / 16777216.0f);
    return u >= p;
}

// out[i] = bf16(op(a[i], b[i])) over n elements; out may alias a.
template <typename Op>
__device__ __forceinline__ void binary(__nv_bfloat16 *out, const __nv_bfloat16 *a,
                                       const __nv_bfloat16 *b, int64_t n, Op op) {
    const bool vec = aligned16(out) && aligned16(a) && aligned16(b);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 8;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += stride) {
        if (vec && i + 8 <= n) {
            float x[8], y[8];
            load8(a + i, x);
            load8(b + i, y);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] = op(x[k], y[k]);
            store8(out + i, x);
        } else {
            for (int64_t j = i; j < i + 8 && j < n; j++) out[j] = f2bf(op(bf2f(a[j]), bf2f(b[j])));
        }
    }
}

// Copy one row of cols elements (bits unchanged).
__device__ __forceinline__ void copy_row(__nv_bfloat16 *dst, const __nv_bfloat16 *src,
                                         int32_t cols, bool vec) {
    if (vec) {
        const uint4 *s = reinterpret_cast<const uint4 *>(src);
        uint4 *d = reinterpret_cast<uint4 *>(dst);
        for (int32_t j = threadIdx.x; j < cols / 8; j += blockDim.x) d[j] = s[j];
    } else {
        for (int32_t j = threadIdx.x; j < cols; j += blockDim.x) dst[j] = src[j];
    }
}

} // namespace elementwise
} // namespace palign

extern "C" __global__ void add_bf16(AddBf16Params p) {
    palign::elementwise::binary(p.y, p.y, p.x, p.n, [](float y, float x) { return y + x; });
}

extern "C" __global__ void axpy_bf16(AxpyBf16Params p) {
    const float alpha = p.alpha;
    // __fmul_rn/__fadd_rn forbid contraction into an FMA, so the f32 result equals the CPU's.
    palign::elementwise::binary(p.y, p.y, p.x, p.n, [alpha](float y, float x) {
        return __fadd_rn(y, __fmul_rn(alpha, x));
    });
}

extern "C" __global__ void mul_bf16(MulBf16Params p) {
    palign::elementwise::binary(p.out, p.a, p.b, p.n, [](float a, float b) { return a * b; });
}

extern "C" __global__ void dropout_bf16(DropoutBf16Params p) {
    using namespace palign;
    const bool vec = aligned16(p.out) && aligned16(p.x);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 8;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < p.n; i += stride) {
        if (vec && i + 8 <= p.n) {
            float v[8];
            load8(p.x + i, v);
#pragma unroll
            for (int k = 0; k < 8; k++)
                v[k] = elementwise::dropout_keep(p.stream, (uint64_t)(i + k), p.p)
                           ? __fmul_rn(v[k], p.scale)
                           : 0.0f;
            store8(p.out + i, v);
        } else {
            for (int64_t j = i; j < i + 8 && j < p.n; j++)
                p.out[j] = f2bf(elementwise::dropout_keep(p.stream, (uint64_t)j, p.p)
                                    ? __fmul_rn(bf2f(p.x[j]), p.scale)
                                    : 0.0f);
        }
    }
}

extern "C" __global__ void gather_rows_bf16(GatherRowsParams p) {
    using namespace palign;
    const bool vec = (p.cols & 7) == 0 && aligned16(p.out) && aligned16(p.x);
    for (int64_t r = blockIdx.x; r < p.n_rows; r += gridDim.x) {
        const uint32_t s = p.rows[r];
        __nv_bfloat16 *dst = p.out + r * p.cols;
        if (s >= (uint32_t)p.n_src) {
            for (int32_t j = threadIdx.x; j < p.cols; j += blockDim.x) dst[j] = f2bf(0.0f);
        } else {
            elementwise::copy_row(dst, p.x + (int64_t)s * p.cols, p.cols, vec);
        }
    }
}

extern "C" __global__ void scatter_add_rows_bf16(ScatterAddRowsParams p) {
    using namespace palign;
    const bool vec = (p.cols & 7) == 0 && aligned16(p.dst) && aligned16(p.src);
    for (int64_t r = blockIdx.x; r < p.n_rows; r += gridDim.x) {
        const uint32_t d = p.rows[r];
        if (d >= (uint32_t)p.n_dst) continue;
        __nv_bfloat16 *dst = p.dst + (int64_t)d * p.cols;
        const __nv_bfloat16 *src = p.src + r * p.cols;
        if (vec) {
            for (int32_t j = threadIdx.x * 8; j < p.cols; j += blockDim.x * 8) {
                float a[8], b[8];
                load8(dst + j, a);
                load8(src + j, b);
#pragma unroll
                for (int k = 0; k < 8; k++) a[k] += b[k];
                store8(dst + j, a);
            }
        } else {
            for (int32_t j = threadIdx.x; j < p.cols; j += blockDim.x)
                dst[j] = f2bf(bf2f(dst[j]) + bf2f(src[j]));
        }
    }
}

extern "C" __global__ void copy_rows_bf16(CopyRowsParams p) {
    using namespace palign;
    const bool vec = (p.cols & 7) == 0 && aligned16(p.dst) && aligned16(p.src);
    for (int64_t r = blockIdx.x; r < p.n_rows; r += gridDim.x) {
        const uint32_t d = p.dst_rows[r], s = p.src_rows[r];
        if (d >= (uint32_t)p.n_dst || s >= (uint32_t)p.n_src) continue;
        elementwise::copy_row(p.dst + (int64_t)d * p.cols, p.src + (int64_t)s * p.cols, p.cols,
                              vec);
    }
}
