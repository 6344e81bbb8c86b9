// RMSNorm forward and backward (input gradient only: the norm weight is frozen).
//
// Forward, per row x of length n (HF LlamaRMSNorm, f32 math, bf16 storage):
//   rstd  = 1 / sqrt(mean(x^2) + eps)            saved in f32 for the backward
//   xhat  = x * rstd
//   y     = bf16( w * bf16(xhat) )               HF casts xhat to bf16 before * w
// Backward, with g = dy * w:
//   dx    = rstd * (g - xhat * mean(g * xhat))
// (from d/dx of x * (mean(x^2)+eps)^(-1/2); the bf16 cast of xhat passes the gradient
// through unchanged). With accumulate != 0, dx is added to what dx already holds,
// which is how the residual stream's gradient is summed.
//
// One block per row; the row is read twice (sum, then normalize), the second time
// mostly from L1/L2.
#include "common.cuh"

extern "C" __global__ void rmsnorm_forward_bf16(RmsNormForwardParams p) {
    using namespace palign;
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    const int n = p.cols;
    const __nv_bfloat16 *x = p.x + (int64_t)r * n;
    __nv_bfloat16 *y = p.y + (int64_t)r * n;
    const bool vec = n % 8 == 0 && aligned16(x) && aligned16(y) && aligned16(p.weight);

    float ss = 0.0f;
    if (vec) {
        for (int j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
            float v[8];
            load8(x + j, v);
#pragma unroll
            for (int k = 0; k < 8; k++) ss += v[k] * v[k];
        }
    } else {
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float v = bf2f(x[j]);
            ss += v * v;
        }
    }
    ss = block_sum(ss);
    const float rstd = 1.0f / sqrtf(ss / (float)n + p.eps);
    if (p.rstd != nullptr && threadIdx.x == 0) p.rstd[r] = rstd;

    if (vec) {
        for (int j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
            float v[8], w[8];
            load8(x + j, v);
            load8(p.weight + j, w);
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = w[k] * round_bf16(v[k] * rstd);
            store8(y + j, v);
        }
    } else {
        for (int j = threadIdx.x; j < n; j += blockDim.x)
            y[j] = f2bf(bf2f(p.weight[j]) * round_bf16(bf2f(x[j]) * rstd));
    }
}

extern "C" __global__ void rmsnorm_backward_bf16(RmsNormBackwardParams p) {
    using namespace palign;
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    const int n = p.cols;
    const int64_t off = (int64_t)r * n;
    const __nv_bfloat16 *x = p.x + off;
    const __nv_bfloat16 *dy = p.dy + off;
    __nv_bfloat16 *dx = p.dx + off;
    const float rstd = p.rstd[r];
    const bool vec = n % 8 == 0 && aligned16(x) && aligned16(dy) && aligned16(dx) &&
                     aligned16(p.weight);

    // dot = sum_j g_j * xhat_j
    float dot = 0.0f;
    if (vec) {
        for (int j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
            float xv[8], gv[8], wv[8];
            load8(x + j, xv);
            load8(dy + j, gv);
            load8(p.weight + j, wv);
#pragma unroll
            for (int k = 0; k < 8; k++) dot += gv[k] * wv[k] * (xv[k] * rstd);
        }
    } else {
        for (int j = threadIdx.x; j < n; j += blockDim.x)
            dot += bf2f(dy[j]) * bf2f(p.weight[j]) * (bf2f(x[j]) * rstd);
    }
    dot = block_sum(dot);
    const float mean_dot = dot / (float)n;

    if (vec) {
        for (int j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
            float xv[8], gv[8], wv[8], out[8];
            load8(x + j, xv);
            load8(dy + j, gv);
            load8(p.weight + j, wv);
            if (p.accumulate) load8(dx + j, out);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float d = rstd * (gv[k] * wv[k] - xv[k] * rstd * mean_dot);
                out[k] = p.accumulate ? out[k] + d : d;
            }
            store8(dx + j, out);
        }
    } else {
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float xv = bf2f(x[j]);
            float d = rstd * (bf2f(dy[j]) * bf2f(p.weight[j]) - xv * rstd * mean_dot);
            if (p.accumulate) d += bf2f(dx[j]);
            dx[j] = f2bf(d);
        }
    }
}
