// kemu's cuBLAS: cublasGemmEx (what src/backend/cuda/blas.rs calls) over host memory.
// Column-major as cuBLAS: C(m x n) = alpha·op(A)·op(B) + beta·C; bf16/f16/f32 inputs,
// f32 sums, rounded once to C's type; beta = 0 never reads C (it may hold NaN).
#include <algorithm>
#include <thread>
#include <vector>

#include "kemu.h"

namespace {

using Status = int;
constexpr Status OK = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15;
constexpr int R_32F = 0, R_16F = 2, R_16BF = 14;

int handle_token;

float f16_to_f32(uint16_t h) {
    const int s = h >> 15, e = (h >> 10) & 31, f = h & 1023;
    float v = e == 0 ? std::ldexp(float(f), -24)
              : e == 31 ? (f ? NAN : INFINITY)
                        : std::ldexp(float(f | 1024), e - 25);
    return s ? -v : v;
}

float load(const void *p, int type, size_t i) {
    switch (type) {
    case R_32F: return static_cast<const float *>(p)[i];
    case R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t *>(p)[i]);
    }
}

} // namespace

extern "C" {

Status cublasCreate_v2(void **h) {
    *h = &handle_token;
    return OK;
}
Status cublasDestroy_v2(void *) { return OK; }
Status cublasSetStream_v2(void *, void *) { return OK; }
Status cublasSetWorkspace_v2(void *, void *, size_t) { return OK; }
Status cublasSetMathMode(void *, int) { return OK; }

Status cublasGemmEx(void *, int transa, int transb, int m, int n, int k, const void *alpha,
                    const void *A, int atype, int lda, const void *B, int btype, int ldb,
                    const void *beta, void *C, int ctype, int ldc, int, int) {
    for (int t : {atype, btype})
        if (t != R_32F && t != R_16BF && t != R_16F) return NOT_SUPPORTED;
    if (ctype != R_32F && ctype != R_16BF) return NOT_SUPPORTED;
    if (m < 0 || n < 0 || k < 0) return INVALID_VALUE;
    // Leading dimensions at least the stored rows, as cuBLAS checks (else INVALID_VALUE).
    if (lda < std::max(1, transa ? k : m) || ldb < std::max(1, transb ? n : k) ||
        ldc < std::max(1, m))
        return INVALID_VALUE;
    const float al = *static_cast<const float *>(alpha), be = *static_cast<const float *>(beta);
    // op(A) as rows [m][k] and op(B) as columns [n][k], in f32 (the inputs are exact in
    // f32); then each C element is a contiguous dot product, summed in f32 as cuBLAS's
    // CUBLAS_COMPUTE_32F does (in its own order).
    std::vector<float> a(size_t(m) * k), b(size_t(n) * k);
    for (int i = 0; i < m; i++)
        for (int l = 0; l < k; l++)
            a[size_t(i) * k + l] =
                load(A, atype, transa ? size_t(l) + size_t(i) * lda : size_t(i) + size_t(l) * lda);
    for (int j = 0; j < n; j++)
        for (int l = 0; l < k; l++)
            b[size_t(j) * k + l] =
                load(B, btype, transb ? size_t(j) + size_t(l) * ldb : size_t(l) + size_t(j) * ldb);
    auto columns = [&](int j0, int j1) {
        for (int j = j0; j < j1; j++) {
            const float *bj = &b[size_t(j) * k];
            for (int i = 0; i < m; i++) {
                const float *ai = &a[size_t(i) * k];
                float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int l = 0;
                for (; l + 8 <= k; l += 8)
                    for (int e = 0; e < 8; e++) part[e] += ai[l + e] * bj[l + e];
                float acc = 0;
                for (; l < k; l++) acc += ai[l] * bj[l];
                for (int e = 0; e < 8; e++) acc += part[e];
                const size_t ci = size_t(i) + size_t(j) * ldc;
                float v = al * acc;
                if (be != 0.0f) v += be * load(C, ctype, ci);
                if (ctype == R_32F)
                    static_cast<float *>(C)[ci] = v;
                else
                    static_cast<__nv_bfloat16 *>(C)[ci] = __float2bfloat16_rn(v);
            }
        }
    };
    const int threads = int(std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()),
                                             size_t(n) * m * k / (1 << 20) + 1));
    std::vector<std::thread> pool;
    const int per = (n + threads - 1) / std::max(threads, 1);
    for (int t = 1; t < threads; t++) {
        const int j0 = t * per, j1 = std::min(n, j0 + per);
        if (j0 < j1) pool.emplace_back(columns, j0, j1);
    }
    columns(0, std::min(n, per));
    for (auto &t : pool) t.join();
    return OK;
}

} // extern "C"
