// Embedding gather (forward only: the embedding table is frozen).
//
//   out[t, j] = table[ids[t], j]      t < n_tokens, j < hidden
//
// Pure copy, bf16 in and out. One block per token; 16-byte vector copies when the
// row length and both row pointers allow it. Ids >= vocab give a zero row instead of
// an out-of-bounds read (the host validates ids; this only keeps a bad id harmless).
#include "common.cuh"

extern "C" __global__ void embedding_forward_bf16(EmbeddingParams p) {
    const int t = blockIdx.x;
    if (t >= p.n_tokens) return;
    const uint32_t id = p.ids[t];
    __nv_bfloat16 *dst = p.out + (int64_t)t * p.hidden;
    if (id >= (uint32_t)p.vocab) {
        for (int j = threadIdx.x; j < p.hidden; j += blockDim.x) dst[j] = palign::f2bf(0.0f);
        return;
    }
    const __nv_bfloat16 *src = p.table + (int64_t)id * p.hidden;
    if (p.hidden % 8 == 0 && palign::aligned16(src) && palign::aligned16(dst)) {
        const uint4 *s = reinterpret_cast<const uint4 *>(src);
        uint4 *d = reinterpret_cast<uint4 *>(dst);
        for (int j = threadIdx.x; j < p.hidden / 8; j += blockDim.x) d[j] = s[j];
    } else {
        for (int j = threadIdx.x; j < p.hidden; j += blockDim.x) dst[j] = src[j];
    }
}
