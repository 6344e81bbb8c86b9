// NF4 (bitsandbytes 4-bit NormalFloat) weights: dequantize, decode GEMV, fused
// dequant-GEMM on tensor cores.
//
// Format (src/quant/mod.rs, /work/shared/reference/kernels.md §1): W [rows, cols]
// row-major, flattened, element e in byte e/2 (even e in the HIGH nibble), block scale
// per `blocksize` (a power of two >= 32) consecutive elements:
//   scale(b) = absmax[b]                                                  (plain)
//   scale(b) = fp32( fp32(code2[qabsmax[b]] * absmax2[b >> log2_bs2]) + offset )  (double)
//   W(e)     = fp32( NF4[code(e)] * scale(e >> log2_bs) )
// Every product/sum above is one f32 rounding (__fmul_rn/__fadd_rn: no FMA contraction),
// which makes the f32 dequantization bit-exact against the CPU's `Nf4Tensor::dequantize`.
// The bf16 weight the GEMMs use is Wb(e) = bf16_rne(W(e)), the same value the bf16
// dequantization writes, so fused and dequant + cuBLAS multiply the same numbers.
//
// 1. nf4_dequantize: out[e] = W(e) (f32) or Wb(e) (bf16). One thread per 16 elements
//    (8 bytes in, 64 or 32 bytes out); 16 consecutive elements always share a block.
//
// 2. nf4_gemv_<variant>: Y[m, n] = sum_k X[m, k] * Wb(n, k) for m < M <= 16, f32
//    accumulation on tensor cores (mma m16n8k16 with A = W, B = Xᵀ: 16 output columns
//    by 8 tokens, a second mma for tokens 8..15 when M > 8).
//    A block (8 warps) owns 8*NT output columns n; its warps split K in chunks of 128.
//    In a chunk, lane (g = lane/4, t = lane%4) loads ONE 16-byte word of W per 8-column
//    tile: codes k in [32t, 32t+32) of row n0+8i+g. Tiles 2j and 2j+1 are the A rows g
//    and g+8 of one mma (NT = 1: rows g+8 are zero). The mma's k order is free as long as
//    A and B agree, so step s (0..7) feeds logical k {2t,2t+1,2t+8,2t+9} with physical
//    k {32t+4s, +1, +2, +3}: A regs = the bytes 2s and 2s+1 of the lane's words, B regs
//    = the 32-bit words 2s and 2s+1 of X[g][32t..32t+32) (tokens 8..15: X[g+8]), loaded
//    as 4 uint4 each and used as raw bf16 pairs. W as A (not B) lets the decoded words
//    and the X words feed the mma in place, with no register moves. Each weight byte is
//    read once per launch; the 8 warps' partial results are summed in shared memory in a
//    fixed order. A warp loads the W words and scale parts of U chunks before decoding
//    any (Nf4Word); decode_word costs ~4 instructions a weight. Variants (the list above
//    the instantiations) differ in NT, U and the blocks an SM holds. At one
//    chunk per round trip and ~8 instructions a weight, the H200 GEMV read only
//    0.76-0.9 TB/s of its 4.8.
//    nf4_gemv_naive: the one-warp-per-row baseline (bitsandbytes' inference kernel
//    shape), f32 weights, M FMAs per element; kept for the bench and as a cross-check.
//
// 3. nf4_gemm_fwd:  Y[M, N]  = X[M, K]  · Wbᵀ   (W [N, K])     reduction over K
//    nf4_gemm_bwd:  dX[M, K] = dY[M, N] · Wb    (W [N, K])     reduction over N
//    Block tile 128 (rows of A) x 128 (output cols) x 64 (reduction), 256 threads =
//    8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 4 mma m16n8k16 per k16 step.
//    A tiles: cp.async 16 B, 3-stage ring, rows >= M zero-filled. W tiles: each thread
//    loads one 16-byte word (32 codes) and its scale's parts (Nf4Word) per k-tile into
//    registers before the tile's math, and after it unpacks them to bf16 in shared memory (never to HBM):
//      fwd: smem [128 out cols][64 k]  = W rows c0.., cols k0..   -> ldmatrix (B "col")
//      bwd: smem [64 k][128 out cols]  = W rows k0.., cols c0..   -> ldmatrix.trans
//    Both are plain sub-blocks of W, so the unpack is the same; only the fragment load
//    differs. Rows are padded by 8 bf16 (16 B) so ldmatrix/cp.async hit distinct banks.
//    Requires the reduction length % 64 == 0 (K fwd, N bwd) and, bwd, K % 64 == 0;
//    output columns beyond the matrix are computed on zero weights and not stored.
//    Shared memory: 3*128*72*2 + 128*72*2 = 73728 B (dynamic; 2 blocks/SM on A100).
//
// 4. nf4_gemm_fwd_lora / nf4_gemm_bwd_lora: the same GEMMs plus a LoRA adapter term as
//    `rank` more reduction steps (src/backend/cuda/lora.rs computes the [M, rank] left
//    factor first, with cuBLAS, s = alpha/r folded in):
//      fwd:  Y  = [X  | s·drop(X)·Aᵀ] · [Wb | B]ᵀ  = X·Wbᵀ + s·(drop(X)·Aᵀ)·Bᵀ
//      bwd:  dX = [dY | s·dY·B]       · [Wb ; A]   = dY·Wb + s·(dY·B)·A
//    with A [rank, in] and B [out, rank] bf16. After the main K loop (As and Bs free)
//    each 64-wide slice of the rank is copied with cp.async (left factor into A stage 0,
//    B rows c0.. resp. A cols c0.. into Bs, zero-filled past rank/M/NOUT) and multiplied
//    into the same f32 accumulators, so the output is rounded and written once. Its
//    loads are not overlapped (one L2 round trip per block; the other block on the SM
//    keeps the tensor cores busy). Needs rank % 16 == 0; the plain kernels are the
//    HAS_LORA = false instances and are compiled exactly as before.
#include "common.cuh"

namespace palign {
namespace nf4 {

// bitsandbytes functional.get_4bit_type("nf4"), the same digits as src/quant/tables.rs.
__constant__ float kCode[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Copies the codes to shared memory (16 entries in 16 banks: any lookup pattern is
// conflict-free). Every thread of the block must call it; it ends with a barrier. The
// table is declared __align__(256): decode_word's lookups (lut_ld) need it.
__device__ __forceinline__ void load_lut(float *lut) {
    if (!smem_aligned256(lut)) __trap(); // a declaration without the alignment
    if (threadIdx.x < 16) lut[threadIdx.x] = kCode[threadIdx.x];
    __syncthreads();
}

// The raw parts of scale block b: absmax[b] (plain), or absmax2[b >> log2_bs2] and the
// code qabsmax[b] (double quantized). Loaded with no load waiting on another: a warp
// that combines them at once stalls on the qabsmax load before its later loads issue, so
// the kernels that load ahead (GEMV, GEMMs) keep the parts and combine them at decode.
struct ScaleParts {
    float a;
    uint32_t c;
};

__device__ __forceinline__ ScaleParts load_scale_parts(const Nf4WeightParams &w, uint64_t b) {
    if (w.absmax) return {__ldg(w.absmax + b), 0u};
    return {__ldg(w.absmax2 + (b >> w.log2_blocksize2)), __ldg(w.qabsmax + b)};
}

// The scale from its parts (the format's formula above).
__device__ __forceinline__ float scale_of(const Nf4WeightParams &w, ScaleParts s) {
    if (w.absmax) return s.a;
    return __fadd_rn(__fmul_rn(__ldg(w.code2 + s.c), s.a), w.offset);
}

__device__ __forceinline__ float block_scale(const Nf4WeightParams &w, int64_t b) {
    return scale_of(w, load_scale_parts(w, (uint64_t)b));
}

// A 16-byte word of W (32 codes, inside one scale block) and its scale's parts, loaded
// ahead of use; word_scale combines them at decode time.
struct Nf4Word {
    uint4 q;
    ScaleParts s;
};

// The word whose first code is flat element e (e % 32 == 0); a zero word when !ok.
__device__ __forceinline__ Nf4Word load_word(const Nf4WeightParams &w, uint64_t e, bool ok) {
    Nf4Word x{make_uint4(0, 0, 0, 0), {0.0f, 0u}};
    if (ok) {
        x.q = __ldg(reinterpret_cast<const uint4 *>(w.packed + (e >> 1)));
        x.s = load_scale_parts(w, e >> w.log2_blocksize);
    }
    return x;
}

// block_scale's value from a word's parts; 0 for a word that is not there (ok false), so
// it decodes to zeros.
__device__ __forceinline__ float word_scale(const Nf4WeightParams &w, const Nf4Word &x, bool ok) {
    return ok ? scale_of(w, x.s) : 0.0f;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi); // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t *>(&h);
}

__device__ __forceinline__ uint32_t byte_of(const uint4 &q, int j) {
    const uint32_t w = j < 4 ? q.x : j < 8 ? q.y : j < 12 ? q.z : q.w;
    return (w >> (8 * (j & 3))) & 255;
}

__device__ __forceinline__ uint32_t word_of(const uint4 &q, int j) {
    return j == 0 ? q.x : j == 1 ? q.y : j == 2 ? q.z : q.w;
}

// The four bytes of a 32-bit word of codes -> four bf16 pairs, .x from byte 0; a pair
// holds the byte's high-nibble weight (the lower index) in its low half, each weight
// Wb = bf16(NF4[code] · scale) with one f32 rounding (__fmul_rn). Two masks give every byte's 4·nibble (a byte offset
// into the LUT) at once, so a weight costs a byte extract, a load, a multiply and half a
// pack: the decode's instruction count, not HBM, bounded the H200 GEMV.
__device__ __forceinline__ uint4 decode_word(const float *lut, uint32_t w, float s) {
    const uint32_t hi = (w >> 2) & 0x3C3C3C3Cu, lo = (w << 2) & 0x3C3C3C3Cu;
    uint32_t o[4];
#pragma unroll
    for (int j = 0; j < 4; j++)
        o[j] = pack_bf16(__fmul_rn(lut_ld(lut, hi, j), s), __fmul_rn(lut_ld(lut, lo, j), s));
    return make_uint4(o[0], o[1], o[2], o[3]);
}

// Two adjacent outputs (cols col, col+1) of row `row`.
__device__ __forceinline__ void store2(void *out, bool f32, int64_t idx, float a, float b) {
    if (f32) {
        *reinterpret_cast<float2 *>(static_cast<float *>(out) + idx) = make_float2(a, b);
    } else {
        *reinterpret_cast<__nv_bfloat162 *>(static_cast<__nv_bfloat16 *>(out) + idx) =
            __floats2bfloat162_rn(a, b);
    }
}

// ------------------------------------------------------------------ GEMV (M <= 16)

// X[g][k .. k+32) (and, TWO, X[g+8]) as 16 words of bf16 pairs; zeros where absent. A
// function, not a lambda: as a capturing lambda the same code spilled in several
// variants.
template <bool TWO>
__device__ __forceinline__ void gemv_x_words(uint32_t (&xa)[16], uint32_t (&xb)[16],
                                             const __nv_bfloat16 *r0, const __nv_bfloat16 *r1,
                                             bool ok0, bool ok1) {
#pragma unroll
    for (int q = 0; q < 4; q++) {
        uint4 va = make_uint4(0, 0, 0, 0), vb = make_uint4(0, 0, 0, 0);
        if (ok0) va = *reinterpret_cast<const uint4 *>(r0 + 8 * q);
        if (TWO && ok1) vb = *reinterpret_cast<const uint4 *>(r1 + 8 * q);
        xa[4 * q] = va.x, xa[4 * q + 1] = va.y, xa[4 * q + 2] = va.z, xa[4 * q + 3] = va.w;
        xb[4 * q] = vb.x, xb[4 * q + 1] = vb.y, xb[4 * q + 2] = vb.z, xb[4 * q + 3] = vb.w;
    }
}

constexpr int GEMV_WARPS = 8;
constexpr int GEMV_CHUNK = 128; // k per warp step: 4 lanes x 32 codes

template <int NT, bool TWO, int U, bool PIPE> __device__ __forceinline__ void gemv(const Nf4GemvParams &p) {
    constexpr int NP = (NT + 1) / 2; // 16-row A tiles: 8-column tiles 2j (rows g), 2j+1 (g+8)
    __shared__ __align__(256) float lut[16];
    __shared__ float red[GEMV_WARPS][16 * 8 * NT]; // [warp][token][column of the block]
    load_lut(lut);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int M = p.m, N = p.w.rows, K = p.w.cols;
    const int n0 = blockIdx.x * (8 * NT);
    // TWO: the instance for M > 8 (tokens 8..15 exist); the M <= 8 one has no second mma
    // and no registers for X rows g + 8.
    if (TWO != (M > 8)) __trap(); // a launcher that picked the wrong instance
    const bool x0 = g < M, x1 = TWO && g + 8 < M;
    const __nv_bfloat16 *xr0 = p.x + (int64_t)g * K;
    const __nv_bfloat16 *xr1 = p.x + (int64_t)(g + 8) * K;
    uint64_t row_e[NT]; // flat index of the lane's row n0 + 8i + g, element 0
    bool nin[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) {
        row_e[i] = (uint64_t)(n0 + 8 * i + g) * (uint64_t)K;
        nin[i] = n0 + 8 * i + g < N;
    }

    // acc[j][h]: C of A tile j times tokens 8h..8h+7 (c0, c1: column 8·2j + g, tokens
    // 8h + 2t, +1; c2, c3: column 8·(2j+1) + g).
    float acc[NP][2][4];
#pragma unroll
    for (int j = 0; j < NP; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][0][e] = acc[j][1][e] = 0.0f;

    // The weight words and scale parts of U chunks are loaded before the first of them is
    // decoded: one round trip to HBM then serves U chunks instead of one, and the code2
    // lookups of double-quantized scales (L1 hits) follow together. The chunks are still
    // summed in the order c = warp, warp + 8, ..., so the result does not depend on U.
    // PIPE: the next group's words, scale parts and X words are loaded before this group
    // is decoded, so a warp's loads overlap its own decode (twice the registers for them).
    const int chunks = (K + GEMV_CHUNK - 1) / GEMV_CHUNK;
    constexpr int UP = PIPE ? U : 1, UP2 = PIPE && TWO ? U : 1;
    Nf4Word nw[UP][NT];
    uint32_t nxa[UP][16], nxb[UP2][16];
    auto load_next = [&](int c0) {
#pragma unroll
        for (int u = 0; u < UP; u++) {
            const int k = (c0 + u * GEMV_WARPS) * GEMV_CHUNK + 32 * t;
#pragma unroll
            for (int i = 0; i < NT; i++) nw[u][i] = load_word(p.w, row_e[i] + k, k < K && nin[i]);
            gemv_x_words<TWO>(nxa[u], nxb[TWO ? u : 0], xr0 + k, xr1 + k, k < K && x0, k < K && x1);
        }
    };
    if constexpr (PIPE) load_next(warp);
    for (int c0 = warp; c0 < chunks; c0 += GEMV_WARPS * U) {
        Nf4Word wq[U][NT];
        uint32_t pxa[UP][16], pxb[UP2][16];
        if constexpr (PIPE) {
#pragma unroll
            for (int u = 0; u < U; u++) {
#pragma unroll
                for (int i = 0; i < NT; i++) wq[u][i] = nw[u][i];
#pragma unroll
                for (int q = 0; q < 16; q++) pxa[u][q] = nxa[u][q];
                if (TWO)
#pragma unroll
                    for (int q = 0; q < 16; q++) pxb[TWO ? u : 0][q] = nxb[TWO ? u : 0][q];
            }
            load_next(c0 + GEMV_WARPS * U); // past the end: zero words, no loads
        } else {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int k = (c0 + u * GEMV_WARPS) * GEMV_CHUNK + 32 * t; // K % 32 == 0
#pragma unroll
                for (int i = 0; i < NT; i++) wq[u][i] = load_word(p.w, row_e[i] + k, k < K && nin[i]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + u * GEMV_WARPS >= chunks) break; // warp-uniform
            const int k = (c0 + u * GEMV_WARPS) * GEMV_CHUNK + 32 * t;
            const bool kin = k < K; // all 32 codes in range or none
            float sc[NT];
#pragma unroll
            for (int i = 0; i < NT; i++) sc[i] = word_scale(p.w, wq[u][i], kin && nin[i]);
            uint32_t xa[16], xb[16];
            if constexpr (PIPE) {
#pragma unroll
                for (int q = 0; q < 16; q++) {
                    xa[q] = pxa[u][q];
                    xb[q] = TWO ? pxb[TWO ? u : 0][q] : 0u;
                }
            } else {
                gemv_x_words<TWO>(xa, xb, xr0 + k, xr1 + k, kin && x0, kin && x1);
            }
#pragma unroll
            for (int j = 0; j < NP; j++) {
#pragma unroll
                for (int v = 0; v < 4; v++) {
                    // Word v of the lane's codes: steps s = 2v, 2v+1, bytes 2s (k 2t, 2t+1)
                    // and 2s+1 (k 2t+8, 2t+9) of the mma; rows g+8 are zero when NT = 1.
                    const int J1 = 2 * j + 1 < NT ? 2 * j + 1 : 0; // (unused when NT = 1)
                    const uint4 r0 = decode_word(lut, word_of(wq[u][2 * j].q, v), sc[2 * j]);
                    const uint4 r1 = 2 * j + 1 < NT
                                         ? decode_word(lut, word_of(wq[u][J1].q, v), sc[J1])
                                         : make_uint4(0, 0, 0, 0);
                    const int s = 2 * v;
                    mma_bf16(acc[j][0], r0.x, r1.x, r0.y, r1.y, xa[2 * s], xa[2 * s + 1]);
                    mma_bf16(acc[j][0], r0.z, r1.z, r0.w, r1.w, xa[2 * s + 2], xa[2 * s + 3]);
                    if (TWO) {
                        mma_bf16(acc[j][1], r0.x, r1.x, r0.y, r1.y, xb[2 * s], xb[2 * s + 1]);
                        mma_bf16(acc[j][1], r0.z, r1.z, r0.w, r1.w, xb[2 * s + 2], xb[2 * s + 3]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int j = 0; j < NP; j++)
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int tile = 2 * j + (e >> 1), tok = 8 * h + 2 * t + (e & 1);
                if (tile < NT) red[warp][tok * (8 * NT) + 8 * tile + g] = acc[j][h][e];
            }
    __syncthreads();
    for (int idx = threadIdx.x; idx < 16 * 8 * NT; idx += blockDim.x) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < GEMV_WARPS; w++) s += red[w][idx];
        const int m = idx / (8 * NT), n = n0 + idx % (8 * NT);
        if (m < M && n < N) {
            const int64_t o = (int64_t)m * N + n;
            if (p.out_f32)
                static_cast<float *>(p.y)[o] = s;
            else
                static_cast<__nv_bfloat16 *>(p.y)[o] = f2bf(s);
        }
    }
}

// ------------------------------------------------------------------ fused GEMM

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, GEMM_THREADS = 256;
constexpr int A_LD = BK + 8;                  // bf16 per smem row of an A tile
constexpr int A_STAGE = BM * A_LD;            // bf16 per A stage
constexpr int BF_LD = BK + 8;                 // forward W tile [BN][BK]
constexpr int BB_LD = BN + 8;                 // backward W tile [BK][BN]
constexpr int B_ELEMS = BN * BF_LD > BK * BB_LD ? BN * BF_LD : BK * BB_LD;
constexpr int GEMM_SMEM = (STAGES * A_STAGE + B_ELEMS) * 2;
static_assert(GEMM_SMEM == 73728, "keep NF4_GEMM_SMEM_BYTES in src/backend/cuda/nf4.rs in sync");

template <bool BWD, bool HAS_LORA>
__device__ __forceinline__ void gemm(const Nf4GemmParams &p, const __nv_bfloat16 *lora_left,
                                     const __nv_bfloat16 *lora_right, int rank) {
    PALIGN_DYNAMIC_SMEM(nf4_smem);
    __shared__ __align__(256) float lut[16];
    if (dynamic_smem_bytes() < (uint32_t)GEMM_SMEM) __trap(); // launcher bug, not data
    load_lut(lut);
    __nv_bfloat16 *As = reinterpret_cast<__nv_bfloat16 *>(nf4_smem);
    __nv_bfloat16 *Bs = As + STAGES * A_STAGE;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2, wn = warp & 3;
    const int M = p.m;
    const int R = BWD ? p.w.rows : p.w.cols;    // reduction length
    const int NOUT = BWD ? p.w.cols : p.w.rows; // output columns
    const int m0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const int KT = R / BK;

    // A tile: 128 rows x 64 bf16 = 1024 pieces of 16 B, 4 per thread.
    auto load_a = [&](int kt, int stage) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int c = tid + j * GEMM_THREADS;
            const int row = c >> 3, col = (c & 7) * 8;
            const bool ok = m0 + row < M;
            const __nv_bfloat16 *src = p.a + (int64_t)(ok ? m0 + row : 0) * R + kt * BK + col;
            cp_async16(As + stage * A_STAGE + row * A_LD + col, src, ok);
        }
    };
    // W tile: 4096 bytes, one 16-byte word (32 codes) per thread.
    const int w_r = BWD ? tid >> 2 : tid >> 1;            // smem row
    const int w_c = BWD ? (tid & 3) * 32 : (tid & 1) * 32; // smem col
    const bool w_ok = BWD ? c0 + w_c < NOUT : c0 + w_r < NOUT; // the same for every tile
    auto load_w = [&](int kt) {
        const int row = BWD ? kt * BK + w_r : c0 + w_r; // row of W
        const int col = BWD ? c0 + w_c : kt * BK + w_c; // col of W
        return load_word(p.w, (uint64_t)row * (uint64_t)p.w.cols + col, w_ok);
    };
    auto store_w = [&](const Nf4Word &w) {
        __nv_bfloat16 *dst = Bs + w_r * (BWD ? BB_LD : BF_LD) + w_c;
        const float s = word_scale(p.w, w, w_ok);
#pragma unroll
        for (int v = 0; v < 4; v++) {
            const uint4 o = decode_word(lut, word_of(w.q, v), s);
            *reinterpret_cast<uint4 *>(dst + 8 * v) = o;
        }
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < KT) load_a(s, s);
        cp_async_commit();
    }
    Nf4Word wq = load_w(0);
    store_w(wq);

    for (int kt = 0; kt < KT; kt++) {
        // A tile kt has landed (groups are committed one per tile, empty ones included);
        // W tile kt is in Bs; every warp is done with tile kt-1.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int nk = kt + STAGES - 1;
            if (nk < KT) load_a(nk, nk % STAGES);
            cp_async_commit();
        }
        if (kt + 1 < KT) wq = load_w(kt + 1); // in flight during the math below

        const __nv_bfloat16 *as = As + (kt % STAGES) * A_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t af[4][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
                ldsm_x4(af[mi], as + (wm * 64 + mi * 16 + (lane & 15)) * A_LD + kk * 16 +
                                        (lane >> 4) * 8);
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                uint32_t r[4];
                if (BWD)
                    ldsm_x4_t(r, Bs + (kk * 16 + (lane & 15)) * BB_LD + wn * 32 +
                                             nj * 16 + (lane >> 4) * 8);
                else
                    ldsm_x4(r, Bs + (wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) *
                                            BF_LD +
                                        kk * 16 + ((lane >> 3) & 1) * 8);
                bfr[2 * nj][0] = r[0];
                bfr[2 * nj][1] = r[1];
                bfr[2 * nj + 1][0] = r[2];
                bfr[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                    mma_bf16(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
        }
        __syncthreads(); // all warps are done reading Bs
        if (kt + 1 < KT) store_w(wq);
    }
    cp_async_wait<0>(); // nothing useful is pending; leave no copy in flight at exit

    if constexpr (HAS_LORA) {
        // The main loop's k16 step (copied, so the plain kernels stay as they were).
        auto mma_k16 = [&](const __nv_bfloat16 *as, int kk) {
            uint32_t af[4][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
                ldsm_x4(af[mi], as + (wm * 64 + mi * 16 + (lane & 15)) * A_LD + kk * 16 +
                                        (lane >> 4) * 8);
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                uint32_t r[4];
                if (BWD)
                    ldsm_x4_t(r, Bs + (kk * 16 + (lane & 15)) * BB_LD + wn * 32 +
                                             nj * 16 + (lane >> 4) * 8);
                else
                    ldsm_x4(r, Bs + (wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) *
                                            BF_LD +
                                        kk * 16 + ((lane >> 3) & 1) * 8);
                bfr[2 * nj][0] = r[0];
                bfr[2 * nj][1] = r[1];
                bfr[2 * nj + 1][0] = r[2];
                bfr[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                    mma_bf16(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
        };
        // The loop's last barrier is behind every warp and no copy is in flight, so A
        // stage 0 and Bs are free. Rows/cols outside the matrices load as zeros.
        for (int l0 = 0; l0 < rank; l0 += BK) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int c = tid + j * GEMM_THREADS;
                {   // left factor [M, rank]: rows m0.., cols l0.. -> As [BM][A_LD]
                    const int row = c >> 3, col = (c & 7) * 8;
                    const bool ok = m0 + row < M && l0 + col < rank;
                    const int64_t off = ok ? (int64_t)(m0 + row) * rank + l0 + col : 0;
                    cp_async16(As + row * A_LD + col, lora_left + off, ok);
                }
                if (BWD) { // A [rank, NOUT]: rows l0.., cols c0.. -> Bs [BK][BB_LD]
                    const int row = c >> 4, col = (c & 15) * 8;
                    const bool ok = l0 + row < rank && c0 + col < NOUT;
                    const int64_t off = ok ? (int64_t)(l0 + row) * NOUT + c0 + col : 0;
                    cp_async16(Bs + row * BB_LD + col, lora_right + off, ok);
                } else {   // B [NOUT, rank]: rows c0.., cols l0.. -> Bs [BN][BF_LD]
                    const int row = c >> 3, col = (c & 7) * 8;
                    const bool ok = c0 + row < NOUT && l0 + col < rank;
                    const int64_t off = ok ? (int64_t)(c0 + row) * rank + l0 + col : 0;
                    cp_async16(Bs + row * BF_LD + col, lora_right + off, ok);
                }
            }
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();
            const int steps = min(BK, rank - l0) / 16; // rank % 16 == 0
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++)
                if (kk < steps) mma_k16(As, kk);
            __syncthreads(); // every warp is done with the tiles before the next slice
        }
    }

    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
        const int row = m0 + wm * 64 + mi * 16 + g;
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            const int col = c0 + wn * 32 + ni * 8 + 2 * t;
            if (col >= NOUT) continue;
            if (row < M)
                store2(p.out, p.out_f32, (int64_t)row * NOUT + col, acc[mi][ni][0],
                       acc[mi][ni][1]);
            if (row + 8 < M)
                store2(p.out, p.out_f32, (int64_t)(row + 8) * NOUT + col, acc[mi][ni][2],
                       acc[mi][ni][3]);
        }
    }
}

} // namespace nf4
} // namespace palign

extern "C" __global__ void __launch_bounds__(256) nf4_dequantize(Nf4DequantParams p) {
    using namespace palign;
    __shared__ __align__(256) float lut[16];
    nf4::load_lut(lut);
    const int64_t n = p.w.numel;
    const int64_t groups = (n + 15) / 16;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t gi = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; gi < groups; gi += stride) {
        const int64_t e0 = gi * 16;
        const float s = nf4::block_scale(p.w, e0 >> p.w.log2_blocksize);
        if (e0 + 16 <= n) {
            const uint2 u = __ldg(reinterpret_cast<const uint2 *>(p.w.packed + e0 / 2));
            float v[16];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const uint32_t b = ((j < 4 ? u.x : u.y) >> (8 * (j & 3))) & 255;
                v[2 * j] = __fmul_rn(lut[b >> 4], s);
                v[2 * j + 1] = __fmul_rn(lut[b & 15], s);
            }
            if (p.out_f32) {
                float4 *o = reinterpret_cast<float4 *>(static_cast<float *>(p.out) + e0);
#pragma unroll
                for (int q = 0; q < 4; q++)
                    o[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
            } else {
                __nv_bfloat16 *o = static_cast<__nv_bfloat16 *>(p.out) + e0;
                store8(o, v);
                store8(o + 8, v + 8);
            }
        } else {
            for (int64_t e = e0; e < n; e++) {
                const uint32_t b = p.w.packed[e / 2];
                const float v = __fmul_rn(lut[(e & 1) ? (b & 15) : (b >> 4)], s);
                if (p.out_f32)
                    static_cast<float *>(p.out)[e] = v;
                else
                    static_cast<__nv_bfloat16 *>(p.out)[e] = f2bf(v);
            }
        }
    }
}

// GEMV variants gemv<NT, TWO, U, PIPE> under __launch_bounds__(256, B): nf4_gemv_<v> for
// M <= 8 and nf4_gemv_<v>_m16 for M > 8, v = nt<NT>u<U>b<B> (PIPE false) or
// nt<NT>u<U>p<B> (PIPE true) (src/backend/cuda/nf4.rs GEMV_VARIANTS mirrors the list).
// B = blocks an SM must hold, which caps registers at 65536 / (256·B): the b1 variants
// keep 4 chunks of words in flight a warp at 16 warps an SM, the b3/b4 ones fewer words a
// warp at 24-32 warps, the p ones load the next group while decoding this one. On sm_90a
// (the lent H100/H200s) no instance spills (`tools/sass-loops.sh`); the m16 instances take
// a smaller B where the larger one spilled. On sm_80/86/89 a few b3/b4 instances spill
// 8-208 B (nt2u4b3, nt1u4b4_m16, nt2u2b4_m16): a speed cost the dispatcher's measurement
// sees, not a correctness one.
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemv_nt1u4b1(Nf4GemvParams p) {
    palign::nf4::gemv<1, false, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemv_nt1u4b1_m16(Nf4GemvParams p) {
    palign::nf4::gemv<1, true, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemv_nt2u4b1(Nf4GemvParams p) {
    palign::nf4::gemv<2, false, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemv_nt2u4b1_m16(Nf4GemvParams p) {
    palign::nf4::gemv<2, true, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemv_nt4u2b1(Nf4GemvParams p) {
    palign::nf4::gemv<4, false, 2, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemv_nt4u2b1_m16(Nf4GemvParams p) {
    palign::nf4::gemv<4, true, 2, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 4) nf4_gemv_nt1u4b4(Nf4GemvParams p) {
    palign::nf4::gemv<1, false, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 4) nf4_gemv_nt1u4b4_m16(Nf4GemvParams p) {
    palign::nf4::gemv<1, true, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_nt2u4b3(Nf4GemvParams p) {
    palign::nf4::gemv<2, false, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_nt2u4b3_m16(Nf4GemvParams p) {
    palign::nf4::gemv<2, true, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 4) nf4_gemv_nt2u2b4(Nf4GemvParams p) {
    palign::nf4::gemv<2, false, 2, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_nt2u2b4_m16(Nf4GemvParams p) {
    palign::nf4::gemv<2, true, 2, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 4) nf4_gemv_nt4u1b4(Nf4GemvParams p) {
    palign::nf4::gemv<4, false, 1, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemv_nt4u1b4_m16(Nf4GemvParams p) {
    palign::nf4::gemv<4, true, 1, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_nt1u1p3(Nf4GemvParams p) {
    palign::nf4::gemv<1, false, 1, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemv_nt1u1p3_m16(Nf4GemvParams p) {
    palign::nf4::gemv<1, true, 1, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemv_nt1u2p2(Nf4GemvParams p) {
    palign::nf4::gemv<1, false, 2, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemv_nt1u2p2_m16(Nf4GemvParams p) {
    palign::nf4::gemv<1, true, 2, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_nt2u1p3(Nf4GemvParams p) {
    palign::nf4::gemv<2, false, 1, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemv_nt2u1p3_m16(Nf4GemvParams p) {
    palign::nf4::gemv<2, true, 1, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemv_nt4u1p2(Nf4GemvParams p) {
    palign::nf4::gemv<4, false, 1, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemv_nt4u1p2_m16(Nf4GemvParams p) {
    palign::nf4::gemv<4, true, 1, true>(p);
}

// Baseline: one warp per output row, f32 weights, each lane 32 codes per 1024.
extern "C" __global__ void __launch_bounds__(256) nf4_gemv_naive(Nf4GemvParams p) {
    using namespace palign;
    __shared__ __align__(256) float lut[16];
    nf4::load_lut(lut);
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int M = p.m, N = p.w.rows, K = p.w.cols;
    if (n >= N) return;
    float acc[16];
#pragma unroll
    for (int m = 0; m < 16; m++) acc[m] = 0.0f;
    for (int k = lane * 32; k < K; k += 32 * 32) {
        const int64_t e = (int64_t)n * K + k;
        const uint4 q = __ldg(reinterpret_cast<const uint4 *>(p.w.packed + e / 2));
        const float s = nf4::block_scale(p.w, e >> p.w.log2_blocksize);
        float w[32];
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const uint32_t b = nf4::byte_of(q, j);
            w[2 * j] = __fmul_rn(lut[b >> 4], s);
            w[2 * j + 1] = __fmul_rn(lut[b & 15], s);
        }
#pragma unroll
        for (int m = 0; m < 16; m++) {
            if (m < M) {
                const __nv_bfloat16 *xr = p.x + (int64_t)m * K + k;
#pragma unroll
                for (int q8 = 0; q8 < 4; q8++) {
                    float xv[8];
                    load8(xr + 8 * q8, xv);
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[m] = fmaf(xv[j], w[8 * q8 + j], acc[m]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < 16; m++) {
        if (m < M) {
            const float v = warp_sum(acc[m]);
            if (lane == 0) {
                const int64_t o = (int64_t)m * N + n;
                if (p.out_f32)
                    static_cast<float *>(p.y)[o] = v;
                else
                    static_cast<__nv_bfloat16 *>(p.y)[o] = f2bf(v);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemm_fwd(Nf4GemmParams p) {
    palign::nf4::gemm<false, false>(p, nullptr, nullptr, 0);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemm_bwd(Nf4GemmParams p) {
    palign::nf4::gemm<true, false>(p, nullptr, nullptr, 0);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemm_fwd_lora(Nf4GemmLoraParams p) {
    palign::nf4::gemm<false, true>(p.base, p.left, p.right, p.rank);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemm_bwd_lora(Nf4GemmLoraParams p) {
    palign::nf4::gemm<true, true>(p.base, p.left, p.right, p.rank);
}

// ================================================================== Hopper (sm_90a)
//
// 5. nf4_gemm_fwd_wgmma: Y[M, N] = X[M, K] · Wbᵀ (W [N, K]), the forward product of 3.
//    with warpgroup MMAs (wgmma.mma_async, sm_90a only). Same Wb bits as every kernel
//    above (the same LUT, scale formula and decode_word), f32 accumulation, bf16 or f32
//    out. Needs K % 64 == 0 and N % 8 == 0 (the launcher checks; rows >= M and output
//    columns >= N are computed on zeros and not stored). Other archs get a stub that traps.
//    The BWD instances (nf4_gemm_bwd_wgmma, _m256) compute dX[M, K] = dY[M, N]·Wb with the
//    same tiles and wgmmas: dY is A, and the B tile is Wbᵀ [128 output cols][64 n], which
//    store_w decodes transposed (pairs along n by one prmt). They need N % 64 == 0 and
//    K % 8 == 0.
//
//    Block tile 64·WGS (rows of X) x 128 (output cols) x 64 (k), 128·WGS threads = WGS
//    warpgroups: nf4_gemm_fwd_wgmma has WGS = 2 (128 rows, 256 threads), and
//    nf4_gemm_fwd_wgmma_m256 WGS = 4 (256 rows, 512 threads). The block decodes its 128 x
//    64 W tile once per k-step for all of its rows, so 4 warpgroups halve the decode per
//    tensor-core operation: by SASS counts (tools/sass-loops.sh) the WGS = 2 loop issues
//    ~261 instructions a warp per k-tile, 2 warps a scheduler, against ~552 cycles of
//    wgmma a k-tile on an SM (H200 peak): the issue slots are full before the tensor
//    cores are. WGS = 4 issues ~197 a warp (its threads decode 16 codes, not 32), 4 warps
//    a scheduler, against ~1104 cycles of wgmma (an inference, unmeasured until a GPU
//    run: the dispatcher times both).
//    Warpgroup wg owns rows 64wg..64wg+63 of the tile and issues, per k16 step, one
//      wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16  acc[64], descA, descB
//    that reads A (its 64 x 16 slice of X) and B (128 x 16 of Wb) straight from shared
//    memory through two 64-bit matrix descriptors (PTX ISA, "Matrix Descriptor Format"):
//      bits  0-13  start address >> 4
//      bits 16-29  leading-dimension byte offset >> 4: unused for a K-major swizzled
//                  operand whose k16 slice lies inside one 128-byte row (we set 1)
//      bits 32-45  stride-dimension byte offset >> 4: from one 8-row group to the next,
//                  8 rows x 128 B = 1024 B
//      bits 49-51  base offset: 0, every tile starts on a 1024-byte boundary
//      bits 62-63  swizzle mode: 1 = 128-byte swizzle
//    Layout ("K-major, 128B swizzle"): a tile is [128 rows][64 k] bf16, one 128-byte row
//    per m (A) or n (B); 8 rows make a 1024-byte atom in which 16-byte chunk c (k 8c..8c+7)
//    of row r sits at chunk c ^ (r % 8). The hardware applies that XOR to address bits
//    [4:6] ^= [7:9], so the k16 step kk is addressed by adding 32·kk bytes to the start
//    address (the swizzle then finds the chunks of every row). The XOR spreads the 8 rows
//    of a column of chunks over all 32 banks.
//    Transpose flags 0, 0: A is M x K K-major, B is N x K K-major (W's own layout).
//    Accumulator fragment (PTX ISA, wgmma D layout for m64nNk16, f32): warp q (0..3) of
//    the warpgroup holds rows 16q..16q+15; lane (g = lane/4, t = lane%4) holds acc[4j+i]
//    at row 16q + g + 8·(i/2), col 8j + 2t + (i%2) for j = 0..15 — mma.sync's C fragment
//    repeated along N.
//
//    Pipeline (4 shared stages of A and of B, 4 x (8·WGS + 16) KiB + 1 KiB for the
//    alignment):
//      X:  cp.async 16 B straight into the swizzled layout, 2 tiles ahead; rows >= M zero.
//      W:  each thread loads 32 codes (WGS = 2: a 16-byte word) or 16 (WGS = 4: 8 bytes)
//          of one row plus the raw scale parts for tile t+2 into registers (two register
//          sets, by parity) and, one iteration later, decodes tile t+1 into its B stage
//          with st.shared.
//    Iteration t: wait for X tile t (own cp.async group), fence.proxy.async (this thread's
//    generic-proxy writes — cp.async and st.shared — become visible to the async proxy
//    the wgmma reads through), __syncthreads (everyone's), then wgmma.fence, 4 wgmmas,
//    commit; while they run: X tile t+2 -> stage (t+2)%4, decode W tile t+1 -> stage
//    (t+1)%4, load W tile t+3; finally wgmma.wait_group 1 (this warpgroup's tile t-1 is
//    done). So after the barrier of iteration t every warpgroup's wgmmas up to t-2 are
//    complete and stages (t-2)%4 = (t+2)%4 and (t-3)%4 = (t+1)%4 are free to overwrite.
//    The accumulators stay in flight between iterations: wgmmas of one shape chained on
//    the same registers are ordered by the hardware (PTX ISA, wgmma.fence).
//    Shared memory: 4 x (16 KiB A + 16 KiB B) + 1 KiB = 132096 B (WGS = 2) or
//    4 x (32 KiB A + 16 KiB B) + 1 KiB = 197632 B (WGS = 4); 1 block per SM either way.
//    Both give the same bits: the same wgmmas on the same operands in the same k order.

namespace palign {
namespace nf4 {

// WGS warpgroups a block (2: nf4_gemm_fwd_wgmma, 4: nf4_gemm_fwd_wgmma_m256), each owning
// 64 rows of X: a block tile of 64·WGS rows x 128 output columns.
constexpr int WG_BN = 128, WG_BK = 64, WG_STAGES = 4;
constexpr int WG_B_BYTES = WG_BN * WG_BK * 2; // one W stage: [128 cols][64 k] bf16
__host__ __device__ constexpr int wg_x_bytes(int wgs) { return 64 * wgs * WG_BK * 2; }
__host__ __device__ constexpr int wg_smem(int wgs) {
    return WG_STAGES * (wg_x_bytes(wgs) + WG_B_BYTES) + 1024; // + room to align to 1024
}
static_assert(wg_smem(2) == 132096, "keep NF4_WGMMA_SMEM_BYTES in src/backend/cuda/nf4.rs in sync");
static_assert(wg_smem(4) == 197632, "keep NF4_WGMMA_M256_SMEM_BYTES in src/backend/cuda/nf4.rs in sync");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(PALIGN_KEMU)

// NW 32-bit words of W's codes (8·NW codes, inside one scale block) and their scale's
// parts, loaded ahead of use (Nf4Word for any NW in {2, 4}).
template <int NW> struct WgWords {
    uint32_t q[NW];
    ScaleParts s;
};
template <int NW>
__device__ __forceinline__ WgWords<NW> load_wg_words(const Nf4WeightParams &w, uint64_t e, bool ok) {
    static_assert(NW == 2 || NW == 4, "8 or 16 bytes");
    WgWords<NW> x{};
    if (ok) {
        if constexpr (NW == 4) {
            const uint4 v = __ldg(reinterpret_cast<const uint4 *>(w.packed + (e >> 1)));
            x.q[0] = v.x, x.q[1] = v.y, x.q[2] = v.z, x.q[3] = v.w;
        } else {
            const uint2 v = __ldg(reinterpret_cast<const uint2 *>(w.packed + (e >> 1)));
            x.q[0] = v.x, x.q[1] = v.y;
        }
        x.s = load_scale_parts(w, e >> w.log2_blocksize);
    }
    return x;
}

// A thread's share of one W tile, loaded a tile ahead so no load waits on another while
// the wgmmas run. Forward: NW words (8·NW codes) of one W row. Backward: IT items of two
// W rows (n, n + 1) x 8 codes (one 32-bit word each, in one scale block).
template <int WGS, bool BWD> struct WgTile {
    WgWords<8 / WGS> w;
};
template <int WGS> struct WgTile<WGS, true> {
    static constexpr int IT = 4 / WGS;
    uint32_t q[IT][2];
    ScaleParts s[IT][2];
};

template <int WGS, bool BWD> __device__ __forceinline__ void gemm_wgmma(const Nf4GemmParams &p) {
    constexpr int THREADS = 128 * WGS, BM = 64 * WGS;
    constexpr int NW = 8 / WGS;    // forward: 32-bit words of codes a thread decodes a tile
    constexpr int TPR = 64 / (8 * NW); // forward: threads per W row (64 codes a tile)
    PALIGN_DYNAMIC_SMEM(nf4_wg_smem);
    __shared__ __align__(256) float lut[16];
    if (dynamic_smem_bytes() < (uint32_t)wg_smem(WGS)) __trap(); // launcher bug, not data
    load_lut(lut);
    // 128B-swizzle atoms (and the descriptors' base offset 0) need 1024-byte alignment.
    const uint32_t raw = smem_addr(nf4_wg_smem);
    const uint32_t base = (raw + 1023u) & ~1023u;
    uint8_t *sm = nf4_wg_smem + (base - raw);
    auto a_stage = [&](int s) { return s * wg_x_bytes(WGS); }; // byte offsets
    auto b_stage = [&](int s) { return WG_STAGES * wg_x_bytes(WGS) + s * WG_B_BYTES; };

    const int tid = threadIdx.x, wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31;
    const int M = p.m, N = p.w.rows, K = p.w.cols;
    // Forward: Y[M, N] = X[M, K]·Wbᵀ; backward: dX[M, K] = dY[M, N]·Wb. RED is the
    // reduction length (the row length of p.a), OUT the output row length.
    const int RED = BWD ? N : K, OUT = BWD ? K : N;
    const int m0 = blockIdx.y * BM, c0 = blockIdx.x * WG_BN;
    const int KT = RED / WG_BK;

    // A tile (X or dY): 64·WGS rows x 8 chunks of 16 B; this thread copies chunk xc of
    // rows xr + 16·WGS·j (j < 4), to chunk xc ^ (row % 8) (the same for every j); rows
    // >= M are zero-filled. Sources and destinations are computed once, outside the loop.
    const int xr = tid >> 3, xc = tid & 7;
    const int x_dst = xr * 128 + ((xc ^ (xr & 7)) << 4);
    const __nv_bfloat16 *x_src[4];
    bool x_ok[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int row = m0 + xr + THREADS / 8 * j;
        x_ok[j] = row < M;
        x_src[j] = p.a + (int64_t)(x_ok[j] ? row : 0) * RED + xc * 8;
    }
    auto load_a = [&](int kt, int s) {
#pragma unroll
        for (int j = 0; j < 4; j++)
            cp_async16(sm + a_stage(s) + x_dst + THREADS / 8 * 128 * j, x_src[j] + kt * WG_BK,
                       x_ok[j]);
    };
    // The B tile is [128 output columns][64 reduction steps] bf16, K-major and swizzled,
    // for both products: forward W rows c0.., codes 64kt..; backward Wᵀ, i.e. W codes
    // c0.. of rows 64kt.., transposed on the way to shared memory.
    // Forward: thread -> row c0 + tid/TPR of W, codes 64kt + 8·NW·(tid%TPR) .. +8·NW.
    const int w_r = tid / TPR, w_h = tid % TPR;
    const bool w_ok = c0 + w_r < N;
    // Backward: item i of a thread is id = tid + THREADS·i -> W rows 64kt + 2·(id%32) and
    // the next (the n-pair), codes c0 + 8·(id/32) .. +7 (the k-octet, one 32-bit word).
    auto load_w = [&](int kt, WgTile<WGS, BWD> &w) {
        if constexpr (!BWD) {
            const int row = c0 + w_r, col = kt * WG_BK + w_h * 8 * NW;
            w.w = load_wg_words<NW>(p.w, (uint64_t)row * (uint64_t)K + col, w_ok);
        } else {
#pragma unroll
            for (int i = 0; i < WgTile<WGS, true>::IT; i++) {
                const int id = tid + THREADS * i, k = c0 + 8 * (id >> 5);
                const bool ok = k < K;
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const uint64_t e = (uint64_t)(kt * WG_BK + 2 * (id & 31) + r) * K + k;
                    w.q[i][r] = ok ? __ldg(reinterpret_cast<const uint32_t *>(p.w.packed + (e >> 1)))
                                   : 0u;
                    w.s[i][r] = ok ? load_scale_parts(p.w, e >> p.w.log2_blocksize)
                                   : ScaleParts{0.0f, 0u};
                }
            }
        }
    };
    // Decode the codes to bf16 (block_scale's formula: the same bits as every NF4 kernel)
    // and store them in B stage s. Forward: chunks NW·w_h .. NW·w_h+NW-1 of row w_r. Rows
    // past the matrix decode to zeros (q = 0, scale 0).
    // Backward: rows n, n+1 decode to pairs along k; one prmt makes each pair along n
    // (W[n][k], W[n+1][k]), stored as 4 bytes at row k - c0, column n - 64kt.
    auto store_w = [&](const WgTile<WGS, BWD> &w, int s) {
        if constexpr (!BWD) {
            const float sc = w_ok ? scale_of(p.w, w.w.s) : 0.0f;
            uint8_t *dst = sm + b_stage(s) + w_r * 128;
#pragma unroll
            for (int v = 0; v < NW; v++) {
                const uint4 o = decode_word(lut, w.w.q[v], sc);
                const int ch = NW * w_h + v;
                *reinterpret_cast<uint4 *>(dst + ((ch ^ (w_r & 7)) << 4)) = o;
            }
        } else {
#pragma unroll
            for (int i = 0; i < WgTile<WGS, true>::IT; i++) {
                const int id = tid + THREADS * i, np = id & 31, ko = id >> 5;
                const bool ok = c0 + 8 * ko < K;
                const uint4 o0 = decode_word(lut, w.q[i][0], ok ? scale_of(p.w, w.s[i][0]) : 0.0f);
                const uint4 o1 = decode_word(lut, w.q[i][1], ok ? scale_of(p.w, w.s[i][1]) : 0.0f);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const int kl = 8 * ko + j; // B tile row
                    const uint32_t v = __byte_perm(word_of(o0, j / 2), word_of(o1, j / 2),
                                                   j % 2 ? 0x7632u : 0x5410u);
                    const int ch = np >> 2; // 16-byte chunk of n-pairs 4ch .. 4ch+3
                    *reinterpret_cast<uint32_t *>(sm + b_stage(s) + kl * 128 +
                                                  ((ch ^ (kl & 7)) << 4) + (np & 3) * 4) = v;
                }
            }
        }
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.0f;

    // Prologue: X tiles 0 and 1 in flight, W tile 0 decoded, W tiles 1 and 2 in registers
    // (set (t & 1) holds tile t).
    load_a(0, 0);
    cp_async_commit();
    if (1 < KT) load_a(1, 1);
    cp_async_commit();
    WgTile<WGS, BWD> w0, w1;
    load_w(0, w0);
    store_w(w0, 0);
    if (1 < KT) load_w(1, w1);
    if (2 < KT) load_w(2, w0);

    // Stage 0's descriptors: this warpgroup's 64 rows of X, and the W tile.
    const uint64_t desc_a = wg_desc(base + a_stage(0) + wg * 64 * 128);
    const uint64_t desc_b = wg_desc(base + b_stage(0));

    // One iteration; `nx` holds W tile kt+1 on entry and W tile kt+3 on exit.
    auto step = [&](int kt, WgTile<WGS, BWD> &nx) {
        cp_async_wait<1>(); // X tile kt (tile kt+1 may still fly)
        fence_proxy_async_smem();
        __syncthreads();
        const int s = kt % WG_STAGES;
        // A descriptor's address field is bits 0-13 (address >> 4) and no address here
        // reaches 2^18, so moving a descriptor by b bytes adds b >> 4 without a carry.
        const uint64_t da = desc_a + (uint32_t)(s * (wg_x_bytes(WGS) >> 4));
        const uint64_t db = desc_b + (uint32_t)(s * (WG_B_BYTES >> 4));
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; kk++)
            wgmma_m64n128k16(acc, da + 2 * kk, db + 2 * kk); // k16 step kk: 32 bytes on
        wg_commit();
        if (kt + 2 < KT) load_a(kt + 2, (kt + 2) % WG_STAGES);
        cp_async_commit(); // one group per iteration, empty ones included
        if (kt + 1 < KT) store_w(nx, (kt + 1) % WG_STAGES);
        if (kt + 3 < KT) load_w(kt + 3, nx);
        wg_wait<1>();
    };
    for (int kt = 0; kt < KT; kt += 2) {
        step(kt, w1);
        if (kt + 1 < KT) step(kt + 1, w0);
    }
    wg_wait<0>();
    wg_pin(acc);
    cp_async_wait<0>(); // only empty groups remain; leave no copy in flight at exit

    const int g = lane >> 2, t = lane & 3;
    const int row = m0 + wg * 64 + wq * 16 + g;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int col = c0 + 8 * j + 2 * t; // OUT % 8 == 0: col < OUT implies col + 1 < OUT
        if (col >= OUT) continue;
        if (row < M)
            store2(p.out, p.out_f32, (int64_t)row * OUT + col, acc[4 * j], acc[4 * j + 1]);
        if (row + 8 < M)
            store2(p.out, p.out_f32, (int64_t)(row + 8) * OUT + col, acc[4 * j + 2],
                   acc[4 * j + 3]);
    }
}

// 6. nf4_gemm_fwd_wgmma_rs: the product of 5. computed transposed, Yᵀ[N, M] = Wb · Xᵀ,
//    so that W is wgmma's A operand and comes from registers: each lane decodes its own
//    A fragment from the loaded words, and decoded weights never touch shared memory.
//    Why: in 5. the SM's shared memory carries, per k-tile, the X copies, the decoded W
//    stores, the LUT lookups and every warpgroup's wgmma reads of both operands; for the
//    256-row kernel that is ~176 KiB a k-tile against ~1104 cycles of wgmma, more than
//    the 128 B/cycle shared memory gives (by this count it, not the tensor cores, bounds
//    5. near 78% of peak). Here a k-tile of 256 tokens moves ~128 KiB: X copies (32 KiB),
//    LUT lookups (~32 KiB of cycles), and the two warpgroups' wgmma reads of X (64 KiB).
//    An inference from counts, unmeasured until a GPU run (the dispatcher times it).
//
//    Block tile 128 output features (2 warpgroups x 64) x 256 tokens x 64 k, 256 threads.
//    Warpgroup wg owns features n0 + 64wg .. +63; per k16 step s it issues
//      wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16  acc[128], {a0..a3}, descX
//    with X's [256 tokens][64 k] tile as B (staged as 5. stages its A: K-major, 128B
//    swizzle, cp.async, 4 stages, 2 tiles ahead). Lane (warp q of the warpgroup, g =
//    lane/4, t = lane%4) holds the A fragment of rows r = n0 + 64wg + 16q + g and r + 8:
//    reg 0 (row r, k 2t, 2t+1), reg 1 (row r + 8), regs 2/3 the same rows at k 2t+8, 2t+9.
//    In W's packed bytes, k 16s + 2t, +1 of a row is byte 8s + t of the row's 32 bytes a
//    tile (high nibble = the lower k) and k 16s + 2t + 8 is byte 8s + t + 4: so a lane
//    needs byte t of each 32-bit word of its rows' codes. It loads each row's two 16-byte
//    words (32 codes, one scale block each, like every kernel here), gathers byte t of
//    their four 32-bit words with 3 prmts (gather_bytes), and decode_word turns those 4
//    bytes into regs 0/2 (row r) or 1/3 (row r + 8) of steps 2h and 2h+1. The 4 lanes of a
//    row load the same words (L1 hits): 16 B where a lane needs 8, for no shuffles.
//
//    Iteration t: wait X tile t, fence.proxy.async, __syncthreads, wgmma.fence, 4 wgmmas
//    (A set t%2), commit, X tile t+2 -> stage (t+2)%4, wgmma.wait_group 1 (tile t-1's
//    wgmmas, the last readers of A set (t+1)%2, are done), decode W tile t+1 into that set,
//    load W tile t+2's words (one register set: a tile's words land during the next
//    iteration's wgmmas; the W tile is shared by the 32 blocks of a column at M = 8192,
//    so mostly from L2). After the barrier of iteration t every warpgroup has retired its
//    wgmmas up to t-2, so stage (t+2)%4 is free. acc[4j+i] is Yᵀ row r + 8(i/2), column
//    8j + 2t + i%2: stored to Y[m0 + column][row]. Needs K % 64 == 0 (N % 8 == 0 like 5.,
//    although rows >= N decode to zeros here). The same Wb bits as every kernel here.
//    Shared memory: 4 x 32 KiB + 1 KiB = 132096 B. 254 registers (no spills, sm_90a):
//    1 block (8 warps) an SM.

constexpr int RS_BM = 256, RS_X_BYTES = RS_BM * WG_BK * 2;
constexpr int RS_SMEM = WG_STAGES * RS_X_BYTES + 1024;
static_assert(RS_SMEM == 132096, "keep NF4_WGMMA_RS_SMEM_BYTES in src/backend/cuda/nf4.rs in sync");

// A lane's W codes of one k-tile: [row r, r + 8][codes 0..31, 32..63].
struct RsWords {
    Nf4Word w[2][2];
};

// Byte t of each 32-bit word of q (sel = t | (t + 4) << 4), as one word (byte i from q's
// word i).
__device__ __forceinline__ uint32_t gather_bytes(const uint4 &q, uint32_t sel) {
    return __byte_perm(__byte_perm(q.x, q.y, sel), __byte_perm(q.z, q.w, sel), 0x5410u);
}

__device__ __forceinline__ void gemm_wgmma_rs(const Nf4GemmParams &p) {
    PALIGN_DYNAMIC_SMEM(nf4_rs_smem);
    __shared__ __align__(256) float lut[16];
    if (dynamic_smem_bytes() < (uint32_t)RS_SMEM) __trap(); // launcher bug, not data
    load_lut(lut);
    const uint32_t raw = smem_addr(nf4_rs_smem);
    const uint32_t base = (raw + 1023u) & ~1023u; // 128B-swizzle atoms: 1024-byte aligned
    uint8_t *sm = nf4_rs_smem + (base - raw);

    const int tid = threadIdx.x, wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int M = p.m, N = p.w.rows, K = p.w.cols;
    const int n0 = blockIdx.x * WG_BN, m0 = blockIdx.y * RS_BM;
    const int KT = K / WG_BK;
    const int r0 = n0 + 64 * wg + 16 * wq + g; // this lane's A rows: r0 and r0 + 8
    const bool ok0 = r0 < N, ok1 = r0 + 8 < N;
    const uint32_t sel = (uint32_t)t | ((uint32_t)(t + 4) << 4);

    // X tile: 256 rows x 8 chunks of 16 B; this thread copies chunk xc of rows xr + 32j
    // (j < 8) to chunk xc ^ (row % 8), the same for every j; rows >= M zero-filled.
    const int xr = tid >> 3, xc = tid & 7;
    const int x_dst = xr * 128 + ((xc ^ (xr & 7)) << 4);
    const __nv_bfloat16 *x_src = p.a + (int64_t)min(m0 + xr, M - 1) * K + xc * 8;
    auto load_x = [&](int kt, int s) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const bool ok = m0 + xr + 32 * j < M;
            cp_async16(sm + s * RS_X_BYTES + x_dst + 32 * 128 * j,
                       x_src + (ok ? (int64_t)32 * j * K : 0) + kt * WG_BK, ok);
        }
    };
    auto load_w = [&](int kt, RsWords &w) {
        const uint64_t e = (uint64_t)r0 * (uint64_t)K + kt * WG_BK;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            w.w[0][h] = load_word(p.w, e + 32 * h, ok0);
            w.w[1][h] = load_word(p.w, e + (uint64_t)8 * K + 32 * h, ok1);
        }
    };
    // a[s][reg]: the A fragments of the tile's 4 k16 steps.
    auto decode = [&](const RsWords &w, uint32_t(&a)[4][4]) {
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const float sc = word_scale(p.w, w.w[i][h], i ? ok1 : ok0);
                const uint4 o = decode_word(lut, gather_bytes(w.w[i][h].q, sel), sc);
                a[2 * h][i] = o.x;
                a[2 * h][2 + i] = o.y;
                a[2 * h + 1][i] = o.z;
                a[2 * h + 1][2 + i] = o.w;
            }
    };

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; i++) acc[i] = 0.0f;
    uint32_t a0[4][4], a1[4][4];
    const uint64_t desc_x = wg_desc(base); // stage 0, k16 step 0

    // Prologue: X tiles 0 and 1 in flight, W tile 0 decoded into a0, tile 1's words loaded.
    load_x(0, 0);
    cp_async_commit();
    if (1 < KT) load_x(1, 1);
    cp_async_commit();
    RsWords wn;
    load_w(0, wn);
    decode(wn, a0);
    if (1 < KT) load_w(1, wn);

    // One iteration: `cur` holds tile kt's fragments, `wn` tile kt+1's words (decoded into
    // `nxa`), then tile kt+2's.
    auto step = [&](int kt, uint32_t(&cur)[4][4], uint32_t(&nxa)[4][4]) {
        cp_async_wait<1>(); // X tile kt (tile kt+1 may still fly)
        fence_proxy_async_smem();
        __syncthreads();
        // No address here reaches 2^18: a descriptor moves by bytes >> 4 with no carry.
        const uint64_t dx = desc_x + (uint32_t)((kt % WG_STAGES) * (RS_X_BYTES >> 4));
        wg_fence();
#pragma unroll
        for (int s = 0; s < WG_BK / 16; s++) wgmma_m64n256k16_rs(acc, cur[s], dx + 2 * s);
        wg_commit();
        if (kt + 2 < KT) load_x(kt + 2, (kt + 2) % WG_STAGES);
        cp_async_commit(); // one group per iteration, empty ones included
        wg_wait<1>();      // tile kt-1's wgmmas, the last readers of `nxa`, are done
        if (kt + 1 < KT) decode(wn, nxa);
        if (kt + 2 < KT) load_w(kt + 2, wn);
    };
    for (int kt = 0; kt < KT; kt += 2) {
        step(kt, a0, a1);
        if (kt + 1 < KT) step(kt + 1, a1, a0);
    }
    wg_wait<0>();
    wg_pin(acc);
    cp_async_wait<0>(); // only empty groups remain; leave no copy in flight at exit

#pragma unroll
    for (int j = 0; j < 32; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = r0 + 8 * (i >> 1), tok = m0 + 8 * j + 2 * t + (i & 1);
            if (row >= N || tok >= M) continue;
            const int64_t o = (int64_t)tok * N + row;
            if (p.out_f32)
                static_cast<float *>(p.out)[o] = acc[4 * j + i];
            else
                static_cast<__nv_bfloat16 *>(p.out)[o] = f2bf(acc[4 * j + i]);
        }
}

// 7. nf4_gemm_bwd_wgmma_rs: the backward product dX[M, K] = dY[M, N]·Wb computed
//    transposed like §6, dXᵀ = Wbᵀ · dYᵀ: Wbᵀ (rows = output columns k, reduction n) is
//    the register A operand of m64n256k16, dY's [256 tokens][64 n] tile the shared B
//    operand (staged as §6 stages X, row length N). Same shared-memory argument as §6.
//
//    Block tile 128 output columns (2 warpgroups x 64) x 256 tokens x 64 n, 256 threads.
//    Lane (warp q of warpgroup wg, g = lane/4, t = lane%4) holds the A fragment of
//    columns c = kb + g and c + 8 (kb = k0 + 64wg + 16q) at reduction steps n = 16s + 2t,
//    +1 (reg 0: column c, reg 1: c + 8) and 16s + 2t + 8, +9 (regs 2, 3): Wᵀ[c][n] =
//    W[n][c], so a pair of a register comes from two W rows. For each of its 16 W rows a
//    tile (n = 16s + 2t + {0, 1, 8, 9}) the lane loads the 8 bytes of codes kb .. kb+15
//    (the 8 lanes g of a t load the same bytes: L1 broadcasts) and takes nibble g of the
//    low word (column c) and of the high word (c + 8) at bit 8·(g/2) + 4·(1 - g%2) (the
//    high nibble holds the even column): a rotate and a masked OR give the LUT address. Scales: one per (W row, 16 codes), the same for
//    all 8 lanes g, so the block computes a tile's 512 of them once (2 per thread) into a
//    3-slot ring in shared memory, two tiles ahead, and lanes read them back.
//
//    Iteration t: wait dY tile t, fence.proxy.async, __syncthreads (dY tile t and the
//    scales of tile t+1 are published), 4 wgmmas (A set t%2), commit, dY tile t+2 ->
//    stage (t+2)%4, scales of tile t+2 -> ring slot (t+2)%3 (from parts loaded in the
//    previous iteration; its last reader, the decode of tile t-1, ran before the barrier
//    of t), parts of tile t+3, wgmma.wait_group 1, decode tile t+1 into A set (t+1)%2,
//    load tile t+2's W words. Needs N % 64 == 0 and K % 16 == 0 (8-byte loads of 16
//    codes; a 16-code group lies in one scale block, blocksize >= 32).

constexpr int RSB_SCALES = 8 * 64; // a tile's scales: 8 groups of 16 codes x 64 W rows
constexpr int RSB_SMEM = WG_STAGES * RS_X_BYTES + 3 * RSB_SCALES * 4 + 1024;
static_assert(RSB_SMEM == 138240, "keep NF4_WGMMA_RS_BWD_SMEM_BYTES in src/backend/cuda/nf4.rs in sync");

// A lane's W codes of one tile: [step s][rows 16s + 2t + {0, 1, 8, 9}], 16 codes each.
struct RsbWords {
    uint2 q[4][4];
};

__device__ __forceinline__ void gemm_wgmma_rs_bwd(const Nf4GemmParams &p) {
    PALIGN_DYNAMIC_SMEM(nf4_rsb_smem);
    __shared__ __align__(256) float lut[16];
    if (dynamic_smem_bytes() < (uint32_t)RSB_SMEM) __trap(); // launcher bug, not data
    load_lut(lut);
    const uint32_t raw = smem_addr(nf4_rsb_smem);
    const uint32_t base = (raw + 1023u) & ~1023u; // 128B-swizzle atoms: 1024-byte aligned
    uint8_t *sm = nf4_rsb_smem + (base - raw);
    float *ring = reinterpret_cast<float *>(sm + WG_STAGES * RS_X_BYTES); // [3][512]

    const int tid = threadIdx.x, wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int M = p.m, N = p.w.rows, K = p.w.cols;
    const int k0 = blockIdx.x * WG_BN, m0 = blockIdx.y * RS_BM;
    const int KT = N / WG_BK;
    const int grp = 4 * wg + wq, kb = k0 + 16 * grp; // this warp's 16 output columns
    const bool okw = kb < K;                          // K % 16 == 0: all 16 or none
    // The lane's nibble sits at bit 8·(g/2) + 4·(1 - g%2) of each word; rotating right
    // by that minus 2 puts 4·code at bits 2..5, the table offset lut_ld_masked takes.
    const uint32_t rot = (uint32_t)(8 * (g >> 1) + ((g & 1) ? 0 : 4) - 2) & 31u;

    // dY tile as §6's X tile (row length N).
    const int xr = tid >> 3, xc = tid & 7;
    const int x_dst = xr * 128 + ((xc ^ (xr & 7)) << 4);
    const __nv_bfloat16 *x_src = p.a + (int64_t)min(m0 + xr, M - 1) * N + xc * 8;
    auto load_x = [&](int kt, int s) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const bool ok = m0 + xr + 32 * j < M;
            cp_async16(sm + s * RS_X_BYTES + x_dst + 32 * 128 * j,
                       x_src + (ok ? (int64_t)32 * j * N : 0) + kt * WG_BK, ok);
        }
    };
    // Scales: thread item i (< 2) is id = tid + 256i -> W row 64kt + id%64, codes
    // k0 + 16·(id/64) .. +15; 0 past K. The ring slot is [8 groups][64 rows], so the
    // decode's reads (rows 2t + .., one group a warp) fall in different banks.
    auto scale_e = [&](int kt, int i) {
        const int id = tid + 256 * i;
        return (uint64_t)(kt * WG_BK + (id & 63)) * (uint64_t)K + k0 + 16 * (id >> 6);
    };
    auto scale_ok = [&](int i) { return k0 + 16 * ((tid + 256 * i) >> 6) < K; };
    auto load_parts = [&](int kt, ScaleParts (&sp)[2]) {
#pragma unroll
        for (int i = 0; i < 2; i++)
            sp[i] = scale_ok(i) ? load_scale_parts(p.w, scale_e(kt, i) >> p.w.log2_blocksize)
                                : ScaleParts{0.0f, 0u};
    };
    auto store_scales = [&](const ScaleParts (&sp)[2], int slot) {
#pragma unroll
        for (int i = 0; i < 2; i++)
            ring[slot * RSB_SCALES + tid + 256 * i] = scale_ok(i) ? scale_of(p.w, sp[i]) : 0.0f;
    };
    // W rows 16s + 2t + {0, 1, 8, 9} of tile kt, codes kb .. kb+15: 32-bit byte offsets
    // from row 2t (the launcher checks that the packed weight is under 4 GiB), so an
    // address costs a multiply-add and a 64-bit add, not a 64-bit product.
    const uint32_t row_bytes = (uint32_t)K >> 1;
    const uint32_t w_off = okw ? (uint32_t)(((uint64_t)(2 * t) * (uint64_t)K + kb) >> 1) : 0u;
    auto load_w = [&](int kt, RsbWords &w) {
        const uint32_t o = w_off + (uint32_t)kt * (uint32_t)WG_BK * row_bytes;
#pragma unroll
        for (int s = 0; s < 4; s++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t off = o + (uint32_t)(16 * s + (j & 1) + 8 * (j >> 1)) * row_bytes;
                w.q[s][j] = okw ? __ldg(reinterpret_cast<const uint2 *>(p.w.packed + off))
                                : make_uint2(0, 0);
            }
    };
    // One code's weight: the lane's nibble of `word`, times the scale (decode_word's f32
    // product and rounding: the same Wb bits).
    auto weight = [&](uint32_t word, float sc) {
        return __fmul_rn(lut_ld_masked(lut, __funnelshift_r(word, word, rot)), sc);
    };
    auto decode = [&](const RsbWords &w, int slot, uint32_t(&a)[4][4]) {
        const float *sc_tile = ring + slot * RSB_SCALES + 64 * grp;
#pragma unroll
        for (int s = 0; s < 4; s++) {
            float lo[4], hi[4]; // column c, c + 8 of rows 16s + 2t + {0, 1, 8, 9}
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int nl = 16 * s + 2 * t + (j & 1) + 8 * (j >> 1);
                const float sc = sc_tile[nl];
                lo[j] = weight(w.q[s][j].x, sc);
                hi[j] = weight(w.q[s][j].y, sc);
            }
            a[s][0] = pack_bf16(lo[0], lo[1]);
            a[s][1] = pack_bf16(hi[0], hi[1]);
            a[s][2] = pack_bf16(lo[2], lo[3]);
            a[s][3] = pack_bf16(hi[2], hi[3]);
        }
    };

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; i++) acc[i] = 0.0f;
    uint32_t a0[4][4], a1[4][4];
    const uint64_t desc_x = wg_desc(base);

    // Prologue: dY tiles 0, 1 in flight; scales of tiles 0, 1 in the ring (published by a
    // barrier before the first decode); tile 0 decoded; tile 1's words and tile 2's
    // scale parts loaded.
    load_x(0, 0);
    cp_async_commit();
    if (1 < KT) load_x(1, 1);
    cp_async_commit();
    ScaleParts sp[2];
    load_parts(0, sp);
    store_scales(sp, 0);
    if (1 < KT) {
        load_parts(1, sp);
        store_scales(sp, 1);
    }
    if (2 < KT) load_parts(2, sp);
    RsbWords wn;
    load_w(0, wn);
    __syncthreads();
    decode(wn, 0, a0);
    if (1 < KT) load_w(1, wn);

    auto step = [&](int kt, uint32_t(&cur)[4][4], uint32_t(&nxa)[4][4]) {
        cp_async_wait<1>(); // dY tile kt (tile kt+1 may still fly)
        fence_proxy_async_smem();
        __syncthreads();
        const uint64_t dx = desc_x + (uint32_t)((kt % WG_STAGES) * (RS_X_BYTES >> 4));
        wg_fence();
#pragma unroll
        for (int s = 0; s < WG_BK / 16; s++) wgmma_m64n256k16_rs(acc, cur[s], dx + 2 * s);
        wg_commit();
        if (kt + 2 < KT) load_x(kt + 2, (kt + 2) % WG_STAGES);
        cp_async_commit(); // one group per iteration, empty ones included
        if (kt + 2 < KT) store_scales(sp, (kt + 2) % 3);
        if (kt + 3 < KT) load_parts(kt + 3, sp);
        wg_wait<1>(); // tile kt-1's wgmmas, the last readers of `nxa`, are done
        if (kt + 1 < KT) decode(wn, (kt + 1) % 3, nxa);
        if (kt + 2 < KT) load_w(kt + 2, wn);
    };
    for (int kt = 0; kt < KT; kt += 2) {
        step(kt, a0, a1);
        if (kt + 1 < KT) step(kt + 1, a1, a0);
    }
    wg_wait<0>();
    wg_pin(acc);
    cp_async_wait<0>();

#pragma unroll
    for (int j = 0; j < 32; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int col = kb + g + 8 * (i >> 1), tok = m0 + 8 * j + 2 * t + (i & 1);
            if (col >= K || tok >= M) continue;
            const int64_t o = (int64_t)tok * K + col;
            if (p.out_f32)
                static_cast<float *>(p.out)[o] = acc[4 * j + i];
            else
                static_cast<__nv_bfloat16 *>(p.out)[o] = f2bf(acc[4 * j + i]);
        }
}

#endif // __CUDA_ARCH_FEAT_SM90_ALL || PALIGN_KEMU

} // namespace nf4
} // namespace palign

// The sm_90a kernels (PALIGN_SM90A_ONLY: common.cuh).
// §5: 128 and 256 rows a block, forward and backward (BWD: dX = dY·Wb).
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemm_fwd_wgmma(Nf4GemmParams p) {
    PALIGN_SM90A_ONLY((palign::nf4::gemm_wgmma<2, false>(p)));
}
extern "C" __global__ void __launch_bounds__(512, 1) nf4_gemm_fwd_wgmma_m256(Nf4GemmParams p) {
    PALIGN_SM90A_ONLY((palign::nf4::gemm_wgmma<4, false>(p)));
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemm_bwd_wgmma(Nf4GemmParams p) {
    PALIGN_SM90A_ONLY((palign::nf4::gemm_wgmma<2, true>(p)));
}
extern "C" __global__ void __launch_bounds__(512, 1) nf4_gemm_bwd_wgmma_m256(Nf4GemmParams p) {
    PALIGN_SM90A_ONLY((palign::nf4::gemm_wgmma<4, true>(p)));
}
// §6 and §7: W as the register operand, forward and backward.
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemm_fwd_wgmma_rs(Nf4GemmParams p) {
    PALIGN_SM90A_ONLY(palign::nf4::gemm_wgmma_rs(p));
}
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemm_bwd_wgmma_rs(Nf4GemmParams p) {
    PALIGN_SM90A_ONLY(palign::nf4::gemm_wgmma_rs_bwd(p));
}
