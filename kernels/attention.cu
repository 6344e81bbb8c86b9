// Flash attention (FlashAttention-2 scheme) for palign: causal, GQA, sliding window,
// variable-length sequences; bf16 in/out, f32 accumulation, tensor cores via mma.sync.
//
// Math (per sequence, query head h, KV head h / (H / Hkv), scale c = 1/sqrt(d)):
//   visible(i, j) = j <= i && (W == 0 || i - j < W)   (query i sees keys i-W+1 ..= i)
//   S = c·Q·Kᵀ (masked to -inf), P = softmax_rows(S), O = P·V, lse_i = log Σ_j exp(S_ij)
// Forward, one query tile at a time, keys in tiles, online softmax in base 2
// (x = S·log2(e); m = running max, l = running Σ 2^(x - m)):
//   m' = max(m, rowmax(x)),  O ← O·2^(m - m') + 2^(x - m')·V,  l ← l·2^(m - m') + Σ 2^(x - m')
//   O_final = O / l, lse = (m + log2 l)·ln 2.
// Backward (P recomputed from lse, D_i = Σ_d dO_id·O_id from a small pre-pass):
//   P = exp(S - lse), dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP - D),
//   dQ = c·dS·K, dK = c·dSᵀ·Q;  dK/dV of a KV head sum over its query heads.
// Facts used (no code copied): PTX ISA 8.x fragment layouts of mma.m16n8k16 (.bf16, f32
// accumulate) and ldmatrix .m8n8 (.trans); the FA2 paper (Dao 2023) for the tiling,
// the base-2 online softmax, dQ accumulated in f32 with atomics and the D = rowsum(dO∘O)
// pre-pass; FA2's rule that KV tiles outside the window are skipped; FA2's d = 128
// forward tile (128 query rows per 4-warp block, 64 keys, Q re-read from shared memory);
// PTX ISA 8.1 red.global.add.v2.f32 (sm_90); the FA2 paper's backward warp layout (Sᵀ/dPᵀ,
// dK/dV and dQ each tiled over the warps, P and dS passed through shared memory).
//
// Layout: token rows of q/o are [rows, H, d], k/v [rows, Hkv, d], lse/delta [rows, H].
// Sequence s occupies rows seq_start[s] .. seq_start[s] + seq_len[s] (packed batches:
// cu_seqlens offsets; right-padded [B, T] batches: start b·T, len = real length). Rows
// that belong to no sequence are never read as keys and never written here.
//
// Kernels (extern "C"):
//   attention_fwd_bf16_d{64,128}       O, lse. Grid (H·n_seqs, q tiles), 128 threads.
//   attention_fwd_<v>_bf16_d{64,128}   the same, tile variant v (w4m2n64s1, w4m2n64s2,
//                                      w8m1n64s2: see "forward"), 128 or 256 threads.
//   attention_bwd_prep_bf16            delta = rowsum(dO∘O); zeroes the f32 dQ accumulator.
//   attention_bwd_bf16_d{64,128}       dK, dV (stored), dQ (f32 atomics). Grid (Hkv·n_seqs,
//   attention_bwd_small_bf16_d128      KV tiles). "small": for GPUs with < 145 KB of smem.
//   attention_bwd_<v>_bf16_d{64,128}   the same, variant v (w8q64s2a, w4q64s2a: see
//                                      "backward"; w8q64s2g, w4q64s2g: see "backward,
//                                      warp-grid variant").
//   attention_bwd_dq_bf16              dQ = bf16(scale · accumulator).
//   attention_decode_bf16_d{64,128}    one query per sequence against a KV cache, split-K.
//   attention_decode_combine_bf16      merges the split-K partial results.

#include "common.cuh"

namespace palign {
namespace attention {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Tile configuration. src/backend/cuda/attention.rs mirrors these and the template
// arguments of the instantiations at the bottom (shared memory sizes, grids); every kernel
// checks its dynamic shared memory size against its own need.
constexpr int DEC_WARPS = 4;
constexpr int DEC_GROUP = 8;  // query heads per decode block (one KV head)
constexpr int DEC_UNROLL = 4; // keys per warp per step

// 2^x by the SFU alone (subnormal results flush to 0; 2^-inf = +0). exp2f adds a range
// fix-up of three instructions per call, a visible cost in the softmax.
__device__ __forceinline__ float fast_exp2(float x) { return ex2_approx_ftz(x); }

// The online softmax's running-max step for one row (base 2). mx: this lane's max of the
// row's raw scores in the tile (the quad, the row's 4 lanes, reduces it here). Returns the
// max to subtract from the tile's scaled scores; alpha: what the row's O and running sum
// are rescaled by (1 exactly when the max stays).
__device__ __forceinline__ float online_max(float mx, float &m_run, float &alpha, bool &moved, float sl2) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run, mx * sl2);
    // A row with nothing visible yet keeps m = -inf; 0 avoids (-inf) - (-inf).
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    alpha = m_new == m_run ? 1.0f : fast_exp2(m_run - m_use);
    moved |= m_new != m_run;
    m_run = m_new;
    return m_use;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// A launcher/kernel mismatch in shared memory must fail loudly, not corrupt memory.
__device__ __forceinline__ void require_smem(uint32_t bytes) {
    if (dynamic_smem_bytes() < bytes) __trap();
}

// Two f32 -> one register of two bf16 (x in the low half: the lower column index).
__device__ __forceinline__ uint32_t pack_bf16(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t *>(&h);
}

__device__ __forceinline__ float2 unpack_bf16(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&v));
}

// Element offset of (row, col) in a [rows, COLS] bf16 tile in shared memory whose 16-byte
// chunks are XOR-swizzled by row % 8, so the 8 rows an ldmatrix phase reads (and the rows
// of one column chunk) fall in different banks.
// Rows of 4 chunks (64 B) pair up in a 128-byte line, so they XOR with (row / 2) % 4.
template <int COLS> __device__ __forceinline__ int swz(int row, int col) {
    static_assert(COLS % 64 == 0 || COLS == 32, "swizzle: 32 or a multiple of 64 columns");
    const int x = COLS == 32 ? (row >> 1) & 3 : row & 7;
    return row * COLS + (((col >> 3) ^ x) << 3) + (col & 7);
}

// Rows row0 .. row0+ROWS of a matrix with `stride` elements per row (columns 0..D of
// `g`) into a swizzled tile; rows >= row_end are zero-filled. Asynchronous (cp.async).
// A thread copies chunk ch = tid % CPR of rows tid / CPR + j·(NT / CPR): one address
// computed once, then a pointer step and a constant shared offset per copy (the rows
// of a pass differ by a multiple of 8, so they share the swizzle). Computing every
// copy's row, chunk and swizzle from scratch took ~30 instructions a copy, as many as
// the backward's mmas by the step.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(__nv_bfloat16 *tile, const __nv_bfloat16 *g,
                                          int64_t stride, int row0, int row_end) {
    constexpr int CPR = D / 8;      // 16-byte chunks per row
    constexpr int RSTEP = NT / CPR; // rows per pass of the block
    static_assert(NT % CPR == 0 && RSTEP % 8 == 0 && ROWS % RSTEP == 0, "load_tile passes");
    const int r = threadIdx.x / CPR, ch = threadIdx.x % CPR;
    const __nv_bfloat16 *src = g + (int64_t)(row0 + r) * stride + ch * 8;
    __nv_bfloat16 *dst = tile + swz<D>(r, ch * 8);
    const int64_t step = (int64_t)RSTEP * stride;
#pragma unroll
    for (int j = 0; j < ROWS / RSTEP; j++) {
        const bool ok = row0 + r + j * RSTEP < row_end;
        cp_async16(dst + j * RSTEP * D, ok ? src + j * step : g, ok);
    }
}

__device__ __forceinline__ bool visible(int q, int key, int window) {
    return key <= q && (window == 0 || q - key < window);
}

// ------------------------------------------------------------------------- forward
//
// Block: BM = 16·MT·WARPS query rows of one (sequence, head); warp w owns rows
// 16·MT·w .. 16·MT·(w+1) - 1 (MT 16-row m-tiles) and keeps its running max/sum and O
// accumulator in registers. Per KV tile of BN keys: S = Q·Kᵀ (mma, K B-fragments by
// ldmatrix), mask, online softmax, P stays in registers as the A operand of O += P·V
// (V B-fragments by ldmatrix.trans).
// Why MT: every warp reads all of K and V of a tile from shared memory. With MT = 1 that is
// 512 B per two mmas (256 B per 4096-FLOP mma); at 128 B/clk/SM of shared memory against
// ~4096 dense bf16 FLOP/clk/SM (H100) the reads take twice as long as the math. MT = 2
// feeds each fragment to two m-tiles: 160 B per mma counting the Q re-reads below.
// Q A-fragments take MT·D/4 registers: kept for the whole block when that is at most 32
// (MT·D <= 128), else re-read from shared memory at every KV tile (MT = 2 at d = 128,
// where O alone takes 128 registers; FlashAttention-2 does the same there).
// STAGES = 1: K and V single-buffered but overlapped: V(t) loads during S(t), K(t+1)
// during P·V(t); two barriers per tile. STAGES = 2: K/V double-buffered, K(t+1) loads
// during all of tile t, V(t+1) from its softmax on; one barrier per tile.
// The default kernels are <4, 1, 64, 1> (48 KB of shared memory at d = 128, no opt-in).
template <int D, int WARPS, int MT, int BN, int STAGES>
__host__ __device__ constexpr int fwd_smem_bytes() {
    return (16 * MT * WARPS + 2 * STAGES * BN) * D * 2;
}

// The loads at the top of KV tile t: STAGES = 1, V(t) (K(t) is already there); STAGES = 2,
// K(t+1) into the other stage, which held tile t-1 (every warp finished it before the
// barrier that ended the previous tile). A function of its own: an `if` at the top of the
// loop body, even a constant one, changes the default kernel's code.
template <int D, int BN, int NT, int STAGES>
__device__ __forceinline__ void fwd_prefetch(__nv_bfloat16 *sK, __nv_bfloat16 *sV,
                                             const __nv_bfloat16 *Kg, const __nv_bfloat16 *Vg,
                                             int64_t kvs, int t, int stage, bool more, int len) {
    if constexpr (STAGES == 1) {
        load_tile<BN, D, NT>(sV, Vg, kvs, t * BN, len);
        cp_async_commit();
    } else if (more) {
        load_tile<BN, D, NT>(sK + (stage ^ 1) * 2 * BN * D, Kg, kvs, (t + 1) * BN, len);
        cp_async_commit();
    }
}

template <int D, int WARPS, int MT, int BN, int STAGES> __device__ void fwd(const AttnFwdParams &p) {
    constexpr int RW = 16 * MT, BM = RW * WARPS, NT = 32 * WARPS;
    constexpr int KS = D / 16; // k-steps over the head dim
    constexpr int NB = BN / 8; // 8-key column tiles of S
    constexpr int ND = D / 8;  // 8-wide column tiles of O
    constexpr bool Q_REGS = MT * D <= 128;
    constexpr int KV_STRIDE = 2 * BN * D; // elements between the K/V stages
    static_assert((MT == 1 || MT == 2) && (STAGES == 1 || STAGES == 2) && BN % 16 == 0, "fwd tiles");
    require_smem(fwd_smem_bytes<D, WARPS, MT, BN, STAGES>());

    const int H = p.n_heads, group = p.n_heads / p.n_kv_heads;
    const int seq = blockIdx.x / H, h = blockIdx.x % H;
    const int start = p.seq_start[seq], len = p.seq_len[seq];
    const int qt = gridDim.y - 1 - blockIdx.y; // longest (last) query tiles first
    const int q0 = qt * BM;
    if (q0 >= len) return;
    const int W = p.window;
    const int kvh = h / group;
    const int64_t qs = (int64_t)H * D, kvs = (int64_t)p.n_kv_heads * D;
    const __nv_bfloat16 *Qg = p.q + (int64_t)start * qs + h * D;
    const __nv_bfloat16 *Kg = p.k + (int64_t)start * kvs + kvh * D;
    const __nv_bfloat16 *Vg = p.v + (int64_t)start * kvs + kvh * D;

    // Key tiles that any query of the block can see.
    const int q_last = imin(len, q0 + BM) - 1;
    const int k_first = W > 0 ? imax(0, q0 - W + 1) : 0;
    const int t_lo = k_first / BN, t_hi = q_last / BN + 1;

    PALIGN_DYNAMIC_SMEM(smem);
    __nv_bfloat16 *sQ = reinterpret_cast<__nv_bfloat16 *>(smem);
    __nv_bfloat16 *sK = sQ + BM * D; // stage s: sK + s·KV_STRIDE
    __nv_bfloat16 *sV = sK + BN * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    load_tile<BM, D, NT>(sQ, Qg, qs, q0, len);
    load_tile<BN, D, NT>(sK, Kg, kvs, t_lo * BN, len);
    if (STAGES == 2) load_tile<BN, D, NT>(sV, Vg, kvs, t_lo * BN, len);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // A fragments of the warp's query rows (matrices: rows 0-7/8-15 x cols 0-7/8-15 of
    // m-tile mt, k-step ks).
    uint32_t qf[Q_REGS ? MT * KS : 1][4];
    if constexpr (Q_REGS) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int ks = 0; ks < KS; ks++)
                ldsm_x4(qf[mt * KS + ks],
                        sQ + swz<D>(warp * RW + mt * 16 + (lane % 16), ks * 16 + (lane / 16) * 8));
    }

    float o[MT][ND][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nd = 0; nd < ND; nd++) o[mt][nd][0] = o[mt][nd][1] = o[mt][nd][2] = o[mt][nd][3] = 0.0f;
    // Row r of the thread (0 .. 2·MT): m-tile r / 2, query row row_a + 8r.
    float m_run[2 * MT], l_run[2 * MT];
#pragma unroll
    for (int r = 0; r < 2 * MT; r++) {
        m_run[r] = -INFINITY;
        l_run[r] = 0.0f;
    }
    const float sl2 = p.scale * LOG2E;
    const int wq0 = q0 + warp * RW, wq1 = wq0 + RW - 1; // the warp's query rows
    const int row_a = wq0 + lane / 4;                   // this thread's rows: row_a + 8r

    for (int t = t_lo; t < t_hi; t++) {
        const int k0 = t * BN, k1 = k0 + BN - 1;
        const int stage = STAGES == 2 ? (t - t_lo) & 1 : 0;
        const __nv_bfloat16 *cK = sK + stage * KV_STRIDE, *cV = sV + stage * KV_STRIDE;
        fwd_prefetch<D, BN, NT, STAGES>(sK, sV, Kg, Vg, kvs, t, stage, t + 1 < t_hi, len);

        // Whether any (row, key) pair of this warp is visible, and whether any is not.
        const bool active = wq0 < len && k0 <= wq1 && (W == 0 || wq0 - k1 < W);
        const bool need_mask = k1 > wq0 || (W > 0 && wq1 - k0 >= W);
        uint32_t pf[MT][BN / 16][4]; // P as bf16 A fragments (k = keys)
        if (active) {
            float s[MT][NB][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nb = 0; nb < NB; nb++) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.0f;
            // Not unrolled when Q comes from shared memory: the unrolled loop's hoisted loads
            // spill (MT = 2, d = 128).
#pragma unroll(Q_REGS ? KS : 1)
            for (int ks = 0; ks < KS; ks++) {
                uint32_t qa[Q_REGS ? 1 : MT][4];
                if constexpr (!Q_REGS) {
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
                        ldsm_x4(qa[mt], sQ + swz<D>(warp * RW + mt * 16 + (lane % 16),
                                                    ks * 16 + (lane / 16) * 8));
                }
#pragma unroll
                for (int nb2 = 0; nb2 < NB / 2; nb2++) {
                    // keys 16nb2 + 0-7 / 8-15, dims 16ks + 0-7 / 8-15
                    uint32_t kf[4];
                    ldsm_x4(kf, cK + swz<D>(nb2 * 16 + (lane % 8) + (lane / 16) * 8,
                                            ks * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        const uint32_t *a = Q_REGS ? qf[mt * KS + ks] : qa[Q_REGS ? 0 : mt];
                        mma_bf16(s[mt][2 * nb2], a, kf[0], kf[1]);
                        mma_bf16(s[mt][2 * nb2 + 1], a, kf[2], kf[3]);
                    }
                }
            }
            if (need_mask) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int nb = 0; nb < NB; nb++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int key = k0 + nb * 8 + (lane % 4) * 2 + (e & 1);
                            const int row = row_a + mt * 16 + (e >= 2 ? 8 : 0);
                            if (!visible(row, key, W)) s[mt][nb][e] = -INFINITY;
                        }
            }
            // Online softmax; each row is spread over the 4 lanes of a quad.
            float alpha[2 * MT];
            bool moved = false; // a row of this thread has a new max
#pragma unroll
            for (int r = 0; r < 2 * MT; r++) {
                const int mt = r / 2, c = 2 * (r % 2); // the row's S/O elements: c, c + 1
                float mx = -INFINITY;
#pragma unroll
                for (int nb = 0; nb < NB; nb++) mx = fmaxf(mx, fmaxf(s[mt][nb][c], s[mt][nb][c + 1]));
                const float m_use = online_max(mx, m_run[r], alpha[r], moved, sl2);
                float sum = 0.0f;
#pragma unroll
                for (int nb = 0; nb < NB; nb++) {
                    const float p0 = fast_exp2(fmaf(s[mt][nb][c], sl2, -m_use));
                    const float p1 = fast_exp2(fmaf(s[mt][nb][c + 1], sl2, -m_use));
                    s[mt][nb][c] = p0;
                    s[mt][nb][c + 1] = p1;
                    sum += p0 + p1;
                }
                l_run[r] = l_run[r] * alpha[r] + sum; // per-lane partial; quad-summed at the end
            }
            // O's rescale, skipped when no row of the warp has a new max (every alpha is 1
            // exactly, so the bits are the same): once the running maxima settle, most tiles.
            if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
                for (int r = 0; r < 2 * MT; r++) {
                    const int mt = r / 2, c = 2 * (r % 2);
#pragma unroll
                    for (int nd = 0; nd < ND; nd++) {
                        o[mt][nd][c] *= alpha[r];
                        o[mt][nd][c + 1] *= alpha[r];
                    }
                }
            }
            // The S accumulators of key tiles 2kk, 2kk+1 are exactly the A fragment of P
            // for keys 16kk..16kk+15.
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int kk = 0; kk < BN / 16; kk++) {
                    pf[mt][kk][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pf[mt][kk][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pf[mt][kk][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pf[mt][kk][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
        }
        if (STAGES == 1) {
            cp_async_wait<0>(); // V(t) landed (this thread's part) ...
            __syncthreads();     // ... everyone's, and every warp is done reading K(t)
            if (t + 1 < t_hi) {
                load_tile<BN, D, NT>(sK, Kg, kvs, (t + 1) * BN, len);
                cp_async_commit();
            }
        } else if (t + 1 < t_hi) {
            // V(t+1) into the other stage here, where S is down to P (fewer live registers).
            load_tile<BN, D, NT>(sV + (stage ^ 1) * KV_STRIDE, Vg, kvs, (t + 1) * BN, len);
            cp_async_commit();
        }
        if (active) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
#pragma unroll
                for (int nd2 = 0; nd2 < ND / 2; nd2++) {
                    // keys 16kk + 0-7 / 8-15, dims 16nd2 + 0-7 / 8-15, transposed
                    uint32_t vf[4];
                    ldsm_x4_t(vf, cV + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                              nd2 * 16 + (lane / 16) * 8));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma_bf16(o[mt][2 * nd2], pf[mt][kk], vf[0], vf[1]);
                        mma_bf16(o[mt][2 * nd2 + 1], pf[mt][kk], vf[2], vf[3]);
                    }
                }
            }
        }
        cp_async_wait<0>(); // the next tile landed (this thread's part) ...
        __syncthreads();     // ... everyone's; every warp done with this tile's buffers
    }

    // Normalize; stage the warp's rows in its (no longer used) part of sQ, then write
    // them with 16-byte stores.
#pragma unroll
    for (int r = 0; r < 2 * MT; r++) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        l_run[r] = l;
    }
    float inv[2 * MT];
#pragma unroll
    for (int r = 0; r < 2 * MT; r++) inv[r] = l_run[r] > 0.0f ? 1.0f / l_run[r] : 0.0f;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nd = 0; nd < ND; nd++) {
            const int col = nd * 8 + (lane % 4) * 2;
            const int r0 = warp * RW + mt * 16 + lane / 4;
            *reinterpret_cast<uint32_t *>(sQ + swz<D>(r0, col)) =
                pack_bf16(o[mt][nd][0] * inv[2 * mt], o[mt][nd][1] * inv[2 * mt]);
            *reinterpret_cast<uint32_t *>(sQ + swz<D>(r0 + 8, col)) =
                pack_bf16(o[mt][nd][2] * inv[2 * mt + 1], o[mt][nd][3] * inv[2 * mt + 1]);
        }
    __syncwarp();
    constexpr int CPR = D / 8;
#pragma unroll
    for (int c = lane; c < RW * CPR; c += 32) {
        const int r = c / CPR, ch = c % CPR;
        const int row = wq0 + r;
        if (row < len) {
            const uint4 val = *reinterpret_cast<const uint4 *>(sQ + swz<D>(warp * RW + r, ch * 8));
            *reinterpret_cast<uint4 *>(p.o + (int64_t)(start + row) * qs + h * D + ch * 8) = val;
        }
    }
    if (lane % 4 == 0) {
#pragma unroll
        for (int r = 0; r < 2 * MT; r++) {
            const int row = row_a + 8 * r;
            if (row < len)
                p.lse[(int64_t)(start + row) * H + h] = (m_run[r] + log2f(l_run[r])) * LN2;
        }
    }
}

// ------------------------------------------------------------------ forward, wgmma
//
// fwd_wgmma<D, WGS, BN, STAGES, OVL>: the forward above on warpgroup MMAs (wgmma.mma_async,
// sm_90a only; other images trap and the launcher offers it only on compute capability
// 9.0). Why: mma.sync reaches about two thirds of an H100/H200's tensor-core rate, and the
// forward above (w4m2n64s2: 331 TFLOP/s at s = 4096, benches/RESULTS.md) is FA2's scheme;
// FA3 (Shah et al. 2024) moved the same math to wgmma. Same results as fwd up to the
// order of the f32 sums.
// Block: WGS warpgroups of 64 query rows each (BM = 64·WGS), keys in tiles of BN, K/V in
// STAGES shared stages. Per KV tile, warpgroup w (rows q0 + 64w ..):
//   S = Q_w·Kᵀ   D/16 x wgmma m64n<BN>k16: A = Q_w, B = K (both K-major in shared memory;
//                the first with scale-d 0, so S needs no zeroing)
//   mask, online softmax on S's registers (fwd's math: base 2, running max and sum)
//   O += P·V     BN/16 x D/64 x wgmma m64n64k16: A = P from registers (the S accumulator of
//                keys 16kk.. is exactly the A fragment, as in fwd), B = V as stored,
//                [keys][d]: MN-major with keys as k (wg_desc_mn), no transpose pass.
// Accumulator fragment (PTX ISA, wgmma D for m64nNk16): warp q (0..3) of the warpgroup,
// lane (g, t): element 4j+i at row 16q + g + 8(i/2), column 8j + 2t + i%2 — mma.sync's C
// fragment repeated along N, so a thread owns 2 rows and the 4 lanes of a quad share them.
// Shared memory (1024-byte aligned, 128-byte swizzled rows of 64 bf16: common.cuh):
//   Q [D/64][BM][64], then STAGES x (K [D/64][BN][64], V [D/64][BN][64]).
// Tile t: wait for K/V(t) (own cp.async groups), fence.proxy.async, __syncthreads; load
// K/V(t+1) into stage (t+1) % STAGES; S wgmmas, wait; softmax; PV wgmmas. STAGES = 2 waits
// for PV(t) before the next barrier (stage (t+1) % 2 was read by PV(t-1)). STAGES = 3
// leaves PV(t) in flight across the barrier and the next S wgmmas (its stage is next
// written at tile t+2, after every warpgroup waited for it in tile t+1).
// BN = 64 (wg2n64s2): half the tile, 126 registers and 97 KB, so two blocks share an SM
// (__launch_bounds__(256, 2)); each block's softmax can then run under the other's wgmmas,
// the overlap FA3 gets from ping-ponging its warpgroups, here from the scheduler.
// OVL (wg2n128s3p): FA3's intra-warpgroup overlap. Tile t issues S(t) and then PV(t-1),
// waits for S(t) alone (wait_group 1), and runs S(t)'s softmax while PV(t-1) is on the
// tensor cores; P(t) and its rescale factors wait for tile t+1, which (after its barrier)
// waits for PV(t-1), rescales O and packs P(t). Without it a warpgroup's tensor work stops
// for each softmax. Costs P's 32 registers held across the barrier and the S wgmmas, and
// 3 stages (PV(t-1) reads V(t-1) after tile t+1's loads begin).
template <int D, int WGS, int BN, int STAGES>
__host__ __device__ constexpr int fwd_wgmma_smem_bytes() {
    return (64 * WGS + 2 * STAGES * BN) * D * 2 + 1024;
}

// load_tile's copy into the wgmma layout: rows row0 .. row0+ROWS of a [*, stride] matrix
// (columns 0..D) as D/64 blocks [ROWS][64] of 128-byte rows, 16-byte chunk c of row r at
// chunk c ^ (r % 8); rows >= row_end zero-filled. One address per thread, then constant
// offsets (the rows of a pass differ by a multiple of 8: the same swizzle). A tile with
// every row present (all but a sequence's last) takes a path with no per-copy guard and
// select: in the sm_90a SASS of the guarded form a copy cost ~6 instructions, ~190 for a
// K/V tile pair, about a fifth of the wgmma forward's issue per tile.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile_wg(uint8_t *tile, const __nv_bfloat16 *g, int64_t stride,
                                             int row0, int row_end) {
    constexpr int CPR = D / 8;      // 16-byte chunks per row
    constexpr int RSTEP = NT / CPR; // rows per pass of the block
    static_assert(NT % CPR == 0 && RSTEP % 8 == 0 && ROWS % RSTEP == 0, "load_tile_wg passes");
    const int r = threadIdx.x / CPR, ch = threadIdx.x % CPR;
    const __nv_bfloat16 *src = g + (int64_t)(row0 + r) * stride + ch * 8;
    uint8_t *dst = tile + (ch / 8) * ROWS * 128 + r * 128 + (((ch % 8) ^ (r % 8)) << 4);
    const int64_t step = (int64_t)RSTEP * stride;
    if (row0 + ROWS <= row_end) {
#pragma unroll
        for (int j = 0; j < ROWS / RSTEP; j++) cp_async16(dst + j * RSTEP * 128, src + j * step, true);
        return;
    }
#pragma unroll
    for (int j = 0; j < ROWS / RSTEP; j++) {
        const bool ok = row0 + r + j * RSTEP < row_end;
        cp_async16(dst + j * RSTEP * 128, ok ? src + j * step : g, ok);
    }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(PALIGN_KEMU)
// S = Q_w·Kᵀ: D/16 wgmmas over the head dim (the first with scale-d 0), one commit group.
template <int D, int BM, int BN>
__device__ __forceinline__ void fwd_wg_qk(float (&s)[BN / 2], uint64_t desc_q, uint64_t desc_k) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        // k16 step ks: head-dim block ks / 4 (a whole tile further), 32 B into its rows
        const uint32_t off = (ks / 4) * (BM * 128) + (ks % 4) * 32;
        const uint32_t koff = (ks / 4) * (BN * 128) + (ks % 4) * 32;
        if constexpr (BN == 128)
            wgmma_m64n128k16(s, desc_q + (off >> 4), desc_k + (koff >> 4), ks > 0);
        else
            wgmma_m64n64k16<0, 0>(s, desc_q + (off >> 4), desc_k + (koff >> 4), ks > 0);
    }
    wg_commit();
}

// O += P·V: BN/16 x D/64 wgmmas, P from registers, V MN-major as stored; one commit group.
template <int D, int BN>
__device__ __forceinline__ void fwd_wg_pv(float (&o)[D / 64][32], const uint32_t (&pf)[BN / 16][4],
                                          uint64_t desc_v) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++)
#pragma unroll
        for (int dh = 0; dh < D / 64; dh++) // keys 16kk..: 16 rows of 128 B further
            wgmma_m64n64k16_rs_t(o[dh], pf[kk], desc_v + ((dh * BN * 128 + kk * 2048) >> 4));
    wg_commit();
}

// Waits for every wgmma of the warpgroup, O's included.
template <int DH> __device__ __forceinline__ void fwd_wg_wait_o(float (&o)[DH][32]) {
    wg_wait<0>();
#pragma unroll
    for (int dh = 0; dh < DH; dh++) wg_pin(o[dh]);
}

// O's rows row_a (r = 0) and row_a + 8 (r = 1) times alpha[r], where the max moved.
template <int DH>
__device__ __forceinline__ void fwd_wg_rescale(float (&o)[DH][32], const float (&alpha)[2], bool moved) {
    if (!moved) return; // warp-uniform; alpha is exactly 1 then
#pragma unroll
    for (int dh = 0; dh < DH; dh++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) o[dh][4 * j + i] *= alpha[i / 2];
}

// P (f32, the S accumulator layout) as the A fragments of O += P·V: keys 16kk.. in pf[kk].
template <int BN>
__device__ __forceinline__ void fwd_wg_pack(uint32_t (&pf)[BN / 16][4], const float (&s)[BN / 2]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        pf[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
        pf[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        pf[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        pf[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// The masked online softmax of keys k0..k1 on S's registers (fwd's math, base 2) for rows
// row_a (r = 0) and row_a + 8 (r = 1), elements 4j + 2r + {0, 1}: s becomes P, the running
// max and sum move on, alpha[r] is what row r of O is to be rescaled by. Returns whether
// any row of the warp moved its max (warp-uniform).
template <int BN>
__device__ __forceinline__ bool fwd_wg_softmax(float (&s)[BN / 2], float (&m_run)[2], float (&l_run)[2],
                                               float (&alpha)[2], int row_a, int t4, int k0, int wq0,
                                               int wq1, int W, float sl2) {
    const int k1 = k0 + BN - 1;
    if (k1 > wq0 || (W > 0 && wq1 - k0 >= W)) {
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = k0 + 8 * j + 2 * t4 + (i & 1);
                if (!visible(row_a + 8 * (i / 2), key, W)) s[4 * j + i] = -INFINITY;
            }
    }
    bool moved = false;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
        const float m_use = online_max(mx, m_run[r], alpha[r], moved, sl2);
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            const float p0 = fast_exp2(fmaf(s[4 * j + 2 * r], sl2, -m_use));
            const float p1 = fast_exp2(fmaf(s[4 * j + 2 * r + 1], sl2, -m_use));
            s[4 * j + 2 * r] = p0;
            s[4 * j + 2 * r + 1] = p1;
            sum += p0 + p1;
        }
        l_run[r] = l_run[r] * alpha[r] + sum;
    }
    return __any_sync(0xffffffffu, moved);
}

template <int D, int WGS, int BN, int STAGES, bool OVL> __device__ void fwd_wgmma(const AttnFwdParams &p) {
    constexpr int BM = 64 * WGS, NT = 128 * WGS;
    constexpr int DH = D / 64;           // 64-wide blocks of the head dim
    constexpr int Q_BYTES = BM * D * 2;  // one Q tile
    constexpr int KV_BYTES = BN * D * 2; // one K (or V) tile
    constexpr int NS = BN / 2;           // S accumulators a thread (m64 x BN)
    static_assert((D == 64 || D == 128) && (BN == 64 || BN == 128) && (STAGES == 2 || STAGES == 3),
                  "fwd_wgmma tiles");
    // OVL issues PV(t-1) in tile t, after tile t+1's loads began: 3 stages keep V(t-1).
    // With BN = BM a warpgroup's active tiles are the block's last ones (its visible keys
    // are one range, which ends in the block's last tile), so no PV is held across an
    // inactive tile.
    static_assert(!OVL || (STAGES == 3 && BN == BM), "the overlapped forward's tiles");
    require_smem(fwd_wgmma_smem_bytes<D, WGS, BN, STAGES>());

    const int H = p.n_heads, group = p.n_heads / p.n_kv_heads;
    const int seq = blockIdx.x / H, h = blockIdx.x % H;
    const int start = p.seq_start[seq], len = p.seq_len[seq];
    const int qt = gridDim.y - 1 - blockIdx.y; // longest (last) query tiles first
    const int q0 = qt * BM;
    if (q0 >= len) return;
    const int W = p.window;
    const int kvh = h / group;
    const int64_t qs = (int64_t)H * D, kvs = (int64_t)p.n_kv_heads * D;
    const __nv_bfloat16 *Qg = p.q + (int64_t)start * qs + h * D;
    const __nv_bfloat16 *Kg = p.k + (int64_t)start * kvs + kvh * D;
    const __nv_bfloat16 *Vg = p.v + (int64_t)start * kvs + kvh * D;
    const int q_last = imin(len, q0 + BM) - 1;
    const int k_first = W > 0 ? imax(0, q0 - W + 1) : 0;
    const int t_lo = k_first / BN, t_hi = q_last / BN + 1;

    // 128B-swizzle atoms (and the descriptors' base offset 0) need 1024-byte alignment.
    PALIGN_DYNAMIC_SMEM(smem_raw);
    const uint32_t raw = smem_addr(smem_raw);
    uint8_t *smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    const uint32_t base = smem_addr(smem);
    auto k_off = [](int stage) { return Q_BYTES + stage * 2 * KV_BYTES; };
    auto v_off = [](int stage) { return Q_BYTES + stage * 2 * KV_BYTES + KV_BYTES; };

    const int wg = threadIdx.x / 128, q = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t4 = lane % 4;
    load_tile_wg<BM, D, NT>(smem, Qg, qs, q0, len);
    load_tile_wg<BN, D, NT>(smem + k_off(0), Kg, kvs, t_lo * BN, len);
    load_tile_wg<BN, D, NT>(smem + v_off(0), Vg, kvs, t_lo * BN, len);
    cp_async_commit();

    float o[DH][32]; // O columns 64dh + 8j + 2t4 + i%2 (element 4j + i)
#pragma unroll
    for (int dh = 0; dh < DH; dh++)
#pragma unroll
        for (int i = 0; i < 32; i++) o[dh][i] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f}; // rows row_a, row_a + 8
    const float sl2 = p.scale * LOG2E;
    const int wq0 = q0 + wg * 64, wq1 = wq0 + 63; // the warpgroup's query rows
    const int row_a = wq0 + 16 * q + g;
    // This warpgroup's Q rows (k16 step 0 of head-dim block 0).
    const uint64_t desc_q = wg_desc(base + wg * 64 * 128);
    // S, then P in place (f32). OVL: P(t-1) stays here into tile t, packed for PV(t-1)
    // only after tile t's barrier: packed earlier, into the registers PV(t-2) still reads,
    // ptxas pulls the PV wait up ahead of the softmax and the overlap is gone. Zeros until
    // the first active tile, whose PV of them (on its own V) adds nothing, so PV is issued
    // on every active tile with no branch around it (a wgmma under a branch the compiler
    // cannot prove uniform is serialized by ptxas, C7520).
    float s[NS] = {};
    int pv_stage = -1; // OVL: the stage of the tile whose PV is still to issue
    // OVL: the softmax of tile t leaves O's rescale (alpha, moved) to tile t+1, which waits
    // for PV(t-1) first. The wait stands unconditionally after the barrier: under the
    // warp-uniform branch on `moved` it would differ between the warps of a warpgroup,
    // which wgmma.wait_group's .aligned forbids; in the softmax's basic block ptxas
    // schedules it to the top of the block, ahead of the softmax it is there to overlap.
    float alpha_prev[2] = {1.0f, 1.0f};
    bool moved_prev = false;

    for (int t = t_lo; t < t_hi; t++) {
        const int k0 = t * BN;
        const int stage = (t - t_lo) % STAGES;
        cp_async_wait<0>();       // K/V(t) landed (this thread's part) ...
        fence_proxy_async_smem(); // ... visible to the wgmmas' async proxy ...
        __syncthreads();          // ... everyone's; every warpgroup done with stage (t+1)%S
        if (t + 1 < t_hi) {
            const int next = (t + 1 - t_lo) % STAGES;
            load_tile_wg<BN, D, NT>(smem + k_off(next), Kg, kvs, (t + 1) * BN, len);
            load_tile_wg<BN, D, NT>(smem + v_off(next), Vg, kvs, (t + 1) * BN, len);
            cp_async_commit();
        }
        const bool active = wq0 < len && k0 <= wq1 && (W == 0 || wq0 - (k0 + BN - 1) < W);
        if (!active) { // uniform over the warpgroup
            // STAGES = 3 (!OVL): PV(t-1) must not stay in flight into tile t+1, which
            // reloads its stage (with BM = BN no warpgroup idles after an active tile).
            if constexpr (STAGES == 3 && !OVL) {
                wg_wait<0>();
#pragma unroll
                for (int dh = 0; dh < DH; dh++) wg_pin(o[dh]);
            }
            continue;
        }

        // S(t), then (OVL) the previous tile's PV behind it: S(t)'s softmax below runs
        // while that PV is on the tensor cores (FA3's intra-warpgroup overlap).
        uint32_t pf[BN / 16][4]; // P for keys 16kk.., the A fragment of O += P·V
        if constexpr (OVL) {
            fwd_wg_wait_o(o); // PV(t-2) has landed in O (issued in tile t-1) ...
            fwd_wg_rescale(o, alpha_prev, moved_prev); // ... which moves to tile t-1's max
            fwd_wg_pack<BN>(pf, s);                    // P(t-1)
        }
        wg_fence();
        fwd_wg_qk<D, BM, BN>(s, desc_q, wg_desc(base + k_off(stage)));
        if constexpr (OVL) {
            fwd_wg_pv<D, BN>(o, pf, wg_desc_mn(base + v_off(pv_stage < 0 ? stage : pv_stage)));
            wg_wait<1>(); // S(t) only: the PV, committed after it, may still run
        } else {
            wg_wait<0>(); // S, and (STAGES = 3) the previous tile's PV into o
#pragma unroll
            for (int dh = 0; dh < DH; dh++) wg_pin(o[dh]);
        }
        wg_pin(s);

        float alpha[2];
        const bool moved = fwd_wg_softmax<BN>(s, m_run, l_run, alpha, row_a, t4, k0, wq0, wq1, W, sl2);
        if constexpr (OVL) {
            pv_stage = stage; // issued behind the next tile's S (or after the loop)
            alpha_prev[0] = alpha[0], alpha_prev[1] = alpha[1], moved_prev = moved;
        } else {
            fwd_wg_rescale(o, alpha, moved);
            fwd_wg_pack<BN>(pf, s);
            wg_fence();
            fwd_wg_pv<D, BN>(o, pf, wg_desc_mn(base + v_off(stage)));
            if constexpr (STAGES == 2) {
                wg_wait<0>();
#pragma unroll
                for (int dh = 0; dh < DH; dh++) wg_pin(o[dh]);
            }
        }
    }
    if constexpr (OVL) { // the last tile's PV (zeros on stage 0 for a warpgroup past len)
        uint32_t pf[BN / 16][4];
        fwd_wg_wait_o(o);
        fwd_wg_rescale(o, alpha_prev, moved_prev);
        fwd_wg_pack<BN>(pf, s);
        wg_fence();
        fwd_wg_pv<D, BN>(o, pf, wg_desc_mn(base + v_off(pv_stage < 0 ? 0 : pv_stage)));
    }
    wg_wait<0>();
#pragma unroll
    for (int dh = 0; dh < DH; dh++) wg_pin(o[dh]);

    // Normalize; stage the warp's 16 rows in its (no longer read) rows of the Q tile, then
    // write them with 16-byte stores.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        l_run[r] = l;
        inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    const int lr = wg * 64 + 16 * q + g; // row_a's row in the Q tile
    // Every thread's wgmma.wait_group has passed, so no S wgmma reads Q any more; the
    // barrier states that order for all threads (a racecheck run on kemu, which counts a
    // wgmma's operand reads per thread, flagged the staging writes without it).
    __syncthreads();
#pragma unroll
    for (int dh = 0; dh < DH; dh++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int row = lr + 8 * r;
                uint8_t *at = smem + dh * BM * 128 + row * 128 + ((j ^ (row % 8)) << 4) + 4 * t4;
                *reinterpret_cast<uint32_t *>(at) =
                    pack_bf16(o[dh][4 * j + 2 * r] * inv[r], o[dh][4 * j + 2 * r + 1] * inv[r]);
            }
    __syncwarp();
    constexpr int CPR = D / 8;
#pragma unroll
    for (int c = lane; c < 16 * CPR; c += 32) {
        const int r = c / CPR, ch = c % CPR;
        const int row = wg * 64 + 16 * q + r; // in the tile
        if (q0 + row < len) {
            const uint4 val = *reinterpret_cast<const uint4 *>(
                smem + (ch / 8) * BM * 128 + row * 128 + (((ch % 8) ^ (row % 8)) << 4));
            *reinterpret_cast<uint4 *>(p.o + (int64_t)(start + q0 + row) * qs + h * D + ch * 8) = val;
        }
    }
    if (t4 == 0) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int row = row_a + 8 * r;
            if (row < len) p.lse[(int64_t)(start + row) * H + h] = (m_run[r] + log2f(l_run[r])) * LN2;
        }
    }
}
#else
template <int D, int WGS, int BN, int STAGES, bool OVL> __device__ void fwd_wgmma(const AttnFwdParams &) { __trap(); }
#endif // __CUDA_ARCH_FEAT_SM90_ALL || PALIGN_KEMU

// ------------------------------------------------------------------------ backward
//
// Block: BN = 16·WARPS keys of one (sequence, KV head); warp w owns keys 16w..16w+15 and
// accumulates their dK, dV over every query head of the group and every query tile that
// sees them (so no reduction pass over the group). Per step (query head h, BM queries):
//   Sᵀ = K_w·Qᵀ, dPᵀ = V_w·dOᵀ     (16 x BM per warp; Q, dO B-fragments by ldmatrix)
//   Pᵀ = 2^(Sᵀ·c·log2e - lse·log2e), dSᵀ = Pᵀ∘(dPᵀ - D)
//   dV_w += Pᵀ·dO, dK_w += dSᵀ·Q     (accumulators reused as A fragments)
//   dSᵀ -> shared; dQ(BM x d) += dS·K split over the warps, f32 atomics to global.
// STAGES = 2 double-buffers Q/dO/lse/D so the next step's loads overlap this one.
// ASYNC = false (the default kernels): lse and D are read with plain loads inside the
// prefetch, so the threads that read them wait out a global-memory latency there, and dQ
// goes out as one f32 atomic per element. ASYNC = true: lse and D come by 4-byte cp.async
// (lse scaled by log2e once landed) and, on sm_90, dQ as paired red.global.add.v2.f32
// (half the atomic instructions).
template <int D, int WARPS, int BM, int STAGES>
__host__ __device__ constexpr int bwd_smem_bytes() {
    return (2 * 16 * WARPS * D + 2 * STAGES * BM * D + 16 * WARPS * BM) * 2 + 2 * STAGES * BM * 4;
}

// dst[0] += a, dst[1] += b in global memory (dst 8-byte aligned); PAIRED: one vector
// reduction on sm_90+ (PTX ISA 8.1 red .v2.f32), else two scalar atomics.
template <bool PAIRED>
__device__ __forceinline__ void red_add2(float *dst, float a, float b) {
#if __CUDA_ARCH__ >= 900
    if constexpr (PAIRED) {
        asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b)
                     : "memory");
        return;
    }
#endif
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
}

// lse (·log2e unless ASYNC) and delta of query rows q0 .. q0+BM of head h into stage
// `stage` of sL, sDl. lse = +inf makes P = 0 for rows past the end (no NaN: Q, dO are
// zero-filled).
template <int BM, int NT, bool ASYNC>
__device__ __forceinline__ void load_lse_delta(float *sL, float *sDl, int stage,
                                               const AttnBwdParams &p, int start, int h, int q0,
                                               int len) {
    for (int r = threadIdx.x; r < BM; r += NT) {
        const int row = q0 + r;
        const bool ok = row < len;
        const int64_t at = (int64_t)(start + row) * p.n_heads + h;
        if constexpr (ASYNC) {
            if (ok) { // scaled by log2e in scale_lse once it has landed
                cp_async4(sL + stage * BM + r, p.lse + at);
                cp_async4(sDl + stage * BM + r, p.delta + at);
            } else {
                sL[stage * BM + r] = INFINITY;
                sDl[stage * BM + r] = 0.0f;
            }
        } else {
            sL[stage * BM + r] = ok ? p.lse[at] * LOG2E : INFINITY;
            sDl[stage * BM + r] = ok ? p.delta[at] : 0.0f;
        }
    }
}

// ASYNC: lse ← lse·log2e for the rows this thread's load_lse_delta copied into `stage`,
// after its cp.async groups have completed and before the barrier that publishes them
// (the same f32 product as the plain path, so the same bits).
template <int BM, int NT, bool ASYNC>
__device__ __forceinline__ void scale_lse(float *sL, int stage, bool loaded) {
    if constexpr (ASYNC) {
        if (loaded)
            for (int r = threadIdx.x; r < BM; r += NT) sL[stage * BM + r] *= LOG2E;
    }
}

template <int D, int WARPS, int BM, int STAGES, bool ASYNC>
__device__ void bwd(const AttnBwdParams &p) {
    constexpr int BN = 16 * WARPS, NT = 32 * WARPS;
    constexpr int KS = D / 16; // k-steps over the head dim (Sᵀ, dPᵀ)
    constexpr int NQ = BM / 8; // 8-query column tiles of Sᵀ
    constexpr int ND = D / 8;  // 8-wide column tiles of dK, dV
    constexpr int KQ = BM / 16; // k-steps over queries (dV, dK)
    constexpr int MT = BM / 16; // dQ: 16-row tiles, split over WPM warps each
    constexpr int WPM = WARPS / MT;
    constexpr int NDQ = ND / WPM; // dQ column tiles per warp
    constexpr int KK = BN / 16;   // k-steps over keys (dQ)
    static_assert(WARPS % MT == 0 && ND % WPM == 0 && NDQ % 2 == 0, "dQ warp split");
    static_assert(STAGES == 1 || STAGES == 2, "stages");
    require_smem(bwd_smem_bytes<D, WARPS, BM, STAGES>());

    const int H = p.n_heads, Hkv = p.n_kv_heads, group = H / Hkv;
    const int seq = blockIdx.x / Hkv, kvh = blockIdx.x % Hkv;
    const int start = p.seq_start[seq], len = p.seq_len[seq];
    const int k0 = blockIdx.y * BN; // longest (first) key tiles first
    if (k0 >= len) return;
    const int W = p.window;
    const int64_t qs = (int64_t)H * D, kvs = (int64_t)Hkv * D;

    // Query tiles that see any key of the block.
    const int q_end = W > 0 ? imin(len, k0 + BN - 1 + W) : len;
    const int qt_lo = k0 / BM, n_qt = (q_end - 1) / BM + 1 - qt_lo;
    const int n_it = group * n_qt;

    PALIGN_DYNAMIC_SMEM(smem);
    __nv_bfloat16 *sK = reinterpret_cast<__nv_bfloat16 *>(smem);
    __nv_bfloat16 *sV = sK + BN * D;
    __nv_bfloat16 *sQ = sV + BN * D;          // [STAGES][BM*D]
    __nv_bfloat16 *sdO = sQ + STAGES * BM * D; // [STAGES][BM*D]
    __nv_bfloat16 *sdS = sdO + STAGES * BM * D; // [BN][BM]: dSᵀ
    float *sL = reinterpret_cast<float *>(sdS + BN * BM); // [STAGES][BM]: lse(·log2e)
    float *sDl = sL + STAGES * BM;                        // [STAGES][BM]: delta
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    auto load_step = [&](int it, int stage) {
        const int h = kvh * group + it / n_qt, q0 = (qt_lo + it % n_qt) * BM;
        load_tile<BM, D, NT>(sQ + stage * BM * D, p.q + (int64_t)start * qs + h * D, qs, q0, len);
        load_tile<BM, D, NT>(sdO + stage * BM * D, p.d_o + (int64_t)start * qs + h * D, qs, q0,
                             len);
        load_lse_delta<BM, NT, ASYNC>(sL, sDl, stage, p, start, h, q0, len);
    };

    load_tile<BN, D, NT>(sK, p.k + (int64_t)start * kvs + kvh * D, kvs, k0, len);
    load_tile<BN, D, NT>(sV, p.v + (int64_t)start * kvs + kvh * D, kvs, k0, len);
    load_step(0, 0);
    cp_async_commit();
    cp_async_wait<0>();
    scale_lse<BM, NT, ASYNC>(sL, 0, true);
    __syncthreads();

    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[nd][e] = dv[nd][e] = 0.0f;
    const float sl2 = p.scale * LOG2E;
    const int kw0 = k0 + warp * 16;   // the warp's keys kw0 .. kw0+15
    const int key_a = kw0 + lane / 4; // this thread's keys: key_a, key_a + 8
    const int dq_mt = warp % MT, dq_n0 = (warp / MT) * NDQ;

    for (int it = 0; it < n_it; it++) {
        const int stage = STAGES == 2 ? (it & 1) : 0;
        if (STAGES == 2 && it + 1 < n_it) {
            load_step(it + 1, stage ^ 1);
            cp_async_commit();
        }
        const int h = kvh * group + it / n_qt, q0 = (qt_lo + it % n_qt) * BM;
        const __nv_bfloat16 *cQ = sQ + stage * BM * D, *cdO = sdO + stage * BM * D;
        const float *cL = sL + stage * BM, *cDl = sDl + stage * BM;

        const bool active = kw0 < len && q0 + BM - 1 >= kw0 && (W == 0 || q0 - (kw0 + 15) < W);
        if (active) {
            const bool need_mask = q0 < kw0 + 15 || (W > 0 && q0 + BM - 1 - kw0 >= W);
            // Sᵀ = K_w·Qᵀ, then Pᵀ as bf16 A fragments (rows = keys, k = queries): the f32
            // scores die before dPᵀ is computed, which keeps the register peak down.
            uint32_t pa[KQ][4], dsa[KQ][4];
            {
                float s[NQ][4];
#pragma unroll
                for (int nq = 0; nq < NQ; nq++) s[nq][0] = s[nq][1] = s[nq][2] = s[nq][3] = 0.0f;
                // Two k-steps a trip (as tile_32x32): the next step's ldmatrix issues under
                // this one's mmas. No spills at d = 128 (254 registers).
#pragma unroll 2
                for (int ks = 0; ks < KS; ks++) {
                    uint32_t ka[4];
                    ldsm_x4(ka, sK + swz<D>(warp * 16 + (lane % 16), ks * 16 + (lane / 16) * 8));
#pragma unroll
                    for (int nq2 = 0; nq2 < NQ / 2; nq2++) {
                        uint32_t b[4];
                        ldsm_x4(b, cQ + swz<D>(nq2 * 16 + (lane % 8) + (lane / 16) * 8,
                                               ks * 16 + ((lane / 8) % 2) * 8));
                        mma_bf16(s[2 * nq2], ka, b[0], b[1]);
                        mma_bf16(s[2 * nq2 + 1], ka, b[2], b[3]);
                    }
                }
                // Masked scores -> -inf (2^-inf = 0), in a block of its own: folded into
                // the exponentials, the mask was predicated and issued at every step.
                if (need_mask) {
#pragma unroll
                    for (int nq = 0; nq < NQ; nq++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int col = nq * 8 + (lane % 4) * 2 + (e & 1);
                            if (!visible(q0 + col, key_a + (e >= 2 ? 8 : 0), W)) s[nq][e] = -INFINITY;
                        }
                }
#pragma unroll
                for (int nq = 0; nq < NQ; nq++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int col = nq * 8 + (lane % 4) * 2 + (e & 1);
                        s[nq][e] = fast_exp2(fmaf(s[nq][e], sl2, -cL[col]));
                    }
#pragma unroll
                for (int kq = 0; kq < KQ; kq++) {
                    pa[kq][0] = pack_bf16(s[2 * kq][0], s[2 * kq][1]);
                    pa[kq][1] = pack_bf16(s[2 * kq][2], s[2 * kq][3]);
                    pa[kq][2] = pack_bf16(s[2 * kq + 1][0], s[2 * kq + 1][1]);
                    pa[kq][3] = pack_bf16(s[2 * kq + 1][2], s[2 * kq + 1][3]);
                }
            }
            // dV += Pᵀ·dO (dO B-fragments: queries x dims, transposed).
#pragma unroll
            for (int kq = 0; kq < KQ; kq++) {
#pragma unroll
                for (int nd2 = 0; nd2 < ND / 2; nd2++) {
                    uint32_t b[4];
                    ldsm_x4_t(b, cdO + swz<D>(kq * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                              nd2 * 16 + (lane / 16) * 8));
                    mma_bf16(dv[2 * nd2], pa[kq], b[0], b[1]);
                    mma_bf16(dv[2 * nd2 + 1], pa[kq], b[2], b[3]);
                }
            }
            // dPᵀ = V_w·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ - D) with the bf16 P (as the dV product used).
            {
                float dp[NQ][4];
#pragma unroll
                for (int nq = 0; nq < NQ; nq++) dp[nq][0] = dp[nq][1] = dp[nq][2] = dp[nq][3] = 0.0f;
#pragma unroll 2
                for (int ks = 0; ks < KS; ks++) {
                    uint32_t va[4];
                    ldsm_x4(va, sV + swz<D>(warp * 16 + (lane % 16), ks * 16 + (lane / 16) * 8));
#pragma unroll
                    for (int nq2 = 0; nq2 < NQ / 2; nq2++) {
                        uint32_t b[4];
                        ldsm_x4(b, cdO + swz<D>(nq2 * 16 + (lane % 8) + (lane / 16) * 8,
                                                ks * 16 + ((lane / 8) % 2) * 8));
                        mma_bf16(dp[2 * nq2], va, b[0], b[1]);
                        mma_bf16(dp[2 * nq2 + 1], va, b[2], b[3]);
                    }
                }
#pragma unroll
                for (int kq = 0; kq < KQ; kq++)
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        // pa[kq][j] holds tile 2kq + j/2, elements 2(j%2), 2(j%2)+1.
                        const int nq = 2 * kq + j / 2, e = 2 * (j % 2);
                        const int col = nq * 8 + (lane % 4) * 2;
                        const float2 pf = unpack_bf16(pa[kq][j]);
                        dsa[kq][j] = pack_bf16(pf.x * (dp[nq][e] - cDl[col]),
                                               pf.y * (dp[nq][e + 1] - cDl[col + 1]));
                    }
            }
            // dK += dSᵀ·Q (Q B-fragments: queries x dims, transposed).
#pragma unroll
            for (int kq = 0; kq < KQ; kq++) {
#pragma unroll
                for (int nd2 = 0; nd2 < ND / 2; nd2++) {
                    uint32_t b[4];
                    ldsm_x4_t(b, cQ + swz<D>(kq * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                             nd2 * 16 + (lane / 16) * 8));
                    mma_bf16(dk[2 * nd2], dsa[kq], b[0], b[1]);
                    mma_bf16(dk[2 * nd2 + 1], dsa[kq], b[2], b[3]);
                }
            }
            // dSᵀ rows of this warp's keys, [key][query] in shared memory.
#pragma unroll
            for (int kq = 0; kq < KQ; kq++)
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const int col = (2 * kq + half) * 8 + (lane % 4) * 2;
                    const int r0 = warp * 16 + lane / 4;
                    *reinterpret_cast<uint32_t *>(sdS + swz<BM>(r0, col)) = dsa[kq][2 * half];
                    *reinterpret_cast<uint32_t *>(sdS + swz<BM>(r0 + 8, col)) =
                        dsa[kq][2 * half + 1];
                }
        } else {
            // Nothing visible: this warp's dSᵀ rows are zero.
            for (int c = lane; c < 16 * BM / 8; c += 32) {
                const int r = warp * 16 + c / (BM / 8), ch = c % (BM / 8);
                *reinterpret_cast<uint4 *>(sdS + swz<BM>(r, ch * 8)) = make_uint4(0, 0, 0, 0);
            }
        }
        __syncthreads(); // dSᵀ complete; Q/dO/lse/D of this step no longer read
        if (STAGES == 1 && it + 1 < n_it) {
            load_step(it + 1, 0);
            cp_async_commit();
        }

        // dQ rows q0 + 16·dq_mt .. +15, columns of tiles dq_n0 .. dq_n0+NDQ: dS·K.
        float acc[NDQ][4];
#pragma unroll
        for (int j = 0; j < NDQ; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KK; kk++) {
            // A = dS (queries x keys) from dSᵀ [key][query]: transposed load.
            uint32_t a[4];
            ldsm_x4_t(a, sdS + swz<BM>(kk * 16 + (lane % 8) + (lane / 16) * 8,
                                       dq_mt * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
            for (int j2 = 0; j2 < NDQ / 2; j2++) {
                uint32_t b[4];
                ldsm_x4_t(b, sK + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                         (dq_n0 + 2 * j2) * 8 + (lane / 16) * 8));
                mma_bf16(acc[2 * j2], a, b[0], b[1]);
                mma_bf16(acc[2 * j2 + 1], a, b[2], b[3]);
            }
        }
        // Row qa + 8r, columns dq_n0·8 + 8j + 2(lane % 4): one address, then constant
        // steps (a row's address computed per element cost ~10 instructions an atomic).
        const int qa = q0 + dq_mt * 16 + lane / 4;
        float *dq_row = p.dq_accum + (int64_t)(start + qa) * qs + h * D + dq_n0 * 8 + (lane % 4) * 2;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (qa + 8 * r < len) {
#pragma unroll
                for (int j = 0; j < NDQ; j++)
                    red_add2<ASYNC>(dq_row + 8 * r * qs + 8 * j, acc[j][2 * r], acc[j][2 * r + 1]);
            }
        }
        cp_async_wait<0>(); // the next step's tiles landed ...
        scale_lse<BM, NT, ASYNC>(sL, STAGES == 2 ? stage ^ 1 : 0, it + 1 < n_it);
        __syncthreads(); // ... for everyone; everyone done reading dSᵀ
    }

    const float c = p.scale;
#pragma unroll
    for (int nd = 0; nd < ND; nd++) {
        const int col = nd * 8 + (lane % 4) * 2;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int key = key_a + 8 * r;
            if (key < len) {
                const int64_t at = (int64_t)(start + key) * kvs + kvh * D + col;
                *reinterpret_cast<uint32_t *>(p.dk + at) =
                    pack_bf16(dk[nd][2 * r] * c, dk[nd][2 * r + 1] * c);
                *reinterpret_cast<uint32_t *>(p.dv + at) = pack_bf16(dv[nd][2 * r], dv[nd][2 * r + 1]);
            }
        }
    }
}

// ------------------------------------------------------ backward, warp-grid variant
//
// Same block (BN = 16·WARPS keys of one (sequence, KV head), looping over the group's query
// heads and the query tiles that see them) and the same math as bwd, but each product of a
// step (BM = 64 queries) is tiled over the warps as a grid, with Pᵀ and dSᵀ passed through
// shared memory (the FA2 paper's backward). With WK = WARPS / 2 row groups of 32 keys:
//   Sᵀ, dPᵀ (BN x 64):  warp w owns keys 32·(w % WK) .. +31 x queries 32·(w / WK) .. +31:
//                       Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ; Pᵀ, dSᵀ = Pᵀ∘(dPᵀ - D) (bf16) -> shared.
//   ---- barrier: Pᵀ, dSᵀ complete ----
//   dV, dK (BN x d):    warp w owns keys 32·(w % WK) .. +31 x dims (d/2)·(w / WK) ..:
//                       dV += Pᵀ·dO, dK += dSᵀ·Q (A fragments from shared, accumulators
//                       in registers for the whole block: 2·32·(d/2) f32 per warp).
//   dQ (64 x d):        warp w owns queries 32·(w % 2) .. +31 x dims (d/WK)·(w / 2) ..:
//                       dS·K, added to global with paired f32 atomics (sm_90), as bwd ASYNC.
//   ---- barrier: next Q/dO/lse/D landed; Pᵀ, dSᵀ free ----
// Why: in bwd every warp's Q and dO fragments feed 2 mmas (16 keys), 301 B of shared-memory
// reads+writes per 4096-FLOP mma at d = 128. A 32 x 32 warp tile feeds each ldmatrix.x4 to 4+
// mmas. Per step at d = 128, 8 warps: 1152 ldmatrix.x4 (512 B) + 32 KB of Pᵀ/dSᵀ stores
// for 2560 mmas, 243 B per mma (-19%); 4 warps: 243 B (bwd: 294 B). At d = 64 the dQ and
// dK/dV tiles are thinner: 307 B (bwd: 320 B) with 8 warps, 282 B (307 B) with 4.
// Two barriers per step, as bwd; lse/D by cp.async, so neither waits on a global load.
// STAGES must be 2: Q and dO are still read after the mid-step barrier.
// A warp's 32 x 32 tile c = a·bᵀ over the head dim: rows a0..a0+31 of a and b0..b0+31 of
// b, both swizzled [rows][D] tiles in shared memory (Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ in bwdg).
template <int D>
__device__ __forceinline__ void tile_32x32(float c[2][4][4], const __nv_bfloat16 *a, int a0,
                                           const __nv_bfloat16 *b, int b0, int lane) {
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nq = 0; nq < 4; nq++) c[mt][nq][0] = c[mt][nq][1] = c[mt][nq][2] = c[mt][nq][3] = 0.0f;
    // Two k-steps per trip: the second step's ldmatrix issue under the first's mmas (with
    // one, each step waited out its own ldmatrix latency, at 2 warps a scheduler). No
    // spills at d = 128 (244 registers with 8 warps); full unrolling would spill.
#pragma unroll 2
    for (int ks = 0; ks < D / 16; ks++) {
        uint32_t af[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
            ldsm_x4(af[mt], a + swz<D>(a0 + 16 * mt + (lane % 16), ks * 16 + (lane / 16) * 8));
#pragma unroll
        for (int nq2 = 0; nq2 < 2; nq2++) {
            uint32_t bf[4];
            ldsm_x4(bf, b + swz<D>(b0 + nq2 * 16 + (lane % 8) + (lane / 16) * 8,
                                   ks * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                mma_bf16(c[mt][2 * nq2], af[mt], bf[0], bf[1]);
                mma_bf16(c[mt][2 * nq2 + 1], af[mt], bf[2], bf[3]);
            }
        }
    }
}

template <int D, int WARPS, int BM, int STAGES>
__host__ __device__ constexpr int bwdg_smem_bytes() {
    return (2 * 16 * WARPS * D + 2 * STAGES * BM * D + 2 * 16 * WARPS * BM) * 2 + 2 * STAGES * BM * 4;
}

template <int D, int WARPS, int BM, int STAGES>
__device__ void bwdg(const AttnBwdParams &p) {
    constexpr int BN = 16 * WARPS, NT = 32 * WARPS;
    constexpr int WK = WARPS / 2;  // 32-key row groups of the Sᵀ/dPᵀ and dK/dV grids
    constexpr int DH = D / 2;      // dK/dV columns per warp
    constexpr int NDH = DH / 8;    // their 8-wide tiles
    constexpr int DQW = D / WK;    // dQ columns per warp ...
    constexpr int DQC = DQW < 32 ? DQW : 32; // ... in passes of at most 32 (accumulator size)
    constexpr int NDQ = DQC / 8;
    static_assert(BM == 64 && (WARPS == 4 || WARPS == 8) && STAGES == 2, "bwdg tiles");
    static_assert(NDH % 2 == 0 && NDQ % 2 == 0 && DQW % DQC == 0, "bwdg column split");
    require_smem(bwdg_smem_bytes<D, WARPS, BM, STAGES>());

    const int H = p.n_heads, Hkv = p.n_kv_heads, group = H / Hkv;
    const int seq = blockIdx.x / Hkv, kvh = blockIdx.x % Hkv;
    const int start = p.seq_start[seq], len = p.seq_len[seq];
    const int k0 = blockIdx.y * BN; // longest (first) key tiles first
    if (k0 >= len) return;
    const int W = p.window;
    const int64_t qs = (int64_t)H * D, kvs = (int64_t)Hkv * D;

    // Query tiles that see any key of the block.
    const int q_end = W > 0 ? imin(len, k0 + BN - 1 + W) : len;
    const int qt_lo = k0 / BM, n_qt = (q_end - 1) / BM + 1 - qt_lo;
    const int n_it = group * n_qt;

    PALIGN_DYNAMIC_SMEM(smem);
    __nv_bfloat16 *sK = reinterpret_cast<__nv_bfloat16 *>(smem);
    __nv_bfloat16 *sV = sK + BN * D;
    __nv_bfloat16 *sQ = sV + BN * D;            // [STAGES][BM*D]
    __nv_bfloat16 *sdO = sQ + STAGES * BM * D;  // [STAGES][BM*D]
    __nv_bfloat16 *sP = sdO + STAGES * BM * D;  // [BN][BM]: Pᵀ
    __nv_bfloat16 *sdS = sP + BN * BM;          // [BN][BM]: dSᵀ
    float *sL = reinterpret_cast<float *>(sdS + BN * BM); // [STAGES][BM]: lse·log2e
    float *sDl = sL + STAGES * BM;                        // [STAGES][BM]: delta
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    auto load_step = [&](int it, int stage) {
        const int h = kvh * group + it / n_qt, q0 = (qt_lo + it % n_qt) * BM;
        load_tile<BM, D, NT>(sQ + stage * BM * D, p.q + (int64_t)start * qs + h * D, qs, q0, len);
        load_tile<BM, D, NT>(sdO + stage * BM * D, p.d_o + (int64_t)start * qs + h * D, qs, q0,
                             len);
        load_lse_delta<BM, NT, true>(sL, sDl, stage, p, start, h, q0, len);
    };

    load_tile<BN, D, NT>(sK, p.k + (int64_t)start * kvs + kvh * D, kvs, k0, len);
    load_tile<BN, D, NT>(sV, p.v + (int64_t)start * kvs + kvh * D, kvs, k0, len);
    load_step(0, 0);
    cp_async_commit();
    cp_async_wait<0>();
    scale_lse<BM, NT, true>(sL, 0, true);
    __syncthreads();

    // The warp's places in the three grids.
    const int wk = warp % WK, wq = warp / WK; // Sᵀ/dPᵀ: keys 32wk.., queries 32wq..
    const int wd = warp / WK;                 // dK/dV: keys 32wk.., dims DH·wd..
    const int wq2 = warp % 2, wn = warp / 2;  // dQ: queries 32wq2.., dims DQW·wn..
    float dk[2][NDH][4], dv[2][NDH][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nd = 0; nd < NDH; nd++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk[mt][nd][e] = dv[mt][nd][e] = 0.0f;
    const float sl2 = p.scale * LOG2E;
    const int kw0 = k0 + 32 * wk; // the warp's keys kw0 .. kw0+31 (Sᵀ and dK/dV)

    for (int it = 0; it < n_it; it++) {
        const int stage = it & 1;
        if (it + 1 < n_it) {
            load_step(it + 1, stage ^ 1);
            cp_async_commit();
        }
        const int h = kvh * group + it / n_qt, q0 = (qt_lo + it % n_qt) * BM;
        const __nv_bfloat16 *cQ = sQ + stage * BM * D, *cdO = sdO + stage * BM * D;
        const float *cL = sL + stage * BM, *cDl = sDl + stage * BM;

        const int qw0 = q0 + 32 * wq; // the warp's Sᵀ queries qw0 .. qw0+31
        const bool active = kw0 < len && qw0 + 31 >= kw0 && (W == 0 || qw0 - (kw0 + 31) < W);
        if (active) {
            const bool need_mask = qw0 < kw0 + 31 || (W > 0 && qw0 + 31 - kw0 >= W);
            // Pᵀ as bf16 pairs (m-tile, 8-query tile, row half): kept for dSᵀ.
            uint32_t pb[2][4][2];
            {
                float s[2][4][4];
                tile_32x32<D>(s, sK, 32 * wk, cQ, 32 * wq, lane);
                if (need_mask) { // as in bwd: a block of its own
#pragma unroll
                    for (int mt = 0; mt < 2; mt++)
#pragma unroll
                        for (int nq = 0; nq < 4; nq++)
#pragma unroll
                            for (int e = 0; e < 4; e++) {
                                const int col = 32 * wq + nq * 8 + (lane % 4) * 2 + (e & 1);
                                const int key = kw0 + 16 * mt + lane / 4 + (e >= 2 ? 8 : 0);
                                if (!visible(q0 + col, key, W)) s[mt][nq][e] = -INFINITY;
                            }
                }
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int nq = 0; nq < 4; nq++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int col = 32 * wq + nq * 8 + (lane % 4) * 2 + (e & 1);
                            s[mt][nq][e] = fast_exp2(fmaf(s[mt][nq][e], sl2, -cL[col]));
                        }
                        pb[mt][nq][0] = pack_bf16(s[mt][nq][0], s[mt][nq][1]);
                        pb[mt][nq][1] = pack_bf16(s[mt][nq][2], s[mt][nq][3]);
                    }
            }
            // Pᵀ -> shared [key][query].
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nq = 0; nq < 4; nq++)
#pragma unroll
                    for (int half = 0; half < 2; half++) {
                        const int r = 32 * wk + 16 * mt + 8 * half + lane / 4;
                        const int col = 32 * wq + nq * 8 + (lane % 4) * 2;
                        *reinterpret_cast<uint32_t *>(sP + swz<BM>(r, col)) = pb[mt][nq][half];
                    }
            // dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ - D) with the bf16 P (as the dV product uses).
            {
                float dp[2][4][4];
                tile_32x32<D>(dp, sV, 32 * wk, cdO, 32 * wq, lane);
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int nq = 0; nq < 4; nq++)
#pragma unroll
                        for (int half = 0; half < 2; half++) {
                            const int col = 32 * wq + nq * 8 + (lane % 4) * 2;
                            const int r = 32 * wk + 16 * mt + 8 * half + lane / 4;
                            const float2 pf = unpack_bf16(pb[mt][nq][half]);
                            *reinterpret_cast<uint32_t *>(sdS + swz<BM>(r, col)) =
                                pack_bf16(pf.x * (dp[mt][nq][2 * half] - cDl[col]),
                                          pf.y * (dp[mt][nq][2 * half + 1] - cDl[col + 1]));
                        }
            }
        } else {
            // Nothing visible in the warp's tile: its Pᵀ and dSᵀ are zero.
#pragma unroll
            for (int c = lane; c < 32 * 4; c += 32) {
                const int r = 32 * wk + c / 4, col = 32 * wq + (c % 4) * 8;
                *reinterpret_cast<uint4 *>(sP + swz<BM>(r, col)) = make_uint4(0, 0, 0, 0);
                *reinterpret_cast<uint4 *>(sdS + swz<BM>(r, col)) = make_uint4(0, 0, 0, 0);
            }
        }
        __syncthreads(); // Pᵀ and dSᵀ complete

        // dV += Pᵀ·dO, dK += dSᵀ·Q: keys 32wk.., dims DH·wd.. (B fragments: queries x dims,
        // transposed).
#pragma unroll
        for (int kq = 0; kq < BM / 16; kq++) {
            uint32_t a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
                ldsm_x4(a[mt], sP + swz<BM>(32 * wk + 16 * mt + (lane % 16), kq * 16 + (lane / 16) * 8));
#pragma unroll
            for (int nd2 = 0; nd2 < NDH / 2; nd2++) {
                uint32_t b[4];
                ldsm_x4_t(b, cdO + swz<D>(kq * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                          DH * wd + nd2 * 16 + (lane / 16) * 8));
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma_bf16(dv[mt][2 * nd2], a[mt], b[0], b[1]);
                    mma_bf16(dv[mt][2 * nd2 + 1], a[mt], b[2], b[3]);
                }
            }
        }
#pragma unroll
        for (int kq = 0; kq < BM / 16; kq++) {
            uint32_t a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
                ldsm_x4(a[mt], sdS + swz<BM>(32 * wk + 16 * mt + (lane % 16), kq * 16 + (lane / 16) * 8));
#pragma unroll
            for (int nd2 = 0; nd2 < NDH / 2; nd2++) {
                uint32_t b[4];
                ldsm_x4_t(b, cQ + swz<D>(kq * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                         DH * wd + nd2 * 16 + (lane / 16) * 8));
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma_bf16(dk[mt][2 * nd2], a[mt], b[0], b[1]);
                    mma_bf16(dk[mt][2 * nd2 + 1], a[mt], b[2], b[3]);
                }
            }
        }

        // dQ rows q0 + 32wq2 .. +31, columns DQW·wn .. +DQW in passes of DQC: dS·K.
#pragma unroll
        for (int c = 0; c < DQW / DQC; c++) {
            const int n0 = DQW * wn + DQC * c;
            float acc[2][NDQ][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int j = 0; j < NDQ; j++) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.0f;
            // Unrolled by 4, not fully: the fully unrolled loop's hoisted loads spill (d = 128).
#pragma unroll 4
            for (int kk = 0; kk < BN / 16; kk++) {
                // A = dS (queries x keys) from dSᵀ [key][query]: transposed load.
                uint32_t a[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
                    ldsm_x4_t(a[mt], sdS + swz<BM>(kk * 16 + (lane % 8) + (lane / 16) * 8,
                                                   32 * wq2 + 16 * mt + ((lane / 8) % 2) * 8));
#pragma unroll
                for (int j2 = 0; j2 < NDQ / 2; j2++) {
                    uint32_t b[4];
                    ldsm_x4_t(b, sK + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                             n0 + 16 * j2 + (lane / 16) * 8));
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        mma_bf16(acc[mt][2 * j2], a[mt], b[0], b[1]);
                        mma_bf16(acc[mt][2 * j2 + 1], a[mt], b[2], b[3]);
                    }
                }
            }
            // Rows qw + 16mt + 8r: one address, then constant steps (as in bwd).
            const int qw = q0 + 32 * wq2 + lane / 4;
            float *dq_row = p.dq_accum + (int64_t)(start + qw) * qs + h * D + n0 + (lane % 4) * 2;
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    if (qw + 16 * mt + 8 * r < len) {
#pragma unroll
                        for (int j = 0; j < NDQ; j++)
                            red_add2<true>(dq_row + (16 * mt + 8 * r) * qs + 8 * j,
                                           acc[mt][j][2 * r], acc[mt][j][2 * r + 1]);
                    }
                }
        }
        cp_async_wait<0>(); // the next step's tiles landed ...
        scale_lse<BM, NT, true>(sL, stage ^ 1, it + 1 < n_it);
        __syncthreads(); // ... for everyone; everyone done with this step's buffers
    }

    const float c = p.scale;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nd = 0; nd < NDH; nd++) {
            const int col = DH * wd + nd * 8 + (lane % 4) * 2;
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int key = kw0 + 16 * mt + 8 * r + lane / 4;
                if (key < len) {
                    const int64_t at = (int64_t)(start + key) * kvs + kvh * D + col;
                    *reinterpret_cast<uint32_t *>(p.dk + at) =
                        pack_bf16(dk[mt][nd][2 * r] * c, dk[mt][nd][2 * r + 1] * c);
                    *reinterpret_cast<uint32_t *>(p.dv + at) =
                        pack_bf16(dv[mt][nd][2 * r], dv[mt][nd][2 * r + 1]);
                }
            }
        }
}

// ----------------------------------------------------------------- backward, wgmma
//
// bwd_wgmma<D, WGS, BM, STAGES>: bwdg's products on warpgroup MMAs (sm_90a only; other
// images trap, the launcher refuses other GPUs). Block: BN = 64·WGS keys of one
// (sequence, KV head), warpgroup w owning keys k0 + 64w ..; per step (query head h of
// the group, BM = 64 queries, Q/dO/lse/D double-buffered), warpgroup w:
//   Sᵀ = K_w·Qᵀ, dPᵀ = V_w·dOᵀ   D/16 x wgmma m64n64k16 each; A = K_w / V_w and B = Q / dO,
//                                all K-major in shared memory (rows of d)
//   Pᵀ = bf16(2^(Sᵀ·c·log2e - lse·log2e)), dSᵀ = Pᵀ∘(dPᵀ - D)   on the accumulators
//   dV_w += Pᵀ·dO, dK_w += dSᵀ·Q   BM/16 x D/64 x wgmma m64n64k16: A = Pᵀ / dSᵀ from
//                                registers (the accumulators of 16 queries are the A
//                                fragment, as in fwd_wgmma), B = dO / Q as stored (MN-major:
//                                queries are k)
//   dSᵀ -> shared [keys][queries]; barrier; dQ (BM x D) += dS·K split by head-dim block:
//   warpgroup w computes d 64w .. 64w+63 (D = 64·WGS) as BN/16 x wgmma m64n64k16 with
//   A = dS (dSᵀ as stored: MN-major, queries are m) and B = K's block w (MN-major), then
//   paired f32 reductions into dq_accum (as bwdg; the dq kernel scales by c).
// Layout: the wgmma tiles of fwd_wgmma (128-byte rows of 64 bf16, 1024-byte aligned):
//   K, V [D/64][BN][64]; STAGES x Q, dO [D/64][BM][64]; dSᵀ [BN][BM]; lse·log2e, D.
// Step: loads of step it+1; Sᵀ, dPᵀ wgmmas, wait; softmax terms, dSᵀ stores, fence.proxy
// .async; dV/dK wgmmas (left in flight); barrier; dQ wgmmas, wait (dV/dK too); reductions;
// wait for step it+1's loads, barrier.
template <int D, int WGS, int BM, int STAGES>
__host__ __device__ constexpr int bwd_wgmma_smem_bytes() {
    return (2 * 64 * WGS * D + 2 * STAGES * BM * D + 64 * WGS * BM) * 2 + 2 * STAGES * BM * 4 + 1024;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(PALIGN_KEMU)
template <int D, int WGS, int BM, int STAGES> __device__ void bwd_wgmma(const AttnBwdParams &p) {
    constexpr int BN = 64 * WGS, NT = 128 * WGS, DH = D / 64;
    constexpr int KV_BYTES = BN * D * 2, QT_BYTES = BM * D * 2;
    constexpr int OFF_K = 0, OFF_V = KV_BYTES, OFF_Q = 2 * KV_BYTES;
    constexpr int OFF_DO = OFF_Q + STAGES * QT_BYTES, OFF_DS = OFF_DO + STAGES * QT_BYTES;
    constexpr int OFF_L = OFF_DS + BN * BM * 2;
    static_assert(D == 64 * WGS && BM == 64 && STAGES == 2, "bwd_wgmma tiles");
    require_smem(bwd_wgmma_smem_bytes<D, WGS, BM, STAGES>());

    const int H = p.n_heads, Hkv = p.n_kv_heads, group = H / Hkv;
    const int seq = blockIdx.x / Hkv, kvh = blockIdx.x % Hkv;
    const int start = p.seq_start[seq], len = p.seq_len[seq];
    const int k0 = blockIdx.y * BN; // longest (first) key tiles first
    if (k0 >= len) return;
    const int W = p.window;
    const int64_t qs = (int64_t)H * D, kvs = (int64_t)Hkv * D;
    // Query tiles that see any key of the block.
    const int q_end = W > 0 ? imin(len, k0 + BN - 1 + W) : len;
    const int qt_lo = k0 / BM, n_qt = (q_end - 1) / BM + 1 - qt_lo;
    const int n_it = group * n_qt;

    PALIGN_DYNAMIC_SMEM(smem_raw);
    const uint32_t raw = smem_addr(smem_raw);
    uint8_t *smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    const uint32_t base = smem_addr(smem);
    float *sL = reinterpret_cast<float *>(smem + OFF_L); // [STAGES][BM]: lse·log2e
    float *sDl = sL + STAGES * BM;                         // [STAGES][BM]: delta

    auto load_step = [&](int it, int stage) {
        const int h = kvh * group + it / n_qt, q0 = (qt_lo + it % n_qt) * BM;
        load_tile_wg<BM, D, NT>(smem + OFF_Q + stage * QT_BYTES, p.q + (int64_t)start * qs + h * D,
                                qs, q0, len);
        load_tile_wg<BM, D, NT>(smem + OFF_DO + stage * QT_BYTES,
                                p.d_o + (int64_t)start * qs + h * D, qs, q0, len);
        load_lse_delta<BM, NT, true>(sL, sDl, stage, p, start, h, q0, len);
    };
    load_tile_wg<BN, D, NT>(smem + OFF_K, p.k + (int64_t)start * kvs + kvh * D, kvs, k0, len);
    load_tile_wg<BN, D, NT>(smem + OFF_V, p.v + (int64_t)start * kvs + kvh * D, kvs, k0, len);
    load_step(0, 0);
    cp_async_commit();
    cp_async_wait<0>();
    scale_lse<BM, NT, true>(sL, 0, true);
    fence_proxy_async_smem();
    __syncthreads();

    const int wg = threadIdx.x / 128, q = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t4 = lane % 4;
    float dk[DH][32], dv[DH][32]; // columns 64dh + 8j + 2t4 + i%2 (element 4j + i)
#pragma unroll
    for (int dh = 0; dh < DH; dh++)
#pragma unroll
        for (int i = 0; i < 32; i++) dk[dh][i] = dv[dh][i] = 0.0f;
    const float sl2 = p.scale * LOG2E;
    const int kw0 = k0 + 64 * wg;       // the warpgroup's keys
    const int key_a = kw0 + 16 * q + g; // this thread's keys: key_a, key_a + 8
    uint8_t *ds_rows = smem + OFF_DS + wg * 64 * 128; // the warpgroup's rows of dSᵀ
    const uint64_t desc_k = wg_desc(base + OFF_K + wg * 64 * 128);
    const uint64_t desc_v = wg_desc(base + OFF_V + wg * 64 * 128);
    const uint64_t desc_ds = wg_desc_mn(base + OFF_DS);
    const uint64_t desc_kd = wg_desc_mn(base + OFF_K + wg * BN * 128); // K's d block wg

    for (int it = 0; it < n_it; it++) {
        const int stage = it & 1;
        if (it + 1 < n_it) {
            load_step(it + 1, stage ^ 1);
            cp_async_commit();
        }
        const int h = kvh * group + it / n_qt, q0 = (qt_lo + it % n_qt) * BM;
        const uint32_t q_at = base + OFF_Q + stage * QT_BYTES, do_at = base + OFF_DO + stage * QT_BYTES;
        const float *cL = sL + stage * BM, *cDl = sDl + stage * BM;
        const bool active = kw0 < len && q0 + BM - 1 >= kw0 && (W == 0 || q0 - (kw0 + 63) < W);
        if (active) { // uniform over the warpgroup
            float s[32], dp[32];
            const uint64_t desc_q = wg_desc(q_at), desc_do = wg_desc(do_at);
            wg_fence();
#pragma unroll
            for (int ks = 0; ks < D / 16; ks++) {
                // k16 step ks: head-dim block ks / 4, 32 B into its rows
                const uint32_t a = ((ks / 4) * BN * 128 + (ks % 4) * 32) >> 4;
                const uint32_t b = ((ks / 4) * BM * 128 + (ks % 4) * 32) >> 4;
                wgmma_m64n64k16<0, 0>(s, desc_k + a, desc_q + b, ks > 0);
                wgmma_m64n64k16<0, 0>(dp, desc_v + a, desc_do + b, ks > 0);
            }
            wg_commit();
            wg_wait<0>();
            wg_pin(s);
            wg_pin(dp);
            if (q0 < kw0 + 63 || (W > 0 && q0 + BM - 1 - kw0 >= W)) { // a block of its own
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        if (!visible(q0 + 8 * j + 2 * t4 + (i & 1), key_a + 8 * (i / 2), W))
                            s[4 * j + i] = -INFINITY;
            }
            // Element 4j + i: key key_a + 8(i/2), query q0 + 8j + 2t4 + i%2. In the A
            // fragment of queries 16kk..: kk = j / 2, register 2(j % 2) + i / 2.
            uint32_t pb[BM / 16][4], dsb[BM / 16][4];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int col = 8 * j + 2 * t4;
                const float l0 = cL[col], l1 = cL[col + 1], d0 = cDl[col], d1 = cDl[col + 1];
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const uint32_t pp = pack_bf16(fast_exp2(fmaf(s[4 * j + 2 * r], sl2, -l0)),
                                                  fast_exp2(fmaf(s[4 * j + 2 * r + 1], sl2, -l1)));
                    const float2 pf = unpack_bf16(pp); // dS from the bf16 P, as dV uses it
                    const uint32_t dd = pack_bf16(pf.x * (dp[4 * j + 2 * r] - d0),
                                                  pf.y * (dp[4 * j + 2 * r + 1] - d1));
                    pb[j / 2][2 * (j % 2) + r] = pp;
                    dsb[j / 2][2 * (j % 2) + r] = dd;
                    // dSᵀ row 16q + g + 8r of the warpgroup's (swizzle row % 8 = g)
                    *reinterpret_cast<uint32_t *>(ds_rows + (16 * q + g + 8 * r) * 128 + ((j ^ g) << 4) +
                                                  4 * t4) = dd;
                }
            }
            fence_proxy_async_smem(); // the dSᵀ stores, for the dQ wgmmas after the barrier
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BM / 16; kk++)
#pragma unroll
                for (int dh = 0; dh < DH; dh++) { // queries 16kk..: 16 rows of 128 B further
                    const uint32_t b = dh * BM * 128 + kk * 2048;
                    wgmma_m64n64k16_rs_t(dv[dh], pb[kk], wg_desc_mn(do_at + b));
                    wgmma_m64n64k16_rs_t(dk[dh], dsb[kk], wg_desc_mn(q_at + b));
                }
            wg_commit();
        } else {
            // Nothing visible to the warpgroup's keys: its rows of dSᵀ are zero.
            for (int c = threadIdx.x % 128; c < 64 * 8; c += 128)
                *reinterpret_cast<uint4 *>(ds_rows + 16 * c) = make_uint4(0, 0, 0, 0);
            fence_proxy_async_smem();
        }
        __syncthreads(); // dSᵀ complete

        // dQ rows q0 .., head dims 64wg .. 64wg+63.
        float dq[32];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) // keys 16kk..: 16 rows of 128 B further
            wgmma_m64n64k16<1, 1>(dq, desc_ds + ((kk * 2048) >> 4), desc_kd + ((kk * 2048) >> 4), kk > 0);
        wg_commit();
        wg_wait<0>(); // dQ, and this step's dV/dK
        wg_pin(dq);
        const int qa = q0 + 16 * q + g;
        float *dq_row = p.dq_accum + (int64_t)(start + qa) * qs + h * D + 64 * wg + 2 * t4;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (qa + 8 * r < len) {
#pragma unroll
                for (int j = 0; j < 8; j++)
                    red_add2<true>(dq_row + 8 * r * qs + 8 * j, dq[4 * j + 2 * r], dq[4 * j + 2 * r + 1]);
            }
        }
        cp_async_wait<0>(); // the next step's tiles landed ...
        scale_lse<BM, NT, true>(sL, stage ^ 1, it + 1 < n_it);
        fence_proxy_async_smem();
        __syncthreads(); // ... for everyone; everyone done with this step's buffers
    }
#pragma unroll
    for (int dh = 0; dh < DH; dh++) {
        wg_pin(dk[dh]);
        wg_pin(dv[dh]);
    }

    const float c = p.scale;
#pragma unroll
    for (int dh = 0; dh < DH; dh++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int key = key_a + 8 * r;
                if (key < len) {
                    const int64_t at = (int64_t)(start + key) * kvs + kvh * D + 64 * dh + 8 * j + 2 * t4;
                    *reinterpret_cast<uint32_t *>(p.dk + at) =
                        pack_bf16(dk[dh][4 * j + 2 * r] * c, dk[dh][4 * j + 2 * r + 1] * c);
                    *reinterpret_cast<uint32_t *>(p.dv + at) =
                        pack_bf16(dv[dh][4 * j + 2 * r], dv[dh][4 * j + 2 * r + 1]);
                }
            }
}
#else
template <int D, int WGS, int BM, int STAGES> __device__ void bwd_wgmma(const AttnBwdParams &) { __trap(); }
#endif // __CUDA_ARCH_FEAT_SM90_ALL || PALIGN_KEMU

// -------------------------------------------------------------------------- decode
//
// Block: one query (sequence), one KV head and up to DEC_GROUP of its query heads, one
// split of the visible cache positions. Each warp streams every DEC_WARPS-th group of
// DEC_UNROLL keys (a lane holds d/32 elements of a row), keeping a base-2 online softmax
// per head; the warps merge through shared memory. With one split the block writes bf16
// out, else unnormalized partials (o, m, l) for attention_decode_combine_bf16.
// Cache position pos of the sequence lives in row slot_start + pos % capacity; the
// visible positions are max(0, len - W) .. len - 1.
template <int D> __device__ void decode(const AttnDecodeParams &p) {
    constexpr int NW = DEC_WARPS, G = DEC_GROUP, U = DEC_UNROLL, EPL = D / 32;
    __shared__ float sm_m[NW][G], sm_l[NW][G];
    __shared__ float sm_o[NW][G][D];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int H = p.n_heads, group = p.n_heads / p.n_kv_heads;
    const int i = blockIdx.z, split = blockIdx.x;
    const int kvh = blockIdx.y / p.head_chunks;
    const int h0 = kvh * group + (blockIdx.y % p.head_chunks) * G;
    const int nh = imin(G, kvh * group + group - h0);
    const int len = p.seq_len[i], slot = p.slot_start[i];
    const int p_lo = p.window > 0 ? imax(0, len - p.window) : 0;
    const int j0 = split * p.split_size, j1 = imin(len - p_lo, j0 + p.split_size);
    const float sl2 = p.scale * LOG2E;
    const int64_t kvs = (int64_t)p.n_kv_heads * D;

    float q[G][EPL], m[G], l[G], acc[G][EPL];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            acc[g][e] = 0.0f;
            q[g][e] = g < nh ? bf2f(p.q[((int64_t)i * H + h0 + g) * D + lane * EPL + e]) * sl2 : 0.0f;
        }
    }

    for (int jb = j0 + warp * U; jb < j1; jb += NW * U) {
        float kf[U][EPL], vf[U][EPL];
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (jb + u < j1) {
                const int row = slot + (p_lo + jb + u) % p.capacity;
                const int64_t at = (int64_t)row * kvs + kvh * D + lane * EPL;
#pragma unroll
                for (int e = 0; e < EPL; e++) {
                    kf[u][e] = bf2f(p.k_cache[at + e]);
                    vf[u][e] = bf2f(p.v_cache[at + e]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (jb + u >= j1) break;
#pragma unroll
            for (int g = 0; g < G; g++) {
                if (g >= nh) break;
                float s = 0.0f;
#pragma unroll
                for (int e = 0; e < EPL; e++) s = fmaf(q[g][e], kf[u][e], s);
                s = warp_sum(s);
                const float m_new = fmaxf(m[g], s);
                const float alpha = fast_exp2(m[g] - m_new);
                const float pr = fast_exp2(s - m_new);
                l[g] = l[g] * alpha + pr;
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[g][e] = fmaf(acc[g][e], alpha, pr * vf[u][e]);
                m[g] = m_new;
            }
        }
    }

#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (int e = 0; e < EPL; e++) sm_o[warp][g][lane * EPL + e] = acc[g][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * D; idx += NW * 32) {
        const int g = idx / D, d = idx % D, h = h0 + g;
        float mx = -INFINITY;
        for (int w = 0; w < NW; w++) mx = fmaxf(mx, sm_m[w][g]);
        const float mu = mx == -INFINITY ? 0.0f : mx;
        float o = 0.0f, lsum = 0.0f;
        for (int w = 0; w < NW; w++) {
            const float f = fast_exp2(sm_m[w][g] - mu);
            o += f * sm_o[w][g][d];
            lsum += f * sm_l[w][g];
        }
        if (p.n_splits == 1) {
            p.out[((int64_t)i * H + h) * D + d] = f2bf(lsum > 0.0f ? o / lsum : 0.0f);
        } else {
            const int64_t part = ((int64_t)i * H + h) * p.n_splits + split;
            p.part_o[part * D + d] = o;
            if (d == 0) {
                p.part_ml[part * 2] = mx;
                p.part_ml[part * 2 + 1] = lsum;
            }
        }
    }
}

} // namespace attention
} // namespace palign

// Forward variants fwd<D, WARPS, MT, BN, STAGES>, named w<WARPS>m<MT>n<BN>s<STAGES> in
// src/backend/cuda/attention.rs (FWD_VARIANTS). The unnamed kernels are the default.
extern "C" __global__ void attention_fwd_bf16_d64(const AttnFwdParams p) {
    palign::attention::fwd<64, 4, 1, 64, 1>(p);
}

extern "C" __global__ void attention_fwd_bf16_d128(const AttnFwdParams p) {
    palign::attention::fwd<128, 4, 1, 64, 1>(p);
}

extern "C" __global__ void attention_fwd_w4m2n64s1_bf16_d64(const AttnFwdParams p) {
    palign::attention::fwd<64, 4, 2, 64, 1>(p);
}

extern "C" __global__ void attention_fwd_w4m2n64s1_bf16_d128(const AttnFwdParams p) {
    palign::attention::fwd<128, 4, 2, 64, 1>(p);
}

extern "C" __global__ void attention_fwd_w4m2n64s2_bf16_d64(const AttnFwdParams p) {
    palign::attention::fwd<64, 4, 2, 64, 2>(p);
}

extern "C" __global__ void attention_fwd_w4m2n64s2_bf16_d128(const AttnFwdParams p) {
    palign::attention::fwd<128, 4, 2, 64, 2>(p);
}

extern "C" __global__ void attention_fwd_w8m1n64s2_bf16_d64(const AttnFwdParams p) {
    palign::attention::fwd<64, 8, 1, 64, 2>(p);
}

extern "C" __global__ void attention_fwd_w8m1n64s2_bf16_d128(const AttnFwdParams p) {
    palign::attention::fwd<128, 8, 1, 64, 2>(p);
}

// wgmma forward variants fwd_wgmma<D, WGS, BN, STAGES, OVL> (sm_90a), named
// wg<WGS>n<BN>s<STAGES>, with a "p" after them for OVL.
extern "C" __global__ void attention_fwd_wg2n128s2_bf16_d64(const AttnFwdParams p) {
    palign::attention::fwd_wgmma<64, 2, 128, 2, false>(p);
}

extern "C" __global__ void attention_fwd_wg2n128s2_bf16_d128(const AttnFwdParams p) {
    palign::attention::fwd_wgmma<128, 2, 128, 2, false>(p);
}

extern "C" __global__ void attention_fwd_wg2n128s3_bf16_d64(const AttnFwdParams p) {
    palign::attention::fwd_wgmma<64, 2, 128, 3, false>(p);
}

extern "C" __global__ void attention_fwd_wg2n128s3_bf16_d128(const AttnFwdParams p) {
    palign::attention::fwd_wgmma<128, 2, 128, 3, false>(p);
}

extern "C" __global__ void attention_fwd_wg2n128s3p_bf16_d64(const AttnFwdParams p) {
    palign::attention::fwd_wgmma<64, 2, 128, 3, true>(p);
}

extern "C" __global__ void attention_fwd_wg2n128s3p_bf16_d128(const AttnFwdParams p) {
    palign::attention::fwd_wgmma<128, 2, 128, 3, true>(p);
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd_wg2n64s2_bf16_d64(const AttnFwdParams p) {
    palign::attention::fwd_wgmma<64, 2, 64, 2, false>(p);
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd_wg2n64s2_bf16_d128(const AttnFwdParams p) {
    palign::attention::fwd_wgmma<128, 2, 64, 2, false>(p);
}

// delta[r, h] = Σ_d dO·O (f32); dq_accum[r, h, :] = 0. One warp per (row, head).
extern "C" __global__ void attention_bwd_prep_bf16(const AttnBwdPrepParams p) {
    const int lane = threadIdx.x % 32;
    const int64_t idx = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (idx >= (int64_t)p.n_rows * p.n_heads) return;
    const int D = p.head_dim;
    const __nv_bfloat162 *o = reinterpret_cast<const __nv_bfloat162 *>(p.o + idx * D);
    const __nv_bfloat162 *d_o = reinterpret_cast<const __nv_bfloat162 *>(p.d_o + idx * D);
    float acc = 0.0f;
    for (int c = lane; c < D / 2; c += 32) {
        const float2 a = __bfloat1622float2(o[c]), b = __bfloat1622float2(d_o[c]);
        acc = fmaf(a.x, b.x, fmaf(a.y, b.y, acc));
    }
    acc = palign::warp_sum(acc);
    if (lane == 0) p.delta[idx] = acc;
    float4 *dq = reinterpret_cast<float4 *>(p.dq_accum + idx * D);
    for (int c = lane; c < D / 4; c += 32) dq[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

// Backward variants bwd<D, WARPS, BM, STAGES, ASYNC>, named w<WARPS>q<BM>s<STAGES>[a] in
// src/backend/cuda/attention.rs (BWD_VARIANTS): attention_bwd_bf16_d* are w8q64s2 (the
// default), attention_bwd_small_bf16_d128 is w4q64s1 (GPUs with < 145 KB of smem).
extern "C" __global__ void attention_bwd_bf16_d64(const AttnBwdParams p) {
    palign::attention::bwd<64, 8, 64, 2, false>(p);
}

extern "C" __global__ void attention_bwd_bf16_d128(const AttnBwdParams p) {
    palign::attention::bwd<128, 8, 64, 2, false>(p);
}

extern "C" __global__ void attention_bwd_small_bf16_d128(const AttnBwdParams p) {
    palign::attention::bwd<128, 4, 64, 1, false>(p);
}

extern "C" __global__ void attention_bwd_w8q64s2a_bf16_d64(const AttnBwdParams p) {
    palign::attention::bwd<64, 8, 64, 2, true>(p);
}

extern "C" __global__ void attention_bwd_w8q64s2a_bf16_d128(const AttnBwdParams p) {
    palign::attention::bwd<128, 8, 64, 2, true>(p);
}

extern "C" __global__ void attention_bwd_w4q64s2a_bf16_d64(const AttnBwdParams p) {
    palign::attention::bwd<64, 4, 64, 2, true>(p);
}

extern "C" __global__ void attention_bwd_w4q64s2a_bf16_d128(const AttnBwdParams p) {
    palign::attention::bwd<128, 4, 64, 2, true>(p);
}

// Warp-grid backward variants bwdg<D, WARPS, BM, STAGES>, named w<WARPS>q<BM>s<STAGES>g.
extern "C" __global__ void attention_bwd_w8q64s2g_bf16_d64(const AttnBwdParams p) {
    palign::attention::bwdg<64, 8, 64, 2>(p);
}

extern "C" __global__ void attention_bwd_w8q64s2g_bf16_d128(const AttnBwdParams p) {
    palign::attention::bwdg<128, 8, 64, 2>(p);
}

extern "C" __global__ void attention_bwd_w4q64s2g_bf16_d64(const AttnBwdParams p) {
    palign::attention::bwdg<64, 4, 64, 2>(p);
}

extern "C" __global__ void attention_bwd_w4q64s2g_bf16_d128(const AttnBwdParams p) {
    palign::attention::bwdg<128, 4, 64, 2>(p);
}

// wgmma backward bwd_wgmma<D, WGS, BM, STAGES> (sm_90a), named wg<WGS>q<BM>s<STAGES>;
// head_dim 128 only (its dQ splits D over the warpgroups, D = 64·WGS).
extern "C" __global__ void attention_bwd_wg2q64s2_bf16_d128(const AttnBwdParams p) {
    palign::attention::bwd_wgmma<128, 2, 64, 2>(p);
}

// dq = bf16(scale · dq_accum), 4 elements per thread (n is a multiple of 4).
extern "C" __global__ void attention_bwd_dq_bf16(const AttnDqParams p) {
    const int64_t n4 = p.n / 4;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float4 a = reinterpret_cast<const float4 *>(p.dq_accum)[i];
        __nv_bfloat162 *out = reinterpret_cast<__nv_bfloat162 *>(p.dq + 4 * i);
        out[0] = __floats2bfloat162_rn(a.x * p.scale, a.y * p.scale);
        out[1] = __floats2bfloat162_rn(a.z * p.scale, a.w * p.scale);
    }
}

extern "C" __global__ void attention_decode_bf16_d64(const AttnDecodeParams p) {
    palign::attention::decode<64>(p);
}

extern "C" __global__ void attention_decode_bf16_d128(const AttnDecodeParams p) {
    palign::attention::decode<128>(p);
}

// out[i, h] = Σ_s 2^(m_s - M)·o_s / Σ_s 2^(m_s - M)·l_s over the splits. One block per (i, h).
extern "C" __global__ void attention_decode_combine_bf16(const AttnDecodeParams p) {
    const int64_t ih = blockIdx.x;
    const int S = p.n_splits, D = p.head_dim;
    const float *ml = p.part_ml + ih * S * 2;
    float mx = -INFINITY;
    for (int s = 0; s < S; s++) mx = fmaxf(mx, ml[2 * s]);
    const float mu = mx == -INFINITY ? 0.0f : mx;
    float lsum = 0.0f;
    for (int s = 0; s < S; s++) lsum += palign::attention::fast_exp2(ml[2 * s] - mu) * ml[2 * s + 1];
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < S; s++) o += palign::attention::fast_exp2(ml[2 * s] - mu) * p.part_o[(ih * S + s) * D + d];
        p.out[ih * D + d] = palign::f2bf(o * inv);
    }
}
