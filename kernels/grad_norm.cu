// Global gradient L2 norm and clipping (torch.nn.utils.clip_grad_norm_, norm_type 2):
//   total = sqrt( sum over all tensors and elements of g^2 )
//   coef  = max_norm / (total + 1e-6);   grads *= coef   only when coef < 1
// Three deterministic launches, no atomics, nothing read back to the host:
//   grad_norm_partial_f32   one block per chunk -> partial[chunk] = sum g^2 (f32)
//   grad_norm_finalize_f32  one block           -> out[0] = total, out[1] = min(1, coef)
//   grad_clip_apply_f32     one block per chunk -> g *= out[1]
// AdamW can instead read out[1] as its grad_scale and skip the third launch.
#include "common.cuh"

extern "C" __global__ void grad_norm_partial_f32(GradNormParams p) {
    using namespace palign;
    if ((int)blockIdx.x >= p.n_chunks) return;
    const TensorChunk c = p.chunks[blockIdx.x];
    float ss = 0.0f;
    if (c.n % 4 == 0 && aligned16(c.grad)) {
        const float4 *g4 = reinterpret_cast<const float4 *>(c.grad);
        for (int64_t i = threadIdx.x; i < c.n / 4; i += blockDim.x) {
            const float4 g = g4[i];
            ss += g.x * g.x + g.y * g.y + g.z * g.z + g.w * g.w;
        }
    } else {
        for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x) ss += c.grad[i] * c.grad[i];
    }
    ss = block_sum(ss);
    if (threadIdx.x == 0) p.partial[blockIdx.x] = ss;
}

extern "C" __global__ void grad_norm_finalize_f32(GradNormParams p) {
    using namespace palign;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < p.n_chunks; i += blockDim.x) ss += p.partial[i];
    ss = block_sum(ss);
    if (threadIdx.x == 0) {
        const float total = sqrtf(ss);
        const float coef = p.max_norm / (total + 1e-6f);
        p.out[0] = total;
        p.out[1] = coef < 1.0f ? coef : 1.0f;
    }
}

extern "C" __global__ void grad_clip_apply_f32(GradNormParams p) {
    using namespace palign;
    if ((int)blockIdx.x >= p.n_chunks) return;
    const float coef = p.out[1];
    if (coef >= 1.0f) return;
    const TensorChunk c = p.chunks[blockIdx.x];
    for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x) c.grad[i] *= coef;
}
