// LoRA adapter factors with dropout, each in one pass over the big activation.
//
// Up to 3 "heads" share one input X [m, k] (q/k/v read the same normed hidden state,
// gate/up the post-attention one); head i has its own A_i [r_i, k] (bf16), dropout
// stream_i and p_i (PEFT lora_dropout, s = alpha/r applied by the caller through alpha):
//
//   drop_i(X)[e] = keep_i(e) ? bf16(X[e] · scale_i) : 0      scale_i = 1/(1 − p_i) (f32)
//   keep_i(e)    = src/backend/cpu/rng.rs dropout_keep(stream_i, e, p_i),  e = row·k + col
//
// which is exactly the operand dropout_bf16 (elementwise.cu) materialises today.
//
//   1. lora_down_nt{4,8,16,24}:   xa_i[m, r_i]  = bf16( drop_i(X) · A_iᵀ )          f32 sums
//   2. lora_grad_a_nt{4,8,16,24}: dA_i[r_i, k] += alpha · dyb_iᵀ · drop_i(X)        f32
//      lora_grad_a_finish:        when m is split over blocks, the partials are summed
//                                 in split order and added (deterministic, no atomics)
//   3. lora_dx_acc:               dX[m, k] = bf16( dX + Σ_i alpha·scale_i·mask_i ∘ (dyb_i·A_i) )
//                                 f32 math, one rounding, one read-modify-write of dX
//   4. lora_up_backward_nt{4,8,16}: for the up projection B [n, r] (no dropout, one head):
//                                 dyb[m, r]  = bf16( dY · B )             f32 sums
//                                 dB[n, r]  += alpha · dYᵀ · xa           f32
//      lora_up_backward_finish:   dyb's partials over 128-column blocks (and dB's over row
//                                 splits) summed in block order: deterministic, no atomics
//
// The mask is evaluated once per element and per head, never stored. `ntN` instances hold
// N accumulator tiles of 8 ranks (Σ r_i <= 8N); src/backend/cuda/lora_drop.rs picks the
// smallest that fits and splits the heads over launches when they do not fit one.
//
// ---- the mask (SplitMix64, Steele/Lea/Flood OOPSLA 2014, as cpu/rng.rs) ----
// u = (mix(stream + e + γ) >> 40) / 2^24, keep iff u >= p. mix's last step z ^= z >> 31
// cannot change bits 40..63, so keep iff hi32(z3·C2) >= thresh with z3 the state after
// the second xor-shift and thresh = ceil(p·2^24) << 8 (the launcher's integer form of
// u >= p; thresh = 0 means p = 0: no mask, no scaling). Elements that share the high word
// of the 64-bit counter (a lane's consecutive columns, checked per row) share the high half
// of the first two steps:
//   l1 = l ^ funnel(l, h, 30);  (h1:l1)·C1 = l1·C1lo + (h1·C1lo << 32) + (l1·C1hi << 32)
//   l3 = l2 ^ funnel(l2, h2, 27), h3 = h2 ^ (h2 >> 27);  top = hi(l3·C2lo) + l3·C2hi + h3·C2lo
// The rare row whose low word would carry takes the plain 64-bit path.
//
// ---- expected speed (H100 SXM: 3.35 TB/s = 14.5 B/clk/SM; H200 ~18 B/clk/SM) ----
// X streams at ~7-9 bf16 per clk per SM. drop8 compiles (sm_90a, nvcc 13.0) to ~18 SASS
// instructions per element per masked head, hash, scale, select and repack included: ~10
// on the ALU pipe (LOP3/SHF/ISETP, 64 lanes/clk/SM) and ~8 IMAD/FMUL. That is >= 0.16
// SM-clk per element, so ONE masked head already needs about the HBM time, and THREE
// masked heads (q/k/v with p > 0) are ALU-bound at roughly 30% of HBM bandwidth.
// That is still ~3x faster than today's path (per head: dropout kernel, itself about as
// ALU-bound, writing a copy, plus a cuBLAS pass over it; dX: two more full passes). Heads
// with p = 0 skip the hash and are bound by memory (or by shared memory for Σr = 192,
// where every warp reads Σr/16 times its X bytes in operand fragments).
//
// ---- layouts (mma.sync m16n8k16 bf16, f32 accumulate; PTX ISA fragment layouts) ----
// Lane = 4g + t. A frag: a0 (row g, k 2t..2t+1), a1 (row g+8, ..), a2 (row g, k 2t+8..),
// a3 (row g+8, k 2t+8..); B frag: b0 (k 2t..2t+1, col g), b1 (k 2t+8.., col g); C frag:
// c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, ..). A register holds two bf16, the lower
// k (or column) in the low half.
//
// 1. lora_down: per-warp independent, no block barrier in the main loop. A warp owns 16
//    rows and every 32-column chunk c ≡ kw (mod KW) of k. The k order inside an mma is
//    free as long as both operands agree, so lane (g, t) takes the 16 bytes X[row][8t..8t+8)
//    of a chunk as logical k {2t, 2t+1, 2t+8, 2t+9} of two k16 steps (words .x/.y, then
//    .z/.w), and the same 16 bytes of A_i[rank][8t..8t+8) as its B fragment: plain 16-byte
//    loads, no shared-memory transpose. X comes through a 4-deep cp.async ring private to
//    each lane (a lane reads only what it copied, so no barrier); the mask is applied to
//    the lane's 8 consecutive elements in registers; A_i (small, L2-resident, shared by the
//    RW row-warps through L1) is read with __ldg. Blocks: RW x KW = 8 warps (RW = 2 or 4,
//    64 rows per block for Σr > 64 to halve A traffic); the KW partial sums are added in a
//    fixed order through shared memory and written as bf16.
// 2. lora_grad_a: block = 128 columns x a range of rows (blockIdx.y), 8 warps of 16
//    columns. Per step of 32 rows, cp.async (3 stages) brings X [32 x 128] and dyb_i
//    [32 x r_i]; the threads mask X once per head into a tile per head (16 bytes each, 8
//    consecutive elements), then each warp computes dA_iᵀ [16 cols x r_i] += drop(X)ᵀ·dyb_i
//    (X as the A operand by ldmatrix.trans, dyb_i as B by ldmatrix.trans). With one row
//    range per column block the result is added straight into dA; otherwise each block
//    stores its partial (plain stores) and lora_grad_a_finish sums them in order.
// 3. lora_dx_acc: block = 128 columns x a range of rows; A_i [r_i x 128] stays in shared
//    memory, steps of 32 rows stream dX and dyb_i through a 2-stage cp.async ring. Warp
//    (2 x 4 of them) tile 16 rows x 32 columns: per head acc = dyb_i·A_i (ldmatrix, ranks
//    zero-padded to 16), then sum += coef_i · keep ? acc : 0 with each element's mask
//    computed once; dX is updated in shared memory and written back in 16-byte stores.
// 4. lora_up_backward: block = 128 columns x a range of rows, B [128 x r] resident in shared
//    memory, 32-row steps of dY and xa through a 3-stage cp.async ring: one read of dY for
//    both products. dB as in lora_grad_a (warp = 16 columns, dYᵀ by ldmatrix.trans, xa as
//    B). dY·B: warp = 16 rows x rank tiles ≡ warp/2 (mod 4) over all 128 columns, so each
//    partial element has one owner; it is stored in f32 per column block and the finish
//    kernel sums the n/128 partials in order. That partial costs r/32 of dY's bytes
//    (write + read), so the fusion only pays for small ranks (see benches/lora.rs).
#include "common.cuh"

namespace palign {
namespace lora_drop {

constexpr uint64_t GAMMA = 0x9E3779B97F4A7C15ull;
constexpr uint64_t C1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t C2 = 0x94D049BB133111EBull;
constexpr uint32_t C1_LO = 0x1CE4E5B9u, C1_HI = 0xBF58476Du;
constexpr uint32_t C2_LO = 0x133111EBu, C2_HI = 0x94D049BBu;

constexpr int THREADS = 256, WARPS = 8;
constexpr int MAX_HEADS = 3;

// lora_down
constexpr int DOWN_STAGES = 4;
constexpr int RED_LD = 68;         // floats per row of the reduction buffer (64 ranks + 4)
constexpr int RED_SLOTS = 128;     // KW x BM row slots (16 rows x 8 warps)
constexpr int DOWN_RING_BYTES = WARPS * DOWN_STAGES * 2 * 32 * 16;
constexpr int DOWN_RED_BYTES = RED_SLOTS * RED_LD * 4;
constexpr int DOWN_SMEM = DOWN_RING_BYTES > DOWN_RED_BYTES ? DOWN_RING_BYTES : DOWN_RED_BYTES;

// lora_grad_a, lora_dx_acc: 32-row steps of a 128-column block.
// Keep in sync with src/backend/cuda/lora_drop.rs (shared memory sizes).
constexpr int BR = 32, BN = 128;
constexpr int TILE_LD = BN + 8;           // 17 chunks of 16 B: ldmatrix rows hit distinct banks
constexpr int TILE_ELEMS = BR * TILE_LD;  // one [32 x 128] bf16 tile
constexpr int GA_STAGES = 3, DX_STAGES = 2;

// bf16 per shared-memory row of a [rows x r] rank tile: an odd number of 16-byte chunks,
// so the 8 rows an ldmatrix phase reads fall in 8 different bank groups.
__device__ __forceinline__ int rank_ld(int r) { return 8 * ((r / 8) | 1); }
__device__ __forceinline__ int round16(int r) { return (r + 15) & ~15; }

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}
__device__ __forceinline__ float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&v));
}

// ---- the mask ----

// Bit i set iff element base + off(i) is kept, off(i) = (i / PER)·STRIDE + i % PER, where
// base = stream + γ + the first element's index. See the header for the split form; the
// host mirror `keep_bits_host` in lora_drop.rs is tested against cpu/rng.rs.
template <int N, int PER, int STRIDE>
__device__ __forceinline__ uint32_t keep_bits(uint64_t base, uint32_t thresh) {
    constexpr uint32_t SPAN = ((N - 1) / PER) * STRIDE + (N - 1) % PER; // the largest offset
    const uint32_t lo = (uint32_t)base, hi = (uint32_t)(base >> 32);
    uint32_t bits = 0;
    if (lo <= 0xFFFFFFFFu - SPAN) { // the high word is the same for every element
        const uint32_t h1 = hi ^ (hi >> 30);
        const uint32_t s = h1 * C1_LO;
#pragma unroll
        for (int i = 0; i < N; i++) {
            const uint32_t l = lo + (uint32_t)((i / PER) * STRIDE + i % PER);
            const uint32_t l1 = l ^ __funnelshift_r(l, hi, 30);
            const uint64_t w = (uint64_t)l1 * C1_LO + ((uint64_t)s << 32);
            const uint32_t l2 = (uint32_t)w;
            const uint32_t h2 = (uint32_t)(w >> 32) + l1 * C1_HI;
            const uint32_t l3 = l2 ^ __funnelshift_r(l2, h2, 27);
            const uint32_t h3 = h2 ^ (h2 >> 27);
            const uint32_t top = __umulhi(l3, C2_LO) + l3 * C2_HI + h3 * C2_LO;
            bits |= (uint32_t)(top >= thresh) << i;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) {
            uint64_t z = base + (uint64_t)((i / PER) * STRIDE + i % PER);
            z = (z ^ (z >> 30)) * C1;
            z = (z ^ (z >> 27)) * C2;
            bits |= (uint32_t)((uint32_t)(z >> 32) >= thresh) << i;
        }
    }
    return bits;
}

// Dropout of 8 consecutive bf16 (base as in keep_bits): kept -> bf16(x·scale), else 0;
// bit for bit what dropout_bf16 stores.
__device__ __forceinline__ uint4 drop8(uint4 v, uint64_t base, uint32_t thresh, float scale) {
    const uint32_t bits = keep_bits<8, 8, 0>(base, thresh);
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const float2 f = unpack(w[q]);
        const float lo = (bits >> (2 * q)) & 1 ? __fmul_rn(f.x, scale) : 0.0f;
        const float hi = (bits >> (2 * q + 1)) & 1 ? __fmul_rn(f.y, scale) : 0.0f;
        w[q] = pack(lo, hi);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// First accumulator tile of each head (tile = 8 ranks); off[n_heads..3] = the total.
__device__ __forceinline__ void tile_offsets(const LoraDropParams &p, int off[MAX_HEADS + 1]) {
    off[0] = 0;
#pragma unroll
    for (int h = 0; h < MAX_HEADS; h++)
        off[h + 1] = off[h] + (h < p.n_heads ? p.head[h].rank / 8 : 0);
}

// ------------------------------------------------------------------ 1. lora_down

template <int NT> __device__ __forceinline__ void down(const LoraDropParams &p) {
    __shared__ __align__(16) uint8_t smem[DOWN_SMEM];
    __shared__ LoraDropHeadParams heads[MAX_HEADS];
    uint4 *ring = reinterpret_cast<uint4 *>(smem); // [WARPS][STAGES][2 rows][32 lanes]
    if (threadIdx.x < MAX_HEADS) heads[threadIdx.x] = p.head[threadIdx.x];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int RW = p.row_warps, KW = WARPS / RW, BM = 16 * RW;
    const int rw = warp % RW, kw = warp / RW;
    const int M = p.m, K = p.k;
    int off[MAX_HEADS + 1];
    tile_offsets(p, off);

    const int64_t row0 = (int64_t)blockIdx.x * BM + 16 * rw + g; // and row0 + 8
    const bool ok0 = row0 < M, ok1 = row0 + 8 < M;
    const __nv_bfloat16 *x0 = p.x + (ok0 ? row0 : 0) * K;
    const __nv_bfloat16 *x1 = p.x + (ok1 ? row0 + 8 : 0) * K;
    const int nchunks = (K + 31) / 32;
    const int my_n = kw < nchunks ? (nchunks - kw + KW - 1) / KW : 0;
    uint4 *my_ring = ring + warp * (DOWN_STAGES * 64);

    // Chunk `it` of this warp: the lane's 16 bytes of rows g and g+8 (zeros outside X).
    auto issue = [&](int it) {
        if (it < my_n) {
            const int col = (kw + it * KW) * 32 + 8 * t;
            const bool kin = col < K;
            uint4 *dst = my_ring + (it % DOWN_STAGES) * 64;
            cp_async16(dst + lane, x0 + (kin ? col : 0), ok0 && kin);
            cp_async16(dst + 32 + lane, x1 + (kin ? col : 0), ok1 && kin);
        }
        cp_async_commit();
    };

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

#pragma unroll
    for (int s = 0; s < DOWN_STAGES - 1; s++) issue(s);
    for (int it = 0; it < my_n; it++) {
        cp_async_wait<DOWN_STAGES - 2>(); // chunk `it` has landed (this lane's own copies)
        const uint4 *src = my_ring + (it % DOWN_STAGES) * 64;
        const uint4 xr0 = src[lane], xr1 = src[32 + lane];
        issue(it + DOWN_STAGES - 1); // into the slot this lane read one iteration ago
        const int col = (kw + it * KW) * 32 + 8 * t;
        const bool kin = col < K;
        // Not unrolled: one head's A loads in flight at a time (registers), params from smem.
#pragma unroll 1
        for (int h = 0; h < p.n_heads; h++) {
            const LoraDropHeadParams &hd = heads[h];
            const int jlo = h == 0 ? 0 : h == 1 ? off[1] : off[2]; // this head's tiles
            const int jhi = h == 0 ? off[1] : h == 1 ? off[2] : off[3];
            uint4 a0 = xr0, a1 = xr1;
            if (hd.thresh != 0) {
                const uint64_t base = hd.stream + GAMMA + (uint64_t)(row0 * K + col);
                a0 = drop8(xr0, base, hd.thresh, hd.scale);
                a1 = drop8(xr1, base + 8ull * (uint64_t)K, hd.thresh, hd.scale);
            }
            const __nv_bfloat16 *ap = hd.a + (int64_t)g * K + (kin ? col : 0);
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j < jlo || j >= jhi) continue;
                uint4 b = make_uint4(0, 0, 0, 0);
                if (kin)
                    b = __ldg(reinterpret_cast<const uint4 *>(ap + (int64_t)(8 * (j - jlo)) * K));
                mma_bf16(acc[j], a0.x, a1.x, a0.y, a1.y, b.x, b.y); // physical k 8t..8t+3
                mma_bf16(acc[j], a0.z, a1.z, a0.w, a1.w, b.z, b.w); // physical k 8t+4..8t+7
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads(); // every warp is done with its ring: the reduction buffer overlaps it

    // Sum the KW partials in a fixed order, 64 ranks at a time, and store bf16.
    float *red = reinterpret_cast<float *>(smem); // [KW][BM][RED_LD]
    const int64_t b0 = (int64_t)blockIdx.x * BM;
#pragma unroll
    for (int h = 0; h < MAX_HEADS; h++) {
        if (h >= p.n_heads) break;
        const int r = p.head[h].rank;
        __nv_bfloat16 *out = p.head[h].xa;
        for (int c0 = 0; c0 < r; c0 += 64) {
            const int cw = min(64, r - c0);
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const int jc = 8 * (j - off[h]) - c0; // the tile's first rank in this chunk
                if (j < off[h] || j >= off[h + 1] || jc < 0 || jc >= 64) continue;
                float *d = red + (kw * BM + 16 * rw + g) * RED_LD + jc + 2 * t;
                *reinterpret_cast<float2 *>(d) = make_float2(acc[j][0], acc[j][1]);
                *reinterpret_cast<float2 *>(d + 8 * RED_LD) = make_float2(acc[j][2], acc[j][3]);
            }
            __syncthreads();
            for (int i = threadIdx.x; i < BM * cw; i += THREADS) {
                const int row = i / cw, c = i % cw;
                float s = 0.0f;
                for (int q = 0; q < KW; q++) s += red[(q * BM + row) * RED_LD + c];
                if (b0 + row < M) out[(b0 + row) * r + c0 + c] = f2bf(s);
            }
            __syncthreads();
        }
    }
}

// ------------------------------------------------------------------ 2. lora_grad_a

template <int NT> __device__ __forceinline__ void grad_a(const LoraDropParams &p) {
    PALIGN_DYNAMIC_SMEM(dyn_smem);
    __shared__ LoraDropHeadParams heads[MAX_HEADS];
    __nv_bfloat16 *sm = reinterpret_cast<__nv_bfloat16 *>(dyn_smem);
    const int nh = p.n_heads;
    if (threadIdx.x < MAX_HEADS) heads[threadIdx.x] = p.head[threadIdx.x]; // the loop's
                                                                           // first barrier
    int off[MAX_HEADS + 1], ld[MAX_HEADS], dyb_at[MAX_HEADS];
    tile_offsets(p, off);
    int stage_elems = TILE_ELEMS; // stage: X [32][TILE_LD], then dyb_i [32][ld_i]
#pragma unroll
    for (int h = 0; h < MAX_HEADS; h++) {
        ld[h] = h < nh ? rank_ld(p.head[h].rank) : 0;
        dyb_at[h] = stage_elems;
        stage_elems += BR * ld[h];
    }
    // Then one masked X tile per head. A launcher mismatch must fail loudly.
    if (dynamic_smem_bytes() < 2u * (GA_STAGES * stage_elems + nh * TILE_ELEMS)) __trap();
    __nv_bfloat16 *masked = sm + GA_STAGES * stage_elems;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int K = p.k;
    const int c_block = blockIdx.x * BN;
    const int64_t row_begin = (int64_t)blockIdx.y * p.rows_per_split;
    const int64_t row_end = min((int64_t)p.m, row_begin + p.rows_per_split);
    const int steps = row_end > row_begin ? (int)((row_end - row_begin + BR - 1) / BR) : 0;
    bool any_mask = false;
#pragma unroll
    for (int h = 0; h < MAX_HEADS; h++) any_mask |= h < nh && p.head[h].thresh != 0;

    // Step s: X rows r0.. of this block's columns and dyb_i rows r0.. (zeros outside).
    auto issue = [&](int s) {
        if (s < steps) {
            __nv_bfloat16 *st = sm + (s % GA_STAGES) * stage_elems;
            const int64_t r0 = row_begin + (int64_t)s * BR;
            for (int q = tid; q < BR * 16; q += THREADS) {
                const int row = q >> 4, cc = q & 15, col = c_block + 8 * cc;
                const bool ok = r0 + row < row_end && col < K;
                cp_async16(st + row * TILE_LD + 8 * cc, ok ? p.x + (r0 + row) * K + col : p.x, ok);
            }
#pragma unroll
            for (int h = 0; h < MAX_HEADS; h++) {
                if (h >= nh) break;
                const int r = p.head[h].rank, cpr = r / 8;
                const __nv_bfloat16 *dyb = p.head[h].dyb;
                for (int q = tid; q < BR * cpr; q += THREADS) {
                    const int row = q / cpr, cc = q % cpr;
                    const bool ok = r0 + row < row_end;
                    cp_async16(st + dyb_at[h] + row * ld[h] + 8 * cc,
                               ok ? dyb + (r0 + row) * r + 8 * cc : dyb, ok);
                }
            }
        }
        cp_async_commit();
    };

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

#pragma unroll
    for (int s = 0; s < GA_STAGES - 1; s++) issue(s);
    for (int s = 0; s < steps; s++) {
        cp_async_wait<GA_STAGES - 2>();
        __syncthreads(); // step s visible; everyone is done with step s-1's stage and tiles
        issue(s + GA_STAGES - 1);
        __nv_bfloat16 *st = sm + (s % GA_STAGES) * stage_elems;
        if (any_mask) {
            // Each element of X once per masked head: 8 consecutive columns per thread.
            const int64_t r0 = row_begin + (int64_t)s * BR;
            for (int q = tid; q < BR * 16; q += THREADS) {
                const int row = q >> 4, cc = q & 15;
                const uint4 raw = *reinterpret_cast<const uint4 *>(st + row * TILE_LD + 8 * cc);
                const uint64_t e = (uint64_t)((r0 + row) * K + c_block + 8 * cc);
#pragma unroll 1
                for (int h = 0; h < nh; h++) {
                    const LoraDropHeadParams &hd = heads[h];
                    if (hd.thresh == 0) continue;
                    *reinterpret_cast<uint4 *>(masked + h * TILE_ELEMS + row * TILE_LD + 8 * cc) =
                        drop8(raw, hd.stream + GAMMA + e, hd.thresh, hd.scale);
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int kk = 0; kk < BR / 16; kk++) {
#pragma unroll 1
            for (int h = 0; h < nh; h++) { // not unrolled: one head's fragments at a time
                const int jlo = h == 0 ? 0 : h == 1 ? off[1] : off[2]; // this head's tiles
                const int jhi = h == 0 ? off[1] : h == 1 ? off[2] : off[3];
                const int hld = h == 0 ? ld[0] : h == 1 ? ld[1] : ld[2];
                const int hat = h == 0 ? dyb_at[0] : h == 1 ? dyb_at[1] : dyb_at[2];
                const __nv_bfloat16 *xs = heads[h].thresh ? masked + h * TILE_ELEMS : st;
                // A operand = drop(X)ᵀ: rows = this warp's 16 columns, k = the 16 rows.
                uint32_t a[4];
                ldsm_x4_t(a, xs + (16 * kk + ((lane >> 4) << 3) + (lane & 7)) * TILE_LD +
                                 16 * warp + (((lane >> 3) & 1) << 3));
                const __nv_bfloat16 *ds = st + hat + (16 * kk + (lane & 15)) * hld;
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    if (j < jlo || j >= jhi) continue;
                    uint32_t b[2];
                    ldsm_x2_t(b, ds + 8 * (j - jlo));
                    mma_bf16(acc[j], a, b[0], b[1]);
                }
            }
        }
    }
    cp_async_wait<0>();

    // acc[j]: c0 (col g, rank 2t), c1 (col g, rank 2t+1), c2/c3 the same for col g+8.
    const int col0 = c_block + 16 * warp + g, col1 = col0 + 8;
    const int sum_rank = 8 * off[MAX_HEADS];
#pragma unroll
    for (int h = 0; h < MAX_HEADS; h++) {
        if (h >= nh) break;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (j < off[h] || j >= off[h + 1]) continue;
            const int rank = 8 * (j - off[h]) + 2 * t;
            if (p.partial) { // every block writes its whole partial, even over no rows
                float *d = p.partial +
                           ((int64_t)blockIdx.y * sum_rank + 8 * off[h] + rank) * (int64_t)K;
                if (col0 < K) d[col0] = acc[j][0], d[K + col0] = acc[j][1];
                if (col1 < K) d[col1] = acc[j][2], d[K + col1] = acc[j][3];
            } else { // the only block of these columns: add in place
                float *d = p.head[h].grad + (int64_t)rank * K;
                const float al = p.alpha;
                if (col0 < K) d[col0] += al * acc[j][0], d[K + col0] += al * acc[j][1];
                if (col1 < K) d[col1] += al * acc[j][2], d[K + col1] += al * acc[j][3];
            }
        }
    }
}

// ------------------------------------------------------------------ 3. lora_dx_acc

__device__ __forceinline__ void dx_acc(const LoraDropParams &p) {
    PALIGN_DYNAMIC_SMEM(dyn_smem);
    __nv_bfloat16 *sm = reinterpret_cast<__nv_bfloat16 *>(dyn_smem);
    const int nh = p.n_heads;
    // [A_i tiles: r16_i rows x TILE_LD] then DX_STAGES x [dX tile, dyb_i [32][ld_i]].
    int r16[MAX_HEADS], ld[MAX_HEADS], a_at[MAX_HEADS], dyb_at[MAX_HEADS];
    int a_elems = 0, stage_elems = TILE_ELEMS;
#pragma unroll
    for (int h = 0; h < MAX_HEADS; h++) {
        r16[h] = h < nh ? round16(p.head[h].rank) : 0;
        ld[h] = h < nh ? rank_ld(r16[h]) : 0;
        a_at[h] = a_elems;
        a_elems += r16[h] * TILE_LD;
        dyb_at[h] = stage_elems;
        stage_elems += BR * ld[h];
    }
    if (dynamic_smem_bytes() < 2u * (a_elems + DX_STAGES * stage_elems)) __trap();
    __nv_bfloat16 *stages = sm + a_elems;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int rw = warp & 1, cw = warp >> 1; // warp tile: rows 16rw.., columns 32cw..
    const int K = p.k;
    const int c_block = blockIdx.x * BN;
    const int64_t row_begin = (int64_t)blockIdx.y * p.rows_per_split;
    const int64_t row_end = min((int64_t)p.m, row_begin + p.rows_per_split);
    if (row_end <= row_begin) return;
    const int steps = (int)((row_end - row_begin + BR - 1) / BR);

    // Zero the rank padding (A rows r..r16, dyb columns r..r16 of every stage); the copies
    // below never write there. The first barrier of the loop publishes it.
#pragma unroll
    for (int h = 0; h < MAX_HEADS; h++) {
        if (h >= nh) break;
        const int r = p.head[h].rank, pad = r16[h] - r;
        if (pad == 0) continue;
        for (int q = tid; q < pad * TILE_LD; q += THREADS)
            sm[a_at[h] + r * TILE_LD + q] = f2bf(0.0f);
        for (int q = tid; q < DX_STAGES * BR * pad; q += THREADS) {
            const int s = q / (BR * pad), row = (q / pad) % BR, c = q % pad;
            stages[s * stage_elems + dyb_at[h] + row * ld[h] + r + c] = f2bf(0.0f);
        }
    }
    // A_i [r_i x this block's 128 columns], resident; in the same group as step 0.
#pragma unroll
    for (int h = 0; h < MAX_HEADS; h++) {
        if (h >= nh) break;
        const int r = p.head[h].rank;
        const __nv_bfloat16 *a = p.head[h].a;
        for (int q = tid; q < r * 16; q += THREADS) {
            const int rank = q >> 4, cc = q & 15, col = c_block + 8 * cc;
            const bool ok = col < K;
            cp_async16(sm + a_at[h] + rank * TILE_LD + 8 * cc,
                       ok ? a + (int64_t)rank * K + col : a, ok);
        }
    }
    auto issue = [&](int s) {
        if (s < steps) {
            __nv_bfloat16 *st = stages + (s % DX_STAGES) * stage_elems;
            const int64_t r0 = row_begin + (int64_t)s * BR;
            for (int q = tid; q < BR * 16; q += THREADS) {
                const int row = q >> 4, cc = q & 15, col = c_block + 8 * cc;
                const bool ok = r0 + row < row_end && col < K;
                cp_async16(st + row * TILE_LD + 8 * cc, ok ? p.dx + (r0 + row) * K + col : p.dx,
                           ok);
            }
#pragma unroll
            for (int h = 0; h < MAX_HEADS; h++) {
                if (h >= nh) break;
                const int r = p.head[h].rank, cpr = r / 8;
                const __nv_bfloat16 *dyb = p.head[h].dyb;
                for (int q = tid; q < BR * cpr; q += THREADS) {
                    const int row = q / cpr, cc = q % cpr;
                    const bool ok = r0 + row < row_end;
                    cp_async16(st + dyb_at[h] + row * ld[h] + 8 * cc,
                               ok ? dyb + (r0 + row) * r + 8 * cc : dyb, ok);
                }
            }
        }
        cp_async_commit();
    };

#pragma unroll
    for (int s = 0; s < DX_STAGES - 1; s++) issue(s);
    for (int s = 0; s < steps; s++) {
        cp_async_wait<DX_STAGES - 2>();
        __syncthreads(); // step s visible; everyone is done with step s-1's stage
        issue(s + DX_STAGES - 1);
        __nv_bfloat16 *st = stages + (s % DX_STAGES) * stage_elems;
        const int64_t r0 = row_begin + (int64_t)s * BR;

        float sum[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++) sum[j][0] = sum[j][1] = sum[j][2] = sum[j][3] = 0.0f;
#pragma unroll
        for (int h = 0; h < MAX_HEADS; h++) {
            if (h >= nh) break;
            float acc[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
            const __nv_bfloat16 *ds = st + dyb_at[h] + (16 * rw + (lane & 15)) * ld[h];
            const __nv_bfloat16 *as = sm + a_at[h] + (lane & 15) * TILE_LD + 32 * cw;
            for (int kk = 0; kk < r16[h] / 16; kk++) {
                uint32_t a[4];
                ldsm_x4(a, ds + 16 * kk + ((lane >> 4) << 3));
#pragma unroll
                for (int jp = 0; jp < 2; jp++) {
                    uint32_t b[4];
                    ldsm_x4_t(b, as + 16 * kk * TILE_LD + 16 * jp + ((lane >> 4) << 3));
                    mma_bf16(acc[2 * jp], a, b[0], b[1]);
                    mma_bf16(acc[2 * jp + 1], a, b[2], b[3]);
                }
            }
            const LoraDropHeadParams &hd = p.head[h];
            const float coef = hd.coef;
            if (hd.thresh != 0) {
                // Lane elements of a row: columns 32cw + 8j + 2t + e, j < 4, e < 2.
                const uint64_t base = hd.stream + GAMMA +
                                      (uint64_t)((r0 + 16 * rw + g) * K + c_block + 32 * cw + 2 * t);
                const uint32_t k0 = keep_bits<8, 2, 8>(base, hd.thresh);
                const uint32_t k1 = keep_bits<8, 2, 8>(base + 8ull * (uint64_t)K, hd.thresh);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    sum[j][0] += (k0 >> (2 * j)) & 1 ? coef * acc[j][0] : 0.0f;
                    sum[j][1] += (k0 >> (2 * j + 1)) & 1 ? coef * acc[j][1] : 0.0f;
                    sum[j][2] += (k1 >> (2 * j)) & 1 ? coef * acc[j][2] : 0.0f;
                    sum[j][3] += (k1 >> (2 * j + 1)) & 1 ? coef * acc[j][3] : 0.0f;
                }
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int c = 0; c < 4; c++) sum[j][c] += coef * acc[j][c];
            }
        }
        // dX += sum in the staged tile (this warp's own region), then 16-byte stores.
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                uint32_t *d = reinterpret_cast<uint32_t *>(
                    st + (16 * rw + g + 8 * hf) * TILE_LD + 32 * cw + 8 * j + 2 * t);
                const float2 v = unpack(*d);
                *d = pack(v.x + sum[j][2 * hf], v.y + sum[j][2 * hf + 1]);
            }
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int q = lane + 32 * i;
            const int row = 16 * rw + (q >> 2), cc = 4 * cw + (q & 3), col = c_block + 8 * cc;
            if (r0 + row < row_end && col < K)
                *reinterpret_cast<uint4 *>(p.dx + (r0 + row) * K + col) =
                    *reinterpret_cast<const uint4 *>(st + row * TILE_LD + 8 * cc);
        }
    }
    cp_async_wait<0>();
}

// ------------------------------------------------------------------ 4. lora_up_backward

// Block = 128 columns of n x a range of rows (blockIdx.y); B [128 x r] stays in shared
// memory, steps of 32 rows bring dY [32 x 128] and xa [32 x r] (3-stage cp.async ring).
template <int NT> __device__ __forceinline__ void up_backward(const LoraUpParams &p) {
    PALIGN_DYNAMIC_SMEM(dyn_smem);
    __nv_bfloat16 *sm = reinterpret_cast<__nv_bfloat16 *>(dyn_smem);
    const int r = p.rank, ld = rank_ld(r), nt = r / 8;
    const int b_elems = BN * ld, stage_elems = TILE_ELEMS + BR * ld;
    if (dynamic_smem_bytes() < 2u * (b_elems + GA_STAGES * stage_elems)) __trap();
    const __nv_bfloat16 *bs = sm;
    __nv_bfloat16 *stages = sm + b_elems;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int N = p.n, M = p.m;
    const int c_block = blockIdx.x * BN;
    const int64_t row_begin = (int64_t)blockIdx.y * p.rows_per_split;
    const int64_t row_end = min((int64_t)M, row_begin + p.rows_per_split);
    const int steps = row_end > row_begin ? (int)((row_end - row_begin + BR - 1) / BR) : 0;

    // B rows of this block's columns (zeros past n); in the same group as step 0.
    for (int q = tid; q < BN * nt; q += THREADS) {
        const int row = q / nt, cc = q % nt, col = c_block + row;
        const bool ok = col < N;
        cp_async16(sm + row * ld + 8 * cc, ok ? p.b + (int64_t)col * r + 8 * cc : p.b, ok);
    }
    auto issue = [&](int s) {
        if (s < steps) {
            __nv_bfloat16 *st = stages + (s % GA_STAGES) * stage_elems;
            const int64_t r0 = row_begin + (int64_t)s * BR;
            for (int q = tid; q < BR * 16; q += THREADS) {
                const int row = q >> 4, cc = q & 15, col = c_block + 8 * cc;
                const bool ok = r0 + row < row_end && col < N;
                cp_async16(st + row * TILE_LD + 8 * cc, ok ? p.dy + (r0 + row) * N + col : p.dy,
                           ok);
            }
            for (int q = tid; q < BR * nt; q += THREADS) {
                const int row = q / nt, cc = q % nt;
                const bool ok = r0 + row < row_end;
                cp_async16(st + TILE_ELEMS + row * ld + 8 * cc,
                           ok ? p.xa + (r0 + row) * r + 8 * cc : p.xa, ok);
            }
        }
        cp_async_commit();
    };

    float acc[NT][4]; // dBᵀ partial: this warp's 16 columns x the ranks
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    // dY·B: warp = rows 16rt.. of the step x rank tiles jq, jq + 4, ... over all 128 columns,
    // so each output element has one owner and no reduction inside the block.
    constexpr int YT = NT / 4;
    const int rt = warp & 1, jq = warp >> 1;

#pragma unroll
    for (int s = 0; s < GA_STAGES - 1; s++) issue(s);
    for (int s = 0; s < steps; s++) {
        cp_async_wait<GA_STAGES - 2>();
        __syncthreads(); // step s visible; everyone is done with step s-1's stage
        issue(s + GA_STAGES - 1);
        const __nv_bfloat16 *st = stages + (s % GA_STAGES) * stage_elems;
        const __nv_bfloat16 *xs = st + TILE_ELEMS;
        const int64_t r0 = row_begin + (int64_t)s * BR;

        // dBᵀ[16 cols x r] += dYᵀ·xa: A = dYᵀ by ldmatrix.trans (k = the 32 rows), B = xa.
#pragma unroll
        for (int kk = 0; kk < BR / 16; kk++) {
            uint32_t a[4];
            ldsm_x4_t(a, st + (16 * kk + ((lane >> 4) << 3) + (lane & 7)) * TILE_LD + 16 * warp +
                             (((lane >> 3) & 1) << 3));
            const __nv_bfloat16 *ds = xs + (16 * kk + (lane & 15)) * ld;
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j >= nt) continue;
                uint32_t b[2];
                ldsm_x2_t(b, ds + 8 * j);
                mma_bf16(acc[j], a, b[0], b[1]);
            }
        }

        // Partial dyb[16 rows x this warp's rank tiles] = dY·B over the block's 128 columns.
        float y[YT][4];
#pragma unroll
        for (int i = 0; i < YT; i++) y[i][0] = y[i][1] = y[i][2] = y[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            ldsm_x4(a, st + (16 * rt + (lane & 15)) * TILE_LD + 16 * kk + ((lane >> 4) << 3));
            const __nv_bfloat16 *bp = bs + (16 * kk + (lane & 15)) * ld;
#pragma unroll
            for (int i = 0; i < YT; i++) {
                const int j = jq + 4 * i;
                if (j >= nt) continue;
                uint32_t b[2];
                ldsm_x2_t(b, bp + 8 * j);
                mma_bf16(y[i], a, b[0], b[1]);
            }
        }
        // y[i]: c0,c1 (row g, ranks 8j+2t, +1), c2,c3 (row g+8, ..): plain 8-byte stores.
        const int64_t row0 = r0 + 16 * rt + g;
        float *yp = p.dyb_partial + ((int64_t)blockIdx.x * M + row0) * r;
#pragma unroll
        for (int i = 0; i < YT; i++) {
            const int j = jq + 4 * i;
            if (j >= nt) continue;
            const int rank = 8 * j + 2 * t;
            if (row0 < row_end)
                *reinterpret_cast<float2 *>(yp + rank) = make_float2(y[i][0], y[i][1]);
            if (row0 + 8 < row_end)
                *reinterpret_cast<float2 *>(yp + 8 * r + rank) = make_float2(y[i][2], y[i][3]);
        }
    }
    cp_async_wait<0>();

    // acc[j]: c0 (col g, rank 8j+2t), c1 (col g, rank 8j+2t+1), c2/c3 the same for col g+8;
    // dB is [n, r] row-major, so the pair is one 8-byte access.
    const int col0 = c_block + 16 * warp + g, col1 = col0 + 8;
#pragma unroll
    for (int j = 0; j < NT; j++) {
        if (j >= nt) continue;
        const int rank = 8 * j + 2 * t;
        if (p.db_partial) { // every block writes its whole partial, even over no rows
            float *d = p.db_partial + (int64_t)blockIdx.y * N * r;
            if (col0 < N)
                *reinterpret_cast<float2 *>(d + (int64_t)col0 * r + rank) =
                    make_float2(acc[j][0], acc[j][1]);
            if (col1 < N)
                *reinterpret_cast<float2 *>(d + (int64_t)col1 * r + rank) =
                    make_float2(acc[j][2], acc[j][3]);
        } else { // the only block of these columns: add in place
            const float al = p.alpha;
            if (col0 < N) {
                float2 *d = reinterpret_cast<float2 *>(p.grad_b + (int64_t)col0 * r + rank);
                const float2 v = *d;
                *d = make_float2(v.x + al * acc[j][0], v.y + al * acc[j][1]);
            }
            if (col1 < N) {
                float2 *d = reinterpret_cast<float2 *>(p.grad_b + (int64_t)col1 * r + rank);
                const float2 v = *d;
                *d = make_float2(v.x + al * acc[j][2], v.y + al * acc[j][3]);
            }
        }
    }
}

} // namespace lora_drop
} // namespace palign

extern "C" __global__ void __launch_bounds__(256, 2) lora_down_nt4(LoraDropParams p) {
    palign::lora_drop::down<4>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_down_nt8(LoraDropParams p) {
    palign::lora_drop::down<8>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) lora_down_nt16(LoraDropParams p) {
    palign::lora_drop::down<16>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) lora_down_nt24(LoraDropParams p) {
    palign::lora_drop::down<24>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_grad_a_nt4(LoraDropParams p) {
    palign::lora_drop::grad_a<4>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_grad_a_nt8(LoraDropParams p) {
    palign::lora_drop::grad_a<8>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) lora_grad_a_nt16(LoraDropParams p) {
    palign::lora_drop::grad_a<16>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) lora_grad_a_nt24(LoraDropParams p) {
    palign::lora_drop::grad_a<24>(p);
}

// grad_i[e] += alpha · Σ_s partial[s][R_i·k + e] for e < r_i·k, summed in split order
// (R_i = the head's first row in the concatenated ranks). 4 floats per thread per step.
extern "C" __global__ void __launch_bounds__(256) lora_grad_a_finish(LoraDropParams p) {
    int roff[palign::lora_drop::MAX_HEADS + 1];
    roff[0] = 0;
#pragma unroll
    for (int h = 0; h < palign::lora_drop::MAX_HEADS; h++)
        roff[h + 1] = roff[h] + (h < p.n_heads ? p.head[h].rank : 0);
    const int64_t K = p.k;
    const int64_t total = (int64_t)roff[3] * K; // K % 8 == 0: a vector never spans rows
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 4;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < total; i += stride) {
        float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int sp = 0; sp < p.splits; sp++) {
            const float4 v = __ldg(reinterpret_cast<const float4 *>(p.partial + sp * total + i));
            s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
        }
        const int64_t R = i / K;
        const int h = R < roff[1] ? 0 : R < roff[2] ? 1 : 2;
        float *grad = h == 0 ? p.head[0].grad : h == 1 ? p.head[1].grad : p.head[2].grad;
        float4 *d = reinterpret_cast<float4 *>(grad + (i - (int64_t)roff[h] * K));
        float4 gv = *d;
        gv.x += p.alpha * s.x, gv.y += p.alpha * s.y, gv.z += p.alpha * s.z, gv.w += p.alpha * s.w;
        *d = gv;
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) lora_dx_acc(LoraDropParams p) {
    palign::lora_drop::dx_acc(p);
}

extern "C" __global__ void __launch_bounds__(256, 2) lora_up_backward_nt4(LoraUpParams p) {
    palign::lora_drop::up_backward<4>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) lora_up_backward_nt8(LoraUpParams p) {
    palign::lora_drop::up_backward<8>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) lora_up_backward_nt16(LoraUpParams p) {
    palign::lora_drop::up_backward<16>(p);
}

// dyb[i] = bf16(Σ_c dyb_partial[c][i]) for i < m·r, then grad_b[i] += alpha·Σ_s db_partial[s][i]
// for i < n·r (when split), each summed in block order. 4 floats per thread per step.
extern "C" __global__ void __launch_bounds__(256) lora_up_backward_finish(LoraUpParams p) {
    const int64_t my = (int64_t)p.m * p.rank; // both multiples of 8 (r is)
    const int64_t ny = (int64_t)p.n * p.rank;
    const int64_t first = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 4;
    for (int64_t i = first; i < my; i += stride) {
        float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int c = 0; c < p.col_blocks; c++) {
            const float4 v = __ldg(reinterpret_cast<const float4 *>(p.dyb_partial + c * my + i));
            s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
        }
        __nv_bfloat162 *d = reinterpret_cast<__nv_bfloat162 *>(p.dyb + i);
        d[0] = __floats2bfloat162_rn(s.x, s.y);
        d[1] = __floats2bfloat162_rn(s.z, s.w);
    }
    if (!p.db_partial) return;
    for (int64_t i = first; i < ny; i += stride) {
        float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int sp = 0; sp < p.splits; sp++) {
            const float4 v = __ldg(reinterpret_cast<const float4 *>(p.db_partial + sp * ny + i));
            s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
        }
        float4 *d = reinterpret_cast<float4 *>(p.grad_b + i);
        float4 gv = *d;
        gv.x += p.alpha * s.x, gv.y += p.alpha * s.y, gv.z += p.alpha * s.z, gv.w += p.alpha * s.w;
        *d = gv;
    }
}
