// Target-token log-probabilities through the lm_head, and the DPO loss, on the device.
//
// Math (row i of hidden X [T, H], lm_head W [V, H], target t_i, logits z_i = X_i·Wᵀ):
//   lse_i  = log Σ_j exp(z_ij)              (with the running max m: m + log Σ exp(z - m))
//   logp_i = z_i,t_i − lse_i
//   backward, given g_i = ∂L/∂logp_i:  ∂L/∂z_ij = g_i·(onehot_ij − exp(z_ij − lse_i)),
//   ∂L/∂X_i = Σ_j ∂L/∂z_ij · W_j  (a GEMM, done by cuBLAS).
// Running (max, sum) pairs merge as (m, s) ⊕ (m', s') = (M, s·e^(m−M) + s'·e^(m'−M)),
// M = max(m, m'); an empty set is (−inf, 0). (The online-softmax identity, Milakov &
// Gimelshein 2018; facts only.) Target ids ≥ V are the caller's bug: logp comes out NaN.
//
// Kernels (extern "C"):
//   logsoftmax_gather_bf16    one block per row of a bf16 logits chunk [rows, V] (from
//                             cuBLAS): lse from the bf16 logits, the target logit in f32
//                             from X_i·W_t (H products; a bf16 logit would carry an extra
//                             rounding of up to 2^-9·|z|), logp = that − lse.
//   logsoftmax_backward_bf16  in place on a bf16 logits chunk: z → ∂L/∂z (bf16). lse is
//                             the forward's when given, else recomputed from the chunk.
//   scale_rows_bf16           out_i = bf16(g_i · G_i): the training forward can save
//                             G_i = ∂logp_i/∂X_i = (onehot − softmax_i)·W (the backward
//                             kernel with g = 1, then cuBLAS), so the backward is this
//                             row scale instead of a second logits GEMM.
//   logprob_fused_fwd_bf16    tensor-core tiles of z (128 rows × 128 vocab, mma.sync
//                             m16n8k16 bf16 → f32) folded at once into per-row running
//                             (max, sum) and the target logit; z never reaches memory. The
//                             vocab is split over blocks; each writes its (max, sum).
//   logprob_fused_combine     merges the splits' (max, sum): lse and logp per row.
//   argmax_rows_bf16          greedy decoding's token per logits row: the largest value's
//                             lowest index (torch.argmax's pick: a NaN above any number),
//                             so a decode step copies rows ids to the host, not rows × V.
//   seq_logp_sum_f32          per-sequence Σ (or mean) of token log-probs, f64 accumulation.
//   dpo_loss_f32              per pair: TRL's DPO loss (sigmoid with label smoothing, or
//                             IPO), rewards β(π − ref), ∂loss/∂π, and ∂/∂ token log-probs.
// The fused kernel keeps (max, sum) in base 2 (x = z·log2 e) so each term is one exp2.
#include "common.cuh"

namespace palign {
namespace logprob {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr unsigned FULL = 0xffffffffu;

// ---------------------------------------------------------------- (max, sum) merges

// (m, s) ⊕= (m2, s2), natural base. Both empty: unchanged (avoids (−inf) − (−inf)).
__device__ __forceinline__ void ms_merge(float &m, float &s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// The same in base 2 (the fused kernel's units).
__device__ __forceinline__ void ms_merge2(float &m, float &s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;
    s = s * exp2f(m - mn) + s2 * exp2f(m2 - mn);
    m = mn;
}

// Add 8 finite values to a thread's running (m, s): one rescale per 8.
__device__ __forceinline__ void ms_add8(float &m, float &s, const float v[8]) {
    float mx = v[0];
#pragma unroll
    for (int j = 1; j < 8; j++) mx = fmaxf(mx, v[j]);
    const float mn = fmaxf(m, mx);
    float acc = s * expf(m - mn); // m = −inf: 0
#pragma unroll
    for (int j = 0; j < 8; j++) acc += expf(v[j] - mn);
    m = mn;
    s = acc;
}

__device__ __forceinline__ void ms_add1(float &m, float &s, float v) {
    const float mn = fmaxf(m, v);
    s = s * expf(m - mn) + expf(v - mn);
    m = mn;
}

// (m, s) over the block, returned to every thread (fixed tree: deterministic).
__device__ __forceinline__ void block_ms(float &m, float &s) {
    __shared__ float pm[32], ps[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        ms_merge(m, s, __shfl_xor_sync(FULL, m, off), __shfl_xor_sync(FULL, s, off));
    __syncthreads(); // an earlier call may still be reading pm/ps
    if (lane == 0) {
        pm[warp] = m;
        ps[warp] = s;
    }
    __syncthreads();
    m = lane < nw ? pm[lane] : -INFINITY;
    s = lane < nw ? ps[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        ms_merge(m, s, __shfl_xor_sync(FULL, m, off), __shfl_xor_sync(FULL, s, off));
}

// This thread's share of (max, sum-exp) over one bf16 row of n values.
__device__ __forceinline__ void row_ms(const __nv_bfloat16 *z, int64_t n, float &m, float &s) {
    int64_t tail = 0;
    if ((n & 7) == 0 && aligned16(z)) {
        for (int64_t j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
            float v[8];
            load8(z + j, v);
            ms_add8(m, s, v);
        }
        tail = n;
    }
    for (int64_t j = tail + threadIdx.x; j < n; j += blockDim.x) ms_add1(m, s, bf2f(z[j]));
}

// This thread's share of the f32 dot product of two bf16 rows of n values.
__device__ __forceinline__ float row_dot(const __nv_bfloat16 *a, const __nv_bfloat16 *b,
                                         int64_t n) {
    float acc = 0.0f;
    int64_t tail = 0;
    if ((n & 7) == 0 && aligned16(a) && aligned16(b)) {
        for (int64_t j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
            float x[8], y[8];
            load8(a + j, x);
            load8(b + j, y);
#pragma unroll
            for (int e = 0; e < 8; e++) acc = fmaf(x[e], y[e], acc);
        }
        tail = n;
    }
    for (int64_t j = tail + threadIdx.x; j < n; j += blockDim.x)
        acc = fmaf(bf2f(a[j]), bf2f(b[j]), acc);
    return acc;
}

// ---------------------------------------------------------------- fused forward
//
// Block: 128 rows (tokens) × the vocab tiles of one split, 8 warps as 2 (rows) × 4
// (vocab), warp tile 64 × 32 = 4 × 4 mma tiles. Per vocab tile the K loop (over H, 32 at
// a time) runs through a 4-stage cp.async ring shared by both operands; the (vocab tile,
// k tile) iterations are one flat sequence, so the ring never drains between tiles.
// After the last k tile of a vocab tile every thread folds its 8 rows × 8 columns into
// its own running (m, s) per row (base 2) and, if it holds a row's target column, writes
// that logit (f32). At the end the 4 lanes of a quad and the 4 vocab warps merge their
// (m, s) and the block writes one pair per row: part[row, split] = (m, s).
// Operand tiles are [128][32] bf16 rows padded to 40 (80 B): the 8 rows an ldmatrix
// phase reads start in distinct bank groups. Row/vocab/K tails are zero-filled by
// cp.async and masked columns (≥ V) are −inf. Needs H % 8 == 0 (16-byte chunks).
// Blocks are ordered in groups of 16 row tiles × all splits, so the blocks resident at
// once share both operands' tiles in L2.
constexpr int FBM = 128, FBN = 128, FBK = 32, FSTAGES = 4, FTHREADS = 256, FGROUP = 16;
constexpr int FLD = FBK + 8;
constexpr int F_TILE = FBM * FLD; // elements of one operand tile
constexpr int F_STAGE = 2 * F_TILE;
constexpr int FUSED_SMEM = FSTAGES * F_STAGE * 2 + FBM * 4;
static_assert(FBM == FBN, "the stage loader fills both operands in one loop");
static_assert(FUSED_SMEM == 82432, "keep FUSED_SMEM in src/backend/cuda/logprob.rs in sync");
static_assert(4 * FBM * 2 * 4 <= FSTAGES * F_STAGE * 2, "the final merge reuses the ring");

__device__ __forceinline__ void fused_fwd(const LogprobFusedParams &p) {
    PALIGN_DYNAMIC_SMEM(logprob_smem);
    if (dynamic_smem_bytes() < (uint32_t)FUSED_SMEM) __trap(); // launcher bug, not data
    __nv_bfloat16 *ring = reinterpret_cast<__nv_bfloat16 *>(logprob_smem);
    uint32_t *s_tgt = reinterpret_cast<uint32_t *>(logprob_smem + FSTAGES * F_STAGE * 2);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t = lane & 3;
    const int R = p.rows, V = p.vocab, H = p.hidden_size, NS = p.n_splits;

    // Block -> (row tile, split), in groups of FGROUP row tiles.
    const int row_tiles = (R + FBM - 1) / FBM;
    const int first = (int)(blockIdx.x / (FGROUP * NS)) * FGROUP;
    const int gsize = min(row_tiles - first, FGROUP);
    const int local = (int)blockIdx.x - first * NS;
    const int rt = first + local % gsize, split = local / gsize;
    const int m0 = rt * FBM;
    const int n_vt = (V + FBN - 1) / FBN;
    const int vt0 = split * p.tiles_per_split;
    const int vt1 = min(n_vt, vt0 + p.tiles_per_split);
    const int KT = (H + FBK - 1) / FBK;
    const int total = max(vt1 - vt0, 0) * KT;

    for (int i = tid; i < FBM; i += FTHREADS) s_tgt[i] = m0 + i < R ? p.targets[m0 + i] : FULL;

    // Iteration `it` = (vocab tile vt0 + it / KT, k tile it % KT): 128 rows × 32 of X and
    // of W, 512 16-byte chunks each, 2 + 2 per thread.
    auto load_stage = [&](int it, int stage) {
        const int n0 = (vt0 + it / KT) * FBN, k0 = (it % KT) * FBK;
        __nv_bfloat16 *sa = ring + stage * F_STAGE;
        __nv_bfloat16 *sb = sa + F_TILE;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int c = tid + j * FTHREADS;
            const int r = c >> 2, col = k0 + (c & 3) * 8;
            const bool a_ok = col < H && m0 + r < R;
            const bool b_ok = col < H && n0 + r < V;
            cp_async16(sa + r * FLD + (c & 3) * 8,
                       a_ok ? p.hidden + (int64_t)(m0 + r) * H + col : p.hidden, a_ok);
            cp_async16(sb + r * FLD + (c & 3) * 8,
                       b_ok ? p.head + (int64_t)(n0 + r) * H + col : p.head, b_ok);
        }
    };

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
            acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.0f;
    // Running (m, s) of this thread's rows, i = 2·mi + h: row wm·64 + 16mi + g + 8h.
    float m_run[8], s_run[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        m_run[i] = -INFINITY;
        s_run[i] = 0.0f;
    }

    // The accumulators hold the logits of vocab tile vt: target logits out, then fold.
    auto fold = [&](int vt) {
        const int n0 = vt * FBN + wn * 32; // the warp's first column
#pragma unroll
        for (int mi = 0; mi < 4; mi++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = wm * 64 + mi * 16 + g + 8 * h;
                const int64_t c = (int64_t)s_tgt[r] - n0; // target column in the warp tile
                if (c >= 0 && c < 32 && ((c >> 1) & 3) == t && m0 + r < R) {
                    float v = 0.0f;
#pragma unroll
                    for (int ni = 0; ni < 4; ni++)
                        if ((c >> 3) == ni) v = (c & 1) ? acc[mi][ni][2 * h + 1] : acc[mi][ni][2 * h];
                    p.tgt[m0 + r] = v;
                }
                float x[8], mx = -INFINITY;
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int col = n0 + ni * 8 + 2 * t + e;
                        const float v = col < V ? acc[mi][ni][2 * h + e] * LOG2E : -INFINITY;
                        x[2 * ni + e] = v;
                        mx = fmaxf(mx, v);
                    }
                const int i = 2 * mi + h;
                const float mn = fmaxf(m_run[i], mx);
                if (mn != -INFINITY) { // else: no valid column yet, (−inf, 0) stays
                    float sum = s_run[i] * exp2f(m_run[i] - mn);
#pragma unroll
                    for (int j = 0; j < 8; j++) sum += exp2f(x[j] - mn);
                    s_run[i] = sum;
                    m_run[i] = mn;
                }
            }
        }
#pragma unroll
        for (int mi = 0; mi < 4; mi++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++)
                acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.0f;
    };

#pragma unroll
    for (int s = 0; s < FSTAGES - 1; s++) {
        if (s < total) load_stage(s, s);
        cp_async_commit(); // empty groups too: one group per iteration keeps the count
    }
    for (int it = 0; it < total; it++) {
        // Stage `it` has landed (this thread's copies, then everyone's); every warp is
        // done with iteration it − 1, whose stage is refilled next.
        cp_async_wait<FSTAGES - 2>();
        __syncthreads();
        {
            const int nx = it + FSTAGES - 1;
            if (nx < total) load_stage(nx, nx % FSTAGES);
            cp_async_commit();
        }
        const __nv_bfloat16 *sa = ring + (it % FSTAGES) * F_STAGE;
        const __nv_bfloat16 *sb = sa + F_TILE;
#pragma unroll
        for (int kk = 0; kk < FBK / 16; kk++) {
            uint32_t af[4][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++) // rows 0-7/8-15 × k 0-7/8-15 of the 16x16 A tile
                ldsm_x4(af[mi], sa + (wm * 64 + mi * 16 + (lane & 15)) * FLD + kk * 16 +
                                    (lane >> 4) * 8);
#pragma unroll
            for (int nj = 0; nj < 2; nj++) { // vocab 0-7 × k 0-7, k 8-15; vocab 8-15 × ...
                uint32_t r[4];
                ldsm_x4(r, sb + (wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * FLD +
                               kk * 16 + ((lane >> 3) & 1) * 8);
                bfr[2 * nj][0] = r[0];
                bfr[2 * nj][1] = r[1];
                bfr[2 * nj + 1][0] = r[2];
                bfr[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_bf16(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
        }
        if (it % KT == KT - 1) fold(vt0 + it / KT);
    }
    cp_async_wait<0>();
    __syncthreads(); // the ring is free: reuse it for the merge

    // Quad lanes hold other columns of the same rows; then the 4 vocab warps.
#pragma unroll
    for (int i = 0; i < 8; i++)
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1)
            ms_merge2(m_run[i], s_run[i], __shfl_xor_sync(FULL, m_run[i], off),
                      __shfl_xor_sync(FULL, s_run[i], off));
    float *red = reinterpret_cast<float *>(logprob_smem); // [4 vocab warps][FBM][2]
    if (t == 0) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int r = wm * 64 + (i >> 1) * 16 + g + 8 * (i & 1);
            red[(wn * FBM + r) * 2] = m_run[i];
            red[(wn * FBM + r) * 2 + 1] = s_run[i];
        }
    }
    __syncthreads();
    if (tid < FBM && m0 + tid < R) {
        float m = red[tid * 2], s = red[tid * 2 + 1];
#pragma unroll
        for (int w = 1; w < 4; w++) ms_merge2(m, s, red[(w * FBM + tid) * 2], red[(w * FBM + tid) * 2 + 1]);
        float *out = p.part + ((int64_t)(m0 + tid) * NS + split) * 2;
        out[0] = m;
        out[1] = s;
    }
}

// ---------------------------------------------------------------- DPO helpers

// Sum over the block in f64 (fixed tree: deterministic). blockDim.x % 32 == 0.
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL, v, off);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL, v, off);
    return v;
}

// Tokens [a, b) of sequence `seq`, clamped to [0, n_tokens] (bad offsets write nothing).
__device__ __forceinline__ void segment(const uint32_t *offsets, int seq, int n_tokens,
                                        int64_t &a, int64_t &b) {
    a = min((int64_t)offsets[seq], (int64_t)n_tokens);
    b = max(a, min((int64_t)offsets[seq + 1], (int64_t)n_tokens));
}

// log σ(x) = −log(1 + e^−x), in the form that stays finite for large |x|.
__device__ __forceinline__ double log_sigmoid(double x) {
    return x >= 0.0 ? -log1p(exp(-x)) : x - log1p(exp(x));
}

__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// Argmax keys: a NaN is above every number (torch.argmax), so it is kept as +inf with
// `nan` set; (nan, v) order the candidates, the lower index breaks ties.
__device__ __forceinline__ bool argmax_better(bool n2, float v2, int i2, bool n, float v, int i) {
    if (n2 != n) return n2;
    return v2 > v || (v2 == v && i2 < i);
}

// (nan, v, i) ⊕= (n2, v2, i2): over any order of merges, the first index of the maximum.
__device__ __forceinline__ void argmax_merge(bool &n, float &v, int &i, bool n2, float v2, int i2) {
    if (argmax_better(n2, v2, i2, n, v, i)) {
        n = n2;
        v = v2;
        i = i2;
    }
}

// The argmax over a warp's (nan, v, i), returned to every lane (xor butterfly).
__device__ __forceinline__ void warp_argmax(bool &n, float &v, int &i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const bool n2 = __shfl_xor_sync(FULL, (int)n, off);
        const float v2 = __shfl_xor_sync(FULL, v, off);
        const int i2 = __shfl_xor_sync(FULL, i, off);
        argmax_merge(n, v, i, n2, v2, i2);
    }
}

} // namespace logprob
} // namespace palign

// One block per row of the chunk; p's pointers start at the chunk's first row.
extern "C" __global__ void __launch_bounds__(256) logsoftmax_gather_bf16(LogsoftmaxGatherParams p) {
    using namespace palign;
    using namespace palign::logprob;
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const int64_t V = p.vocab, H = p.hidden;
    float m = -INFINITY, s = 0.0f;
    row_ms(p.logits + row * V, V, m, s);
    block_ms(m, s);
    const uint32_t tg = p.targets[row];
    const bool valid = tg < (uint32_t)V; // uniform over the block
    float dot = valid ? row_dot(p.x + row * H, p.head + (int64_t)tg * H, H) : 0.0f;
    dot = block_sum(dot);
    if (threadIdx.x == 0) {
        const float lse = m + logf(s);
        p.lse[row] = lse;
        p.logp[row] = valid ? dot - lse : NAN;
    }
}

// One block per row: logits row → g·(onehot − exp(z − lse)), bf16, in place.
extern "C" __global__ void __launch_bounds__(256) logsoftmax_backward_bf16(LogsoftmaxBackwardParams p) {
    using namespace palign;
    using namespace palign::logprob;
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const int64_t V = p.vocab;
    __nv_bfloat16 *z = p.logits + row * V;
    float lse;
    if (p.lse) {
        lse = p.lse[row];
    } else {
        float m = -INFINITY, s = 0.0f;
        row_ms(z, V, m, s);
        block_ms(m, s); // its barriers also order every read of z before the writes below
        lse = m + logf(s);
    }
    const float gr = p.dlogp[row];
    const int64_t tg = p.targets[row];
    int64_t tail = 0;
    if ((V & 7) == 0 && aligned16(z)) {
        for (int64_t j = threadIdx.x * 8; j < V; j += blockDim.x * 8) {
            float v[8];
            load8(z + j, v);
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = (j + e == tg ? gr : 0.0f) - gr * expf(v[e] - lse);
            store8(z + j, v);
        }
        tail = V;
    }
    for (int64_t j = tail + threadIdx.x; j < V; j += blockDim.x)
        z[j] = f2bf((j == tg ? gr : 0.0f) - gr * expf(bf2f(z[j]) - lse));
}

// Grid-stride over rows, the block's threads across a row; 16-byte vectors when aligned.
extern "C" __global__ void __launch_bounds__(256) scale_rows_bf16(ScaleRowsParams p) {
    using namespace palign;
    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float g = p.scale[row];
        const int64_t C = p.cols;
        const __nv_bfloat16 *x = p.x + row * C;
        __nv_bfloat16 *out = p.out + row * C;
        int64_t tail = 0;
        if ((C & 7) == 0 && aligned16(x) && aligned16(out)) {
            for (int64_t j = threadIdx.x * 8; j < C; j += blockDim.x * 8) {
                float v[8];
                load8(x + j, v);
#pragma unroll
                for (int e = 0; e < 8; e++) v[e] *= g;
                store8(out + j, v);
            }
            tail = C;
        }
        for (int64_t j = tail + threadIdx.x; j < C; j += blockDim.x) out[j] = f2bf(g * bf2f(x[j]));
    }
}

// Grid-stride over rows, one block per row: each thread scans its strided columns in
// order (taking its first, then only larger values), then a warp and a block tree merge.
extern "C" __global__ void __launch_bounds__(256) argmax_rows_bf16(ArgmaxRowsParams p) {
    using namespace palign;
    using namespace palign::logprob;
    constexpr int NONE = 0x7fffffff;
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ bool sn[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const __nv_bfloat16 *z = p.logits + row * (int64_t)p.cols;
        bool n = false;
        float v = -INFINITY;
        int i = NONE;
        for (int j = threadIdx.x; j < p.cols; j += blockDim.x) {
            const float x = bf2f(z[j]);
            const bool xn = x != x;
            if (i == NONE || argmax_better(xn, xn ? INFINITY : x, j, n, v, i)) {
                n = xn;
                v = xn ? INFINITY : x;
                i = j;
            }
        }
        warp_argmax(n, v, i);
        __syncthreads(); // the previous row's readers are done with sv/si/sn
        if (lane == 0) {
            sn[warp] = n;
            sv[warp] = v;
            si[warp] = i;
        }
        __syncthreads();
        if (warp == 0) {
            n = lane < nw ? sn[lane] : false;
            v = lane < nw ? sv[lane] : -INFINITY;
            i = lane < nw ? si[lane] : NONE;
            warp_argmax(n, v, i);
            if (lane == 0) p.out[row] = (uint32_t)i;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) logprob_fused_fwd_bf16(LogprobFusedParams p) {
    palign::logprob::fused_fwd(p);
}

// One thread per row: merge the splits' (max, sum) in split order.
extern "C" __global__ void __launch_bounds__(256) logprob_fused_combine(LogprobFusedParams p) {
    using namespace palign::logprob;
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= p.rows) return;
    const float *part = p.part + (int64_t)row * p.n_splits * 2;
    float m = -INFINITY, s = 0.0f;
    for (int i = 0; i < p.n_splits; i++) ms_merge2(m, s, part[2 * i], part[2 * i + 1]);
    const float lse = (m + log2f(s)) * LN2;
    p.lse[row] = lse;
    p.logp[row] = p.targets[row] < (uint32_t)p.vocab ? p.tgt[row] - lse : NAN;
}

// One block per sequence: out[s] = Σ logp over its tokens (÷ count when mean; empty: 0).
extern "C" __global__ void __launch_bounds__(256) seq_logp_sum_f32(SeqLogpSumParams p) {
    using namespace palign::logprob;
    const int seq = blockIdx.x;
    if (seq >= p.n_seqs) return;
    int64_t a, b;
    segment(p.offsets, seq, p.n_tokens, a, b);
    double acc = 0.0;
    for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x) acc += (double)p.logp[i];
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) p.out[seq] = (float)(p.mean && b > a ? acc / (double)(b - a) : acc);
}

// One block per pair (sequences 2k = chosen, 2k + 1 = rejected), f64 math as
// src/train/loss.rs dpo_pair; thread 0 computes, the block broadcasts to the tokens.
//   logits = (πc − πr) − (rc − rr)
//   sigmoid: z = β·logits, loss = −(1−ls)·logσ(z) − ls·logσ(−z),
//            ∂loss/∂πc = β·(−(1−ls)·σ(−z) + ls·σ(z)) = −∂loss/∂πr
//   IPO:     u = logits − 1/(2β), loss = u², ∂loss/∂πc = 2u = −∂loss/∂πr
// d_policy = ∂loss/∂π ÷ norm; a token of sequence q gets d_policy[q] (÷ its length for
// IPO, whose π are per-token means), as the trainer's runner does.
extern "C" __global__ void __launch_bounds__(128) dpo_loss_f32(DpoLossParams p) {
    using namespace palign::logprob;
    __shared__ double per_token[2];
    const int pair = blockIdx.x;
    if (pair >= p.n_pairs) return;
    int64_t a[2], b[2];
    segment(p.offsets, 2 * pair, p.n_tokens, a[0], b[0]);
    segment(p.offsets, 2 * pair + 1, p.n_tokens, a[1], b[1]);
    if (threadIdx.x == 0) {
        const double pc = p.policy[2 * pair], pr = p.policy[2 * pair + 1];
        const double rc = p.reference[2 * pair], rr = p.reference[2 * pair + 1];
        const double logits = (pc - pr) - (rc - rr);
        double loss, d;
        if (p.ipo) {
            const double u = logits - 1.0 / (2.0 * p.beta);
            loss = u * u;
            d = 2.0 * u;
        } else {
            const double z = p.beta * logits, ls = p.label_smoothing;
            loss = -(1.0 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z);
            d = (-(1.0 - ls) * sigmoid(-z) + ls * sigmoid(z)) * p.beta;
        }
        p.loss[pair] = (float)loss;
        p.reward_chosen[pair] = (float)(p.beta * (pc - rc));
        p.reward_rejected[pair] = (float)(p.beta * (pr - rr));
        p.d_policy[2 * pair] = (float)(d / p.norm);
        p.d_policy[2 * pair + 1] = (float)(-d / p.norm);
        const double dq[2] = {d, -d};
#pragma unroll
        for (int w = 0; w < 2; w++) {
            const double n = (double)(b[w] - a[w]);
            per_token[w] = (p.ipo && n > 0.0 ? dq[w] / n : dq[w]) / p.norm;
        }
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < 2; w++) {
        const float v = (float)per_token[w];
        for (int64_t i = a[w] + threadIdx.x; i < b[w]; i += blockDim.x) p.dlogp[i] = v;
    }
}
