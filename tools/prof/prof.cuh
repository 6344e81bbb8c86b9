// Shared by the tools/prof harnesses: error checks and deterministic fills (a hash of the
// index, so no host-side random data has to be copied over).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_bf16.h>

#define CK(x)                                                                                 \
    do {                                                                                      \
        cudaError_t e = (x);                                                                  \
        if (e != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

// Whether the GPU check's runner saw the test binary `tests` time out (PALIGN_GPU_HUNG,
// tools/gpu-check.sh): the harness then leaves out the sm_90a wgmma kernels it tests.
inline bool prof_tests_hung(const char *tests) {
    const char *v = getenv("PALIGN_GPU_HUNG");
    if (!v) return false;
    const size_t n = strlen(tests);
    for (const char *p = strstr(v, tests); p; p = strstr(p + 1, tests))
        if ((p == v || p[-1] == ' ') && (p[n] == '\0' || p[n] == ' ')) return true;
    return false;
}

// A 24-bit hash of (i, seed), uniform enough for timing data.
__device__ __forceinline__ uint32_t prof_hash(int64_t i, uint32_t seed) {
    uint32_t h = (uint32_t)i * 2654435761u + seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    return h & 0xFFFFFFu;
}

// x[i] in [lo, hi) for i < n (grid-stride).
template <class T>
__global__ void prof_fill(T *x, int64_t n, uint32_t seed, float lo, float hi) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = (T)(lo + (hi - lo) * (prof_hash(i, seed) / 16777216.0f));
}

// Raw bytes (packed NF4 codes, 8-bit scale codes).
__global__ void prof_fill_u8(uint8_t *x, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = (uint8_t)prof_hash(i, seed);
}
