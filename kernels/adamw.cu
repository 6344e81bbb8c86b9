// Fused AdamW over every adapter tensor in one launch (torch.optim.AdamW semantics,
// torch/optim/adam.py _single_tensor_adam with decoupled weight decay), f32 throughout:
//   g  = grad * scale                      scale = clip coefficient, or 1
//   p  = p * (1 - lr*wd)                   decoupled decay, applied first
//   m  = m + (1 - b1) * (g - m)            exp_avg.lerp_(g, 1 - b1) (|1-b1| < 0.5 form)
//   v  = v * b2 + (1 - b2) * g * g         exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps
//   p  = p - (lr / (1 - b1^t)) * m / denom
// The step-dependent scalars arrive precomputed (AdamWParams). One block per chunk of
// the host-built TensorChunk table; float4 accesses when the chunk allows.
#include "common.cuh"

namespace palign {
namespace adamw {

// torch's lerp (ATen/native/Lerp.h): the form depends on |w| for accuracy.
__device__ __forceinline__ float lerp(float start, float end, float w) {
    return fabsf(w) < 0.5f ? __fadd_rn(start, __fmul_rn(w, __fsub_rn(end, start)))
                           : __fsub_rn(end, __fmul_rn(__fsub_rn(end, start), __fsub_rn(1.0f, w)));
}

__device__ __forceinline__ void update(const AdamWParams &a, float scale, float &p, float g,
                                       float &m, float &v) {
    // _rn intrinsics forbid FMA contraction, so each operation rounds exactly as in the
    // CPU reference (src/backend/cpu/optim.rs); sqrtf and '/' are IEEE (no fast math).
    g = __fmul_rn(g, scale);
    p = __fmul_rn(p, a.decay);
    m = lerp(m, g, a.one_minus_beta1);
    v = __fadd_rn(__fmul_rn(v, a.beta2), __fmul_rn(__fmul_rn(a.one_minus_beta2, g), g));
    const float denom = __fadd_rn(sqrtf(v) / a.bc2_sqrt, a.eps);
    p = __fadd_rn(p, __fmul_rn(-a.step_size, m / denom));
}

} // namespace adamw
} // namespace palign

extern "C" __global__ void adamw_step_f32(AdamWParams a) {
    using namespace palign;
    if ((int)blockIdx.x >= a.n_chunks) return;
    const TensorChunk c = a.chunks[blockIdx.x];
    const float scale = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
    const bool vec = c.n % 4 == 0 && aligned16(c.param) && aligned16(c.grad) &&
                     aligned16(c.m) && aligned16(c.v);
    if (vec) {
        float4 *p4 = reinterpret_cast<float4 *>(c.param);
        const float4 *g4 = reinterpret_cast<const float4 *>(c.grad);
        float4 *m4 = reinterpret_cast<float4 *>(c.m);
        float4 *v4 = reinterpret_cast<float4 *>(c.v);
        for (int64_t i = threadIdx.x; i < c.n / 4; i += blockDim.x) {
            float4 p = p4[i], m = m4[i], v = v4[i];
            const float4 g = g4[i];
            adamw::update(a, scale, p.x, g.x, m.x, v.x);
            adamw::update(a, scale, p.y, g.y, m.y, v.y);
            adamw::update(a, scale, p.z, g.z, m.z, v.z);
            adamw::update(a, scale, p.w, g.w, m.w, v.w);
            p4[i] = p;
            m4[i] = m;
            v4[i] = v;
        }
    } else {
        for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x)
            adamw::update(a, scale, c.param[i], c.grad[i], c.m[i], c.v[i]);
    }
}
