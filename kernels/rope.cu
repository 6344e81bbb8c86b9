// Rotary position embedding, rotate-half form (HF LLaMA/Mistral, not interleaved),
// applied in place to Q and K in one launch (GQA: K has n_kv_heads <= n_q_heads).
//
// For a head vector x of length d, h = d/2, position p, i < h:
//   c = cos[p, i], s = sin[p, i]          (tables: angle = p * theta^(-2i/d), f32)
//   x'[i]     = x[i]     * c - x[i + h] * s
//   x'[i + h] = x[i + h] * c + x[i]     * s
// That is x * cat(c, c) + rotate_half(x) * cat(s, s), rotate_half(x) = cat(-x2, x1).
// The backward applies the transpose of the rotation: the same formula with s -> -s.
// Math in f32, one rounding to bf16 per element.
//
// One block per token; threads walk the (head, i) pairs of Q then K, so the loads of
// x[i] and x[i + h] are each coalesced.
#include "common.cuh"

namespace palign {
namespace rope {

__device__ __forceinline__ void rotate_heads(__nv_bfloat16 *row, int n_heads, int head_dim,
                                             const float *cos_row, const float *sin_row,
                                             float sign) {
    const int half = head_dim / 2;
    for (int idx = threadIdx.x; idx < n_heads * half; idx += blockDim.x) {
        const int h = idx / half;
        const int i = idx - h * half;
        __nv_bfloat16 *x = row + h * head_dim;
        const float c = cos_row[i];
        const float s = sign * sin_row[i];
        const float x1 = bf2f(x[i]);
        const float x2 = bf2f(x[i + half]);
        x[i] = f2bf(x1 * c - x2 * s);
        x[i + half] = f2bf(x2 * c + x1 * s);
    }
}

__device__ __forceinline__ void apply(const RopeParams &p, float sign) {
    const int t = blockIdx.x;
    if (t >= p.n_tokens) return;
    const uint32_t pos = p.positions[t];
    if (pos >= (uint32_t)p.max_pos) return;
    const int half = p.head_dim / 2;
    const float *c = p.cos + (int64_t)pos * half;
    const float *s = p.sin + (int64_t)pos * half;
    if (p.q != nullptr)
        rotate_heads(p.q + (int64_t)t * p.q_stride, p.n_q_heads, p.head_dim, c, s, sign);
    if (p.k != nullptr)
        rotate_heads(p.k + (int64_t)t * p.k_stride, p.n_kv_heads, p.head_dim, c, s, sign);
}

} // namespace rope
} // namespace palign

extern "C" __global__ void rope_forward_bf16(RopeParams p) { palign::rope::apply(p, 1.0f); }

extern "C" __global__ void rope_backward_bf16(RopeParams p) { palign::rope::apply(p, -1.0f); }
