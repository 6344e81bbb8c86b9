// Shared by the NF4 harnesses (tools/prof/nf4_*.cu, which include kernels/nf4.cu first):
// random NF4 weights on the device, double-quantized like QLoRA's default.
#pragma once
#include "prof.cuh"

// One double-quantized weight [n, k] (blocksize 64, second level 256).
static Nf4WeightParams make_weight(int n, int k, uint32_t seed, int64_t *bytes) {
    const int64_t numel = (int64_t)n * k, blocks = numel / 64, blocks2 = (blocks + 255) / 256;
    uint8_t *packed, *q;
    float *code2, *absmax2;
    CK(cudaMalloc(&packed, numel / 2));
    CK(cudaMalloc(&q, blocks));
    CK(cudaMalloc(&code2, 256 * 4));
    CK(cudaMalloc(&absmax2, blocks2 * 4));
    prof_fill_u8<<<1024, 256>>>(packed, numel / 2, seed);
    prof_fill_u8<<<256, 256>>>(q, blocks, seed + 1);
    prof_fill<<<1, 256>>>(code2, 256, seed + 2, -1.0f, 1.0f);
    prof_fill<<<64, 256>>>(absmax2, blocks2, seed + 3, 0.01f, 0.02f);
    CK(cudaGetLastError());
    *bytes = numel / 2 + blocks + blocks2 * 4;
    return Nf4WeightParams{packed, nullptr, q,  code2, absmax2, numel, n, k, 6, 8,
                           0.05f,  0};
}

static void free_weight(const Nf4WeightParams &w) {
    CK(cudaFree((void *)w.packed));
    CK(cudaFree((void *)w.qabsmax));
    CK(cudaFree((void *)w.code2));
    CK(cudaFree((void *)w.absmax2));
}
