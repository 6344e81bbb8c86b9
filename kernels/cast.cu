// Dtype casts, elementwise over n values:
//   bf16 -> f32: exact (bf16 is the top half of an f32)
//   f32 -> bf16: round to nearest even (torch's .to(torch.bfloat16); NaN stays NaN)
#include "common.cuh"

extern "C" __global__ void cast_bf16_to_f32(CastBf16ToF32Params p) {
    using namespace palign;
    const bool vec = aligned16(p.in) && aligned16(p.out);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 8;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < p.n; i += stride) {
        if (vec && i + 8 <= p.n) {
            float v[8];
            load8(p.in + i, v);
            float4 *o = reinterpret_cast<float4 *>(p.out + i);
            o[0] = make_float4(v[0], v[1], v[2], v[3]);
            o[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            for (int64_t j = i; j < i + 8 && j < p.n; j++) p.out[j] = bf2f(p.in[j]);
        }
    }
}

extern "C" __global__ void cast_f32_to_bf16(CastF32ToBf16Params p) {
    using namespace palign;
    const bool vec = aligned16(p.in) && aligned16(p.out);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 8;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < p.n; i += stride) {
        if (vec && i + 8 <= p.n) {
            const float4 *in = reinterpret_cast<const float4 *>(p.in + i);
            const float4 a = in[0], b = in[1];
            const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            store8(p.out + i, v);
        } else {
            for (int64_t j = i; j < i + 8 && j < p.n; j++) p.out[j] = f2bf(p.in[j]);
        }
    }
}
