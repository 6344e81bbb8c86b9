// Launch parameters: one plain C struct per kernel, passed by value as the kernel's
// only argument. This header is the launch ABI: the .cu files include it, and
// tools/regen-bindings.sh turns it into src/backend/cuda/params.rs with bindgen.
//
// Rules that keep the Rust side plain old data (bytemuck::Pod, checked at compile time):
// - device pointers are 8-byte handles: typed pointers in CUDA, uint64_t elsewhere;
// - fields are ordered 8-byte first, then 4-byte, with explicit `_pad` so no struct
//   has implicit padding;
// - element counts that can pass 2^31 are int64_t, tensor dims are int32_t.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(PALIGN_KEMU)
#ifdef PALIGN_KEMU
#include "kemu.h" // the CPU emulator (tools/kemu) compiles the kernels as host C++
#else
#include <cuda_bf16.h>
#endif
typedef __nv_bfloat16 *bf16_ptr;
typedef const __nv_bfloat16 *cbf16_ptr;
typedef float *f32_ptr;
typedef const float *cf32_ptr;
typedef const uint32_t *cu32_ptr;
typedef uint32_t *u32_ptr;
typedef const struct TensorChunk *cchunk_ptr;
#else
typedef uint64_t bf16_ptr;
typedef uint64_t cbf16_ptr;
typedef uint64_t f32_ptr;
typedef uint64_t cf32_ptr;
typedef uint64_t cu32_ptr;
typedef uint64_t u32_ptr;
typedef uint64_t cchunk_ptr;
#endif

// out[t, :] = table[ids[t], :]; rows with ids[t] >= vocab are written as zeros.
struct EmbeddingParams {
    bf16_ptr out;    // [n_tokens, hidden]
    cbf16_ptr table; // [vocab, hidden]
    cu32_ptr ids;    // [n_tokens]
    int32_t n_tokens;
    int32_t hidden;
    int32_t vocab;
    int32_t _pad;
};

// y = w * bf16(x * rstd), rstd = 1/sqrt(mean(x^2) + eps) per row (f32 math).
struct RmsNormForwardParams {
    bf16_ptr y;       // [rows, cols]
    f32_ptr rstd;     // [rows], may be 0 (not saved)
    cbf16_ptr x;      // [rows, cols]
    cbf16_ptr weight; // [cols]
    int32_t rows;
    int32_t cols;
    float eps;
    int32_t _pad;
};

// dx (=, or += when accumulate != 0) = rstd * (dy*w - xhat * mean(dy*w*xhat)).
struct RmsNormBackwardParams {
    bf16_ptr dx;      // [rows, cols]
    cbf16_ptr dy;     // [rows, cols]
    cbf16_ptr x;      // [rows, cols]
    cbf16_ptr weight; // [cols]
    cf32_ptr rstd;    // [rows], from the forward
    int32_t rows;
    int32_t cols;
    int32_t accumulate;
    int32_t _pad;
};

// Rotate-half RoPE on Q and K in place (forward: angle +, backward: angle -).
// Row t of q starts at q + t*q_stride (elements), heads are contiguous head_dim blocks.
struct RopeParams {
    bf16_ptr q;          // [n_tokens, q_stride], first n_q_heads*head_dim used
    bf16_ptr k;          // [n_tokens, k_stride], first n_kv_heads*head_dim used
    cu32_ptr positions;  // [n_tokens]
    cf32_ptr cos;        // [max_pos, head_dim/2]
    cf32_ptr sin;        // [max_pos, head_dim/2]
    int32_t n_tokens;
    int32_t n_q_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t q_stride;
    int32_t k_stride;
    int32_t max_pos;     // positions >= max_pos leave their row unchanged
    int32_t _pad;
};

// out = bf16(bf16(silu(gate)) * up), elementwise.
struct SwigluForwardParams {
    bf16_ptr out;
    cbf16_ptr gate;
    cbf16_ptr up;
    int64_t n;
};

// dup = dout * silu(gate); dgate = dout * up * sig * (1 + gate * (1 - sig)).
struct SwigluBackwardParams {
    bf16_ptr dgate;
    bf16_ptr dup;
    cbf16_ptr dout;
    cbf16_ptr gate;
    cbf16_ptr up;
    int64_t n;
};

// One contiguous piece of one f32 tensor (and its optimizer state). The multi-tensor
// kernels run one block per chunk; the host builds the chunk table once.
struct TensorChunk {
    f32_ptr param; // may be 0 for grad-norm only tables
    f32_ptr grad;
    f32_ptr m;
    f32_ptr v;
    int64_t n;
};

// torch.optim.AdamW step over every chunk; the step-dependent scalars are computed on
// the host in f64 and rounded to f32, as torch does with its Python-float scalars.
struct AdamWParams {
    cchunk_ptr chunks;
    cf32_ptr grad_scale;   // may be 0; else grads are multiplied by *grad_scale (clip coef)
    int32_t n_chunks;
    float decay;           // 1 - lr * weight_decay
    float beta1;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float step_size;       // lr / (1 - beta1^step)
    float bc2_sqrt;        // sqrt(1 - beta2^step)
    float eps;
    int32_t _pad;
};

// Global L2 norm over all chunks' grads and the clip_grad_norm_ coefficient.
// out[0] = total norm, out[1] = min(1, max_norm / (total + 1e-6)).
struct GradNormParams {
    cchunk_ptr chunks;
    f32_ptr partial;       // [n_chunks] scratch: sum of squares per chunk
    f32_ptr out;           // [2]
    int32_t n_chunks;
    float max_norm;
};

struct CastBf16ToF32Params {
    f32_ptr out;
    cbf16_ptr in;
    int64_t n;
};

struct CastF32ToBf16Params {
    bf16_ptr out;
    cf32_ptr in;
    int64_t n;
};

/* ---- nf4.cu ---- */
#if defined(__CUDACC__) || defined(PALIGN_KEMU)
typedef const uint8_t *cu8_ptr;
typedef void *out_ptr; // bf16 or f32, as the struct's out_f32 says
#else
typedef uint64_t cu8_ptr;
typedef uint64_t out_ptr;
#endif

// An NF4 weight [rows, cols] (bitsandbytes layout). Block b's scale is absmax[b], or
// when absmax is 0 the double-quantized code2[qabsmax[b]] * absmax2[b >> log2_blocksize2]
// + offset. Embedded by value in the NF4 kernels' params.
struct Nf4WeightParams {
    cu8_ptr packed;          // [(numel + 1) / 2], element 2j in the high nibble of byte j
    cf32_ptr absmax;         // [nblocks] f32 scales, or 0 (double quantized)
    cu8_ptr qabsmax;         // [nblocks] 8-bit codes (double quant)
    cf32_ptr code2;          // [256] (double quant)
    cf32_ptr absmax2;        // [ceil(nblocks / blocksize2)] (double quant)
    int64_t numel;           // rows * cols
    int32_t rows;
    int32_t cols;
    int32_t log2_blocksize;  // 5..12
    int32_t log2_blocksize2;
    float offset;            // double quant
    int32_t _pad;
};

// out[e] = NF4[code e] * scale(e / blocksize) for e < numel, f32 or bf16 (RNE).
struct Nf4DequantParams {
    out_ptr out;
    struct Nf4WeightParams w;
    int32_t out_f32;
    int32_t _pad;
};

// y[m, n] = sum_k x[m, k] * bf16(W[n, k]) for m < M <= 16; needs cols % 32 == 0.
struct Nf4GemvParams {
    out_ptr y;               // [M, rows]
    cbf16_ptr x;             // [M, cols]
    struct Nf4WeightParams w;
    int32_t m;
    int32_t out_f32;
};

// nf4_gemm_fwd: out[M, rows] = a[M, cols] · bf16(W)ᵀ; nf4_gemm_bwd: out[M, cols] =
// a[M, rows] · bf16(W). The reduction length must be a multiple of 64.
struct Nf4GemmParams {
    out_ptr out;
    cbf16_ptr a;
    struct Nf4WeightParams w;
    int32_t m;
    int32_t out_f32;
};

/* ---- attention.cu ---- */
// Causal GQA flash attention over variable-length sequences: sequence s occupies rows
// seq_start[s] .. seq_start[s] + seq_len[s]. window > 0: query i sees keys i-window+1 ..= i.
struct AttnFwdParams {
    bf16_ptr o;            // [rows, n_heads, head_dim]
    f32_ptr lse;           // [rows, n_heads], natural log
    cbf16_ptr q;           // [rows, n_heads, head_dim]
    cbf16_ptr k;           // [rows, n_kv_heads, head_dim]
    cbf16_ptr v;           // [rows, n_kv_heads, head_dim]
    cu32_ptr seq_start;    // [n_seqs]
    cu32_ptr seq_len;      // [n_seqs]
    int32_t n_seqs;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t window;        // 0: plain causal
    float scale;           // 1/sqrt(head_dim)
    int32_t _pad;
};

// delta[r, h] = sum_d dO[r, h, d] * O[r, h, d]; dq_accum[r, h, :] = 0, for every row.
struct AttnBwdPrepParams {
    f32_ptr delta;         // [rows, n_heads]
    f32_ptr dq_accum;      // [rows, n_heads, head_dim]
    cbf16_ptr o;
    cbf16_ptr d_o;
    int32_t n_rows;
    int32_t n_heads;
    int32_t head_dim;
    int32_t _pad;
};

// dK, dV written (rows of the sequences); dQ added, unscaled, to dq_accum (f32).
struct AttnBwdParams {
    f32_ptr dq_accum;      // [rows, n_heads, head_dim]
    bf16_ptr dk;           // [rows, n_kv_heads, head_dim]
    bf16_ptr dv;
    cbf16_ptr q;
    cbf16_ptr k;
    cbf16_ptr v;
    cbf16_ptr d_o;         // [rows, n_heads, head_dim]
    cf32_ptr lse;          // [rows, n_heads], from the forward
    cf32_ptr delta;        // [rows, n_heads], from the prep kernel
    cu32_ptr seq_start;
    cu32_ptr seq_len;
    int32_t n_seqs;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t window;
    float scale;
    int32_t _pad;
};

// One warpgroup MMA of form `form` (kernels/probe.cu): d[64][n] = (accumulate ? 1 : 0) +
// a[64][16]·b[16][n], all row-major f32 (values bf16 holds exactly).
struct WgmmaProbeParams {
    cf32_ptr a;
    cf32_ptr b;
    f32_ptr d;
    int32_t form;
    int32_t accumulate;
};

// dq = bf16(scale * dq_accum), n elements (a multiple of 4).
struct AttnDqParams {
    bf16_ptr dq;
    cf32_ptr dq_accum;
    int64_t n;
    float scale;
    int32_t _pad;
};

// One new query per sequence i against a KV cache whose position pos of sequence i is
// row slot_start[i] + pos % capacity; positions max(0, len - window) .. len - 1 are seen.
struct AttnDecodeParams {
    bf16_ptr out;          // [n, n_heads, head_dim]
    f32_ptr part_o;        // [n, n_heads, n_splits, head_dim] (n_splits > 1)
    f32_ptr part_ml;       // [n, n_heads, n_splits, 2]: running max (base 2), sum
    cbf16_ptr q;           // [n, n_heads, head_dim]
    cbf16_ptr k_cache;     // [cache rows, n_kv_heads, head_dim]
    cbf16_ptr v_cache;
    cu32_ptr slot_start;   // [n]
    cu32_ptr seq_len;      // [n]: tokens stored, the new one included (>= 1)
    int32_t n;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t window;        // 0: none
    int32_t capacity;      // rows per slot (a ring when shorter than the sequence)
    int32_t n_splits;
    int32_t split_size;    // visible positions per split
    int32_t head_chunks;   // ceil(group / 8): blocks per KV head
    float scale;
};

/* ---- elementwise.cu ---- */
// y = bf16(y + x), n elements.
struct AddBf16Params {
    bf16_ptr y;
    cbf16_ptr x;
    int64_t n;
};

// y = bf16(y + f32(alpha * x)), n elements (no FMA, as the CPU computes it).
struct AxpyBf16Params {
    bf16_ptr y;
    cbf16_ptr x;
    int64_t n;
    float alpha;
    int32_t _pad;
};

// out = bf16(a * b), n elements.
struct MulBf16Params {
    bf16_ptr out;
    cbf16_ptr a;
    cbf16_ptr b;
    int64_t n;
};

// out[i] = keep(i) ? bf16(x[i] * scale) : 0 with keep = cpu/rng.rs dropout_keep(stream, i, p).
struct DropoutBf16Params {
    bf16_ptr out;
    cbf16_ptr x;
    int64_t n;
    uint64_t stream;       // rng::dropout_stream(seed, step, call)
    float p;
    float scale;           // 1 / (1 - p), computed on the host in f32
};

// out[r, :] = x[rows[r], :]; rows[r] >= n_src gives a zero row.
struct GatherRowsParams {
    bf16_ptr out;          // [n_rows, cols]
    cbf16_ptr x;           // [n_src, cols]
    cu32_ptr rows;         // [n_rows]
    int32_t n_rows;
    int32_t cols;
    int32_t n_src;
    int32_t _pad;
};

// dst[rows[r], :] += src[r, :] (bf16 result); rows distinct, rows[r] >= n_dst skipped.
struct ScatterAddRowsParams {
    bf16_ptr dst;          // [n_dst, cols]
    cbf16_ptr src;         // [n_rows, cols]
    cu32_ptr rows;         // [n_rows]
    int32_t n_rows;
    int32_t cols;
    int32_t n_dst;
    int32_t _pad;
};

// dst[dst_rows[r], :] = src[src_rows[r], :]; out-of-range pairs skipped.
struct CopyRowsParams {
    bf16_ptr dst;          // [n_dst, cols]
    cbf16_ptr src;         // [n_src, cols]
    cu32_ptr dst_rows;     // [n_rows]
    cu32_ptr src_rows;     // [n_rows]
    int32_t n_rows;
    int32_t cols;
    int32_t n_dst;
    int32_t n_src;
};

/* ---- nf4.cu: LoRA slab (nf4_gemm_fwd_lora, nf4_gemm_bwd_lora) ---- */
// base's GEMM plus `rank` more reduction steps, all into one f32 accumulator:
//   fwd: out[M, rows] = a·bf16(W)ᵀ + left[M, rank] · right[rows, rank]ᵀ   (right = B)
//   bwd: out[M, cols] = a·bf16(W)  + left[M, rank] · right[rank, cols]    (right = A)
// left carries the LoRA scale (s·drop(X)·Aᵀ fwd, s·dY·B bwd); rank % 16 == 0.
struct Nf4GemmLoraParams {
    struct Nf4GemmParams base;
    cbf16_ptr left;
    cbf16_ptr right;
    int32_t rank;
    int32_t _pad;
};

/* ---- logprob.cu ---- */
// One chunk of rows: lse and logp = X_i·W_t − lse from bf16 logits [rows, vocab].
// Every pointer starts at the chunk's first row.
struct LogsoftmaxGatherParams {
    f32_ptr logp;          // [rows]
    f32_ptr lse;           // [rows], natural log
    cbf16_ptr logits;      // [rows, vocab]
    cbf16_ptr x;           // [rows, hidden]: the hidden states
    cbf16_ptr head;        // [vocab, hidden]: lm_head
    cu32_ptr targets;      // [rows]; ids >= vocab give logp = NaN
    int32_t rows;
    int32_t vocab;
    int32_t hidden;
    int32_t _pad;
};

// logits (in place) = dlogp_i · (onehot(t_i) − exp(logits − lse_i)), bf16.
struct LogsoftmaxBackwardParams {
    bf16_ptr logits;       // [rows, vocab]
    cu32_ptr targets;      // [rows]
    cf32_ptr dlogp;        // [rows]
    cf32_ptr lse;          // [rows], or 0: recomputed from the logits
    int32_t rows;
    int32_t vocab;
};

// Greedy decoding's token: out[r] = the lowest index of the largest value of
// logits[r, :] (a NaN above any number), as torch.argmax and ops::argmax pick it.
struct ArgmaxRowsParams {
    u32_ptr out;           // [rows]
    cbf16_ptr logits;      // [rows, cols]
    int32_t rows;
    int32_t cols;
};

// out[r, :] = bf16(scale[r] · x[r, :]) (out may be x): d_hidden from the per-row
// gradient the training forward saved, times dlogp.
struct ScaleRowsParams {
    bf16_ptr out;          // [rows, cols]
    cbf16_ptr x;           // [rows, cols]
    cf32_ptr scale;        // [rows]
    int32_t rows;
    int32_t cols;
};

// Fused lm_head + log-softmax + gather (logprob_fused_fwd_bf16, then _combine).
struct LogprobFusedParams {
    f32_ptr logp;          // [rows] (combine)
    f32_ptr lse;           // [rows] (combine)
    f32_ptr part;          // [rows, n_splits, 2]: (max·log2 e, Σ 2^(x − max)) per split
    f32_ptr tgt;           // [rows]: the target logits
    cbf16_ptr hidden;      // [rows, hidden]
    cbf16_ptr head;        // [vocab, hidden]
    cu32_ptr targets;      // [rows]
    int32_t rows;
    int32_t vocab;
    int32_t hidden_size;   // a multiple of 8
    int32_t n_splits;
    int32_t tiles_per_split; // vocab tiles of 128 per split
    int32_t _pad;
};

// out[s] = Σ logp[offsets[s] .. offsets[s+1]] (÷ the count when mean != 0).
struct SeqLogpSumParams {
    f32_ptr out;           // [n_seqs]
    cf32_ptr logp;         // [n_tokens]
    cu32_ptr offsets;      // [n_seqs + 1], clamped to n_tokens
    int32_t n_seqs;
    int32_t n_tokens;
    int32_t mean;
    int32_t _pad;
};

// DPO per pair k (sequences 2k chosen, 2k+1 rejected), see dpo_loss_f32.
struct DpoLossParams {
    f32_ptr loss;            // [n_pairs]
    f32_ptr reward_chosen;   // [n_pairs]: beta·(πc − rc)
    f32_ptr reward_rejected; // [n_pairs]: beta·(πr − rr)
    f32_ptr d_policy;        // [2 n_pairs]: ∂loss/∂π ÷ norm
    f32_ptr dlogp;           // [n_tokens]: written for the tokens of every sequence
    cf32_ptr policy;         // [2 n_pairs]
    cf32_ptr reference;      // [2 n_pairs]
    cu32_ptr offsets;        // [2 n_pairs + 1], clamped to n_tokens
    double beta;
    double label_smoothing;
    double norm;             // the loss denominator (pairs in the step)
    int32_t n_pairs;
    int32_t n_tokens;
    int32_t ipo;             // 0: sigmoid, 1: IPO
    int32_t _pad;
};

/* ---- lora_drop.cu: LoRA factors with dropout, up to 3 heads sharing one X ---- */
// One head: keep(e) = rng::dropout_keep(stream, e, p) as hi32(mix) >= thresh.
struct LoraDropHeadParams {
    cbf16_ptr a;           // A [rank, k]: lora_down, lora_dx_acc
    cbf16_ptr dyb;         // [m, rank]: lora_grad_a, lora_dx_acc
    bf16_ptr xa;           // [m, rank] out: lora_down
    f32_ptr grad;          // [rank, k] (+=): lora_grad_a
    uint64_t stream;       // rng::dropout_stream(seed, step, call)
    int32_t rank;          // a multiple of 8, 8..=128
    uint32_t thresh;       // ceil(p·2^24) << 8; 0: no dropout (p = 0)
    float scale;           // 1 / (1 - p) in f32
    float coef;            // lora_dx_acc: alpha · scale
};

// xa_i = bf16(drop_i(x)·A_iᵀ); grad_i += alpha·dyb_iᵀ·drop_i(x); dx = bf16(dx + Σ coef_i·mask_i∘(dyb_i·A_i)).
struct LoraDropParams {
    struct LoraDropHeadParams head[3];
    cbf16_ptr x;           // [m, k]: lora_down, lora_grad_a
    bf16_ptr dx;           // [m, k], in place: lora_dx_acc
    f32_ptr partial;       // lora_grad_a: [splits][Σ rank][k], or 0: add into grad directly
    int32_t m;
    int32_t k;             // a multiple of 8
    int32_t n_heads;       // 1..=3
    int32_t row_warps;     // lora_down: warps along rows per block (2 or 4)
    int32_t rows_per_split; // lora_grad_a, lora_dx_acc: rows per blockIdx.y
    int32_t splits;        // lora_grad_a(_finish): gridDim.y
    float alpha;           // lora_grad_a
    int32_t _pad;
};

/* ---- lora_drop.cu: lora_up_backward, dyb = dY·B and dB += alpha·dYᵀ·xa in one pass ---- */
struct LoraUpParams {
    cbf16_ptr dy;          // [m, n]
    cbf16_ptr b;           // B [n, rank]
    cbf16_ptr xa;          // [m, rank] (saved in forward)
    bf16_ptr dyb;          // [m, rank] out (written by the finish kernel)
    f32_ptr grad_b;        // dB [n, rank] (+=)
    f32_ptr dyb_partial;   // [col_blocks][m][rank]: per 128-column block partial dY·B
    f32_ptr db_partial;    // [splits][n][rank], or 0: add into grad_b directly
    int32_t m;
    int32_t n;             // a multiple of 8
    int32_t rank;          // a multiple of 8, 8..=128
    int32_t rows_per_split; // rows per blockIdx.y (a multiple of 32)
    int32_t splits;        // gridDim.y of the main kernel
    int32_t col_blocks;    // gridDim.x of the main kernel: ceil(n / 128)
    float alpha;
    int32_t _pad;
};
