//! Target-token log-probabilities through the lm_head on the GPU (kernels/logprob.cu),
//! and the per-sequence sums and DPO loss that consume them.
//!
//! `logp_i = log softmax(hidden_i · headᵀ)[targets_i]` for bf16 `hidden [rows, H]` and
//! `head [V, H]`, f32 `logp` and `lse` (the row's natural log-sum-exp). Same semantics as
//! `ops::target_logprobs{,_backward}` on the CPU (`backend::cpu::ops::log_softmax_rows_at`
//! and its backward), which the parity tests in tests/gpu_logprob.rs compare against.
//! Two paths:
//! - [`LogprobPath::Chunked`]: rows in chunks of [`default_chunk_rows`] (logits of a chunk
//!   ≤ [`CHUNK_LOGIT_BYTES`]); per chunk cuBLAS writes bf16 logits and one kernel takes
//!   lse and the target logit (the latter in f32 from `hidden_i · head_t`). Backward
//!   recomputes the chunk's logits, turns them into `dlogp·(onehot − softmax)` in place
//!   (recomputing lse) and cuBLAS multiplies by the head.
//! - [`LogprobPath::Fused`]: one tensor-core kernel folds each logits tile into running
//!   (max, sum) per row and never writes logits; a small kernel merges the vocab splits.
//!   Backward is the chunked one with the forward's saved lse (one pass per chunk).
//!   Needs `hidden_size % 8 == 0`; other sizes run the chunked forward.
//!
//! Target ids must be `< vocab` (the caller's job; an id past it gives `logp = NaN`).
//! Workspaces come from the device's caching pool. cuBLAS takes whole buffers, so chunks
//! after the first copy their hidden rows into (and their d_hidden rows out of) a
//! `[chunk, H]` staging buffer; the copies are ~1% of the GEMMs' time.

use cudarc::driver::{result as cu, DeviceRepr};
use half::bf16;

use super::blas::{gemm_bf16, Gemm};
use super::device::cuda_err;
use super::launch::elems;
use super::params::*;
use super::{DeviceBuffer, Gpu};
use crate::error::{bad, Error, Result};
use crate::train::loss::{DpoCfg, DpoKind};

// SAFETY: bindgen's #[repr(C)] translations of kernels/params.h (bytemuck::Pod is
// derived, which proves there is no padding); each is its kernel's only argument.
unsafe impl DeviceRepr for LogsoftmaxGatherParams {}
unsafe impl DeviceRepr for LogsoftmaxBackwardParams {}
unsafe impl DeviceRepr for LogprobFusedParams {}
unsafe impl DeviceRepr for SeqLogpSumParams {}
unsafe impl DeviceRepr for DpoLossParams {}
unsafe impl DeviceRepr for ScaleRowsParams {}
unsafe impl DeviceRepr for ArgmaxRowsParams {}

/// Which kernels compute the log-probs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogprobPath {
    Chunked,
    Fused,
}

/// Largest bf16 logits chunk the chunked path (and the fused backward) materializes.
/// 32 MiB keeps the extra memory ≥ 10× under a full `[8192, 32000]` bf16 logits tensor
/// while a chunk (512 rows at V = 32000) still fills the GPU in each cuBLAS call.
pub const CHUNK_LOGIT_BYTES: usize = 32 << 20;

// Fused kernel tiles: keep in sync with FBM/FBN/FUSED_SMEM in kernels/logprob.cu.
const FUSED_BM: usize = 128;
const FUSED_BN: usize = 128;
const FUSED_THREADS: u32 = 256;
const FUSED_SMEM: usize = 82432;
/// Blocks the split count aims for, per SM: about 8 waves at 2 blocks per SM, so the
/// last wave's idle tail costs a few percent.
const FUSED_BLOCKS_PER_SM: usize = 16;
/// Threads of the one-block-per-row kernels (a multiple of 32, as the reductions need).
const ROW_THREADS: u32 = 256;
const DPO_THREADS: u32 = 128;

/// Rows per chunk for a vocabulary of `vocab`: logits ≤ [`CHUNK_LOGIT_BYTES`], a multiple
/// of 64 rows when that is at least 64, never 0.
pub fn default_chunk_rows(vocab: usize) -> usize {
    let r = CHUNK_LOGIT_BYTES / (vocab.max(1) * 2);
    if r >= 64 {
        r / 64 * 64
    } else {
        r.max(1)
    }
}

/// (vocab tiles per split, splits) of the fused forward: enough blocks to fill the GPU
/// (`row_tiles × splits ≈ 16 × SMs`), every split holding at least one tile.
pub fn fused_splits(row_tiles: usize, vocab_tiles: usize, sm_count: usize) -> (usize, usize) {
    let vocab_tiles = vocab_tiles.max(1);
    let want = (FUSED_BLOCKS_PER_SM * sm_count.max(1)).div_ceil(row_tiles.max(1));
    let per_split = vocab_tiles.div_ceil(want.clamp(1, vocab_tiles));
    (per_split, vocab_tiles.div_ceil(per_split))
}

/// The shape of one call, validated against the buffers.
#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    vocab: usize,
    h: usize,
}

fn need<T: bytemuck::Pod>(buf: &DeviceBuffer<T>, n: usize, what: &str) -> Result<()> {
    super::launch::need(buf, n, &format!("logprob {what}"))
}

fn to_i32(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| bad(format!("logprob: {what} = {x} exceeds the kernels' i32")))
}

fn dims(
    hidden: &DeviceBuffer<bf16>,
    rows: usize,
    head: &DeviceBuffer<bf16>,
    vocab: usize,
    h: usize,
    targets: &DeviceBuffer<u32>,
) -> Result<Dims> {
    if vocab == 0 || h == 0 {
        return Err(bad(format!(
            "logprob: vocab ({vocab}) and hidden size ({h}) must be positive"
        )));
    }
    to_i32(rows, "rows")?;
    to_i32(vocab, "vocab")?;
    to_i32(h, "hidden size")?;
    let total = |a: usize, b: usize, what: &str| {
        a.checked_mul(b)
            .ok_or_else(|| bad(format!("logprob: {what} {a} x {b} overflows")))
    };
    need(hidden, total(rows, h, "hidden")?, "hidden")?;
    need(head, total(vocab, h, "lm_head")?, "lm_head")?;
    need(targets, rows, "targets")?;
    Ok(Dims { rows, vocab, h })
}

/// Log-probs of `targets` (f32 `logp [rows]`) and the rows' log-sum-exp (`lse [rows]`,
/// saved for the backward) under `softmax(hidden · headᵀ)`; `hidden [rows, hidden_size]`,
/// `head [vocab, hidden_size]`. Target ids must be `< vocab` (not checked here).
#[allow(clippy::too_many_arguments)]
pub fn target_logprobs(
    gpu: &Gpu,
    hidden: &DeviceBuffer<bf16>,
    rows: usize,
    head: &DeviceBuffer<bf16>,
    vocab: usize,
    hidden_size: usize,
    targets: &DeviceBuffer<u32>,
    logp: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
    path: LogprobPath,
) -> Result<()> {
    let chunk = default_chunk_rows(vocab);
    target_logprobs_with(
        gpu,
        hidden,
        rows,
        head,
        vocab,
        hidden_size,
        targets,
        logp,
        lse,
        path,
        chunk,
    )
}

/// [`target_logprobs`] with the chunk size chosen (rows per cuBLAS call of the chunked
/// path; tests use small chunks to cross chunk boundaries, the bench `rows` for the
/// unfused baseline).
#[allow(clippy::too_many_arguments)]
pub fn target_logprobs_with(
    gpu: &Gpu,
    hidden: &DeviceBuffer<bf16>,
    rows: usize,
    head: &DeviceBuffer<bf16>,
    vocab: usize,
    hidden_size: usize,
    targets: &DeviceBuffer<u32>,
    logp: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
    path: LogprobPath,
    chunk_rows: usize,
) -> Result<()> {
    let d = dims(hidden, rows, head, vocab, hidden_size, targets)?;
    need(logp, rows, "logp")?;
    need(lse, rows, "lse")?;
    if chunk_rows == 0 {
        return Err(bad("logprob: chunk_rows must be at least 1"));
    }
    if rows == 0 {
        return Ok(());
    }
    match path {
        LogprobPath::Fused if hidden_size.is_multiple_of(8) => {
            forward_fused(gpu, hidden, d, head, targets, logp, lse)
        }
        _ => forward_chunked(gpu, hidden, d, head, targets, logp, lse, chunk_rows),
    }
}

/// `∂L/∂hidden` (bf16 `d_hidden [rows, hidden_size]`, overwritten) from
/// `dlogp = ∂L/∂logp`: `(dlogp_i · (onehot(t_i) − softmax_i)) · head`. `lse` is the
/// forward's: read by [`LogprobPath::Fused`] (one pass per chunk), ignored by
/// [`LogprobPath::Chunked`] (which recomputes it).
#[allow(clippy::too_many_arguments)]
pub fn target_logprobs_backward(
    gpu: &Gpu,
    hidden: &DeviceBuffer<bf16>,
    rows: usize,
    head: &DeviceBuffer<bf16>,
    vocab: usize,
    hidden_size: usize,
    targets: &DeviceBuffer<u32>,
    lse: &DeviceBuffer<f32>,
    dlogp: &DeviceBuffer<f32>,
    d_hidden: &mut DeviceBuffer<bf16>,
    path: LogprobPath,
) -> Result<()> {
    let chunk = default_chunk_rows(vocab);
    target_logprobs_backward_with(
        gpu,
        hidden,
        rows,
        head,
        vocab,
        hidden_size,
        targets,
        lse,
        dlogp,
        d_hidden,
        path,
        chunk,
    )
}

/// [`target_logprobs_backward`] with the chunk size chosen.
#[allow(clippy::too_many_arguments)]
pub fn target_logprobs_backward_with(
    gpu: &Gpu,
    hidden: &DeviceBuffer<bf16>,
    rows: usize,
    head: &DeviceBuffer<bf16>,
    vocab: usize,
    hidden_size: usize,
    targets: &DeviceBuffer<u32>,
    lse: &DeviceBuffer<f32>,
    dlogp: &DeviceBuffer<f32>,
    d_hidden: &mut DeviceBuffer<bf16>,
    path: LogprobPath,
    chunk_rows: usize,
) -> Result<()> {
    let d = dims(hidden, rows, head, vocab, hidden_size, targets)?;
    need(dlogp, rows, "dlogp")?;
    need(d_hidden, rows * hidden_size, "d_hidden")?;
    let saved = match path {
        LogprobPath::Fused => {
            need(lse, rows, "lse")?;
            Some(lse)
        }
        LogprobPath::Chunked => None,
    };
    if chunk_rows == 0 {
        return Err(bad("logprob: chunk_rows must be at least 1"));
    }
    if rows == 0 {
        return Ok(());
    }
    backward_chunked(
        gpu, hidden, d, head, targets, saved, dlogp, d_hidden, chunk_rows,
    )
}

/// The training forward's variant of [`target_logprobs`]: also writes, per row, the
/// gradient of its own log-prob, `grad_i = ∂logp_i/∂hidden_i = (onehot(t_i) − softmax_i)
/// · head` (bf16 `[rows, hidden_size]`). The backward then is `d_hidden_i = dlogp_i ·
/// grad_i` ([`scale_rows`]): two logits-sized GEMMs per training step instead of three
/// (the chunked backward recomputes the logits), for `[rows, H]` saved in place of the
/// hidden rows. Chunked; per chunk: logits GEMM, gather, the backward kernel with g = 1
/// and the fresh lse, the product with the head.
#[allow(clippy::too_many_arguments)]
pub fn target_logprobs_and_grad(
    gpu: &Gpu,
    hidden: &DeviceBuffer<bf16>,
    rows: usize,
    head: &DeviceBuffer<bf16>,
    vocab: usize,
    hidden_size: usize,
    targets: &DeviceBuffer<u32>,
    logp: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
    grad: &mut DeviceBuffer<bf16>,
    chunk_rows: usize,
) -> Result<()> {
    let d = dims(hidden, rows, head, vocab, hidden_size, targets)?;
    need(logp, rows, "logp")?;
    need(lse, rows, "lse")?;
    need(grad, rows * hidden_size, "logprob grad")?;
    if chunk_rows == 0 {
        return Err(bad("logprob: chunk_rows must be at least 1"));
    }
    if rows == 0 {
        return Ok(());
    }
    let mut ch = Chunks::new(gpu, d, chunk_rows)?;
    let ones = gpu.upload(&vec![1.0f32; ch.rows])?;
    for r0 in (0..d.rows).step_by(ch.rows) {
        let n = ch.logits_of(gpu, hidden, head, r0)?;
        ch.gather(gpu, hidden, head, targets, logp, lse, r0, n)?;
        ch.make_dlogits(gpu, targets, ones.ptr(), lse.ptr_at(r0), r0, n)?;
        ch.rows_from_dlogits(gpu, head, grad, r0, n)?;
    }
    Ok(())
}

/// `out[r, :] = bf16(scale[r] · x[r, :])` for `x`, `out` `[rows, cols]`.
pub fn scale_rows(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    scale: &DeviceBuffer<f32>,
    rows: usize,
    cols: usize,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let n = elems(rows, cols, "scale_rows")?;
    need(x, n, "scale_rows input")?;
    need(out, n, "scale_rows output")?;
    need(scale, rows, "scale_rows scales")?;
    if n == 0 {
        return Ok(());
    }
    let p = ScaleRowsParams {
        out: out.ptr(),
        x: x.ptr(),
        scale: scale.ptr(),
        rows: to_i32(rows, "rows")?,
        cols: to_i32(cols, "cols")?,
    };
    gpu.launch("scale_rows_bf16", rows.min(65535) as u32, ROW_THREADS, &p)
}

/// `out[r]` = the lowest index of the largest value of `logits [rows, cols]` row r (a NaN
/// above any number, as `torch.argmax`): greedy decoding's tokens, without copying the
/// logits to the host.
pub fn argmax_rows(
    gpu: &Gpu,
    logits: &DeviceBuffer<bf16>,
    rows: usize,
    cols: usize,
    out: &mut DeviceBuffer<u32>,
) -> Result<()> {
    let n = elems(rows, cols, "argmax_rows")?;
    need(logits, n, "argmax_rows logits")?;
    need(out, rows, "argmax_rows output")?;
    if rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        return Err(bad("argmax_rows: rows of no values"));
    }
    let p = ArgmaxRowsParams {
        out: out.ptr(),
        logits: logits.ptr(),
        rows: to_i32(rows, "rows")?,
        cols: to_i32(cols, "cols")?,
    };
    gpu.launch("argmax_rows_bf16", rows.min(65535) as u32, ROW_THREADS, &p)
}

/// `bytes` from device address `src` to `dst` on the stream (callers check the ranges).
fn copy_d2d(gpu: &Gpu, dst: u64, src: u64, bytes: usize) -> Result<()> {
    gpu.context()
        .bind_to_thread()
        .map_err(cuda_err("bind context"))?;
    // SAFETY: both ranges lie inside live buffers (checked by the callers); the copy is
    // ordered on the one stream with the kernels that use them.
    unsafe { cu::memcpy_dtod_async(dst, src, bytes, gpu.stream().cu_stream()) }
        .map_err(cuda_err("cuMemcpyDtoDAsync"))
}

fn no_stage() -> Error {
    Error::Cuda("logprob: internal error, no staging buffer".into())
}

/// The workspace of the chunked paths: one chunk's bf16 logits `[rows, V]`, and a
/// `[rows, H]` staging buffer (when there is more than one chunk: cuBLAS takes whole
/// buffers) that holds a chunk's hidden rows for the logits GEMM and then its output
/// rows from the second GEMM, after the first is done.
struct Chunks {
    d: Dims,
    rows: usize,
    logits: DeviceBuffer<bf16>,
    stage: Option<DeviceBuffer<bf16>>,
}

impl Chunks {
    fn new(gpu: &Gpu, d: Dims, chunk_rows: usize) -> Result<Chunks> {
        let rows = chunk_rows.min(d.rows);
        let stage = if d.rows > rows {
            Some(gpu.alloc::<bf16>(rows * d.h)?)
        } else {
            None
        };
        Ok(Chunks {
            d,
            rows,
            logits: gpu.alloc::<bf16>(rows * d.vocab)?,
            stage,
        })
    }

    /// Logits of the chunk starting at row `r0`; returns its row count.
    fn logits_of(
        &mut self,
        gpu: &Gpu,
        hidden: &DeviceBuffer<bf16>,
        head: &DeviceBuffer<bf16>,
        r0: usize,
    ) -> Result<usize> {
        let Chunks {
            d,
            rows,
            logits,
            stage,
        } = self;
        let n = (*rows).min(d.rows - r0);
        let x = if r0 == 0 {
            hidden
        } else {
            let s = stage.as_mut().ok_or_else(no_stage)?;
            copy_d2d(gpu, s.ptr(), hidden.ptr_at(r0 * d.h), n * d.h * 2)?;
            &*s
        };
        gemm_bf16(gpu, Gemm::linear(n, d.vocab, d.h), x, head, logits)?;
        Ok(n)
    }

    /// lse and logp of the chunk's rows (the target logit in f32 from `hidden`).
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        gpu: &Gpu,
        hidden: &DeviceBuffer<bf16>,
        head: &DeviceBuffer<bf16>,
        targets: &DeviceBuffer<u32>,
        logp: &mut DeviceBuffer<f32>,
        lse: &mut DeviceBuffer<f32>,
        r0: usize,
        n: usize,
    ) -> Result<()> {
        let p = LogsoftmaxGatherParams {
            logp: logp.ptr_at(r0),
            lse: lse.ptr_at(r0),
            logits: self.logits.ptr(),
            x: hidden.ptr_at(r0 * self.d.h),
            head: head.ptr(),
            targets: targets.ptr_at(r0),
            rows: n as i32,
            vocab: self.d.vocab as i32,
            hidden: self.d.h as i32,
            _pad: 0,
        };
        gpu.launch("logsoftmax_gather_bf16", n as u32, ROW_THREADS, &p)
    }

    /// The chunk's logits, in place, into `dlogp_i · (onehot − softmax_i)`; `dlogp` and
    /// `lse` are device addresses of the chunk's first row (`lse` 0: recomputed).
    fn make_dlogits(
        &mut self,
        gpu: &Gpu,
        targets: &DeviceBuffer<u32>,
        dlogp: u64,
        lse: u64,
        r0: usize,
        n: usize,
    ) -> Result<()> {
        let p = LogsoftmaxBackwardParams {
            logits: self.logits.ptr(),
            targets: targets.ptr_at(r0),
            dlogp,
            lse,
            rows: n as i32,
            vocab: self.d.vocab as i32,
        };
        gpu.launch("logsoftmax_backward_bf16", n as u32, ROW_THREADS, &p)
    }

    /// `out` rows `r0 .. r0 + n` = dlogits · head (a plain, not transposed, product).
    fn rows_from_dlogits(
        &mut self,
        gpu: &Gpu,
        head: &DeviceBuffer<bf16>,
        out: &mut DeviceBuffer<bf16>,
        r0: usize,
        n: usize,
    ) -> Result<()> {
        let d = self.d;
        let back = Gemm {
            m: n,
            n: d.h,
            k: d.vocab,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        };
        if r0 == 0 {
            return gemm_bf16(gpu, back, &self.logits, head, out);
        }
        let s = self.stage.as_mut().ok_or_else(no_stage)?;
        gemm_bf16(gpu, back, &self.logits, head, s)?;
        copy_d2d(gpu, out.ptr_at(r0 * d.h), s.ptr(), n * d.h * 2)
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_chunked(
    gpu: &Gpu,
    hidden: &DeviceBuffer<bf16>,
    d: Dims,
    head: &DeviceBuffer<bf16>,
    targets: &DeviceBuffer<u32>,
    logp: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
    chunk_rows: usize,
) -> Result<()> {
    let mut ch = Chunks::new(gpu, d, chunk_rows)?;
    for r0 in (0..d.rows).step_by(ch.rows) {
        let n = ch.logits_of(gpu, hidden, head, r0)?;
        ch.gather(gpu, hidden, head, targets, logp, lse, r0, n)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn backward_chunked(
    gpu: &Gpu,
    hidden: &DeviceBuffer<bf16>,
    d: Dims,
    head: &DeviceBuffer<bf16>,
    targets: &DeviceBuffer<u32>,
    lse: Option<&DeviceBuffer<f32>>,
    dlogp: &DeviceBuffer<f32>,
    d_hidden: &mut DeviceBuffer<bf16>,
    chunk_rows: usize,
) -> Result<()> {
    let mut ch = Chunks::new(gpu, d, chunk_rows)?;
    for r0 in (0..d.rows).step_by(ch.rows) {
        let n = ch.logits_of(gpu, hidden, head, r0)?;
        let lse_at = lse.map_or(0, |l| l.ptr_at(r0));
        ch.make_dlogits(gpu, targets, dlogp.ptr_at(r0), lse_at, r0, n)?;
        ch.rows_from_dlogits(gpu, head, d_hidden, r0, n)?;
    }
    Ok(())
}

fn forward_fused(
    gpu: &Gpu,
    hidden: &DeviceBuffer<bf16>,
    d: Dims,
    head: &DeviceBuffer<bf16>,
    targets: &DeviceBuffer<u32>,
    logp: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let row_tiles = d.rows.div_ceil(FUSED_BM);
    let vocab_tiles = d.vocab.div_ceil(FUSED_BN);
    let (per_split, n_splits) = fused_splits(row_tiles, vocab_tiles, gpu.sm_count() as usize);
    let blocks = u32::try_from(row_tiles * n_splits)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| bad("logprob: too many row tiles for one launch"))?;
    let part = gpu.alloc::<f32>(d.rows * n_splits * 2)?;
    let tgt = gpu.alloc::<f32>(d.rows)?;
    let p = LogprobFusedParams {
        logp: logp.ptr(),
        lse: lse.ptr(),
        part: part.ptr(),
        tgt: tgt.ptr(),
        hidden: hidden.ptr(),
        head: head.ptr(),
        targets: targets.ptr(),
        rows: d.rows as i32,
        vocab: d.vocab as i32,
        hidden_size: d.h as i32,
        n_splits: n_splits as i32,
        tiles_per_split: per_split as i32,
        _pad: 0,
    };
    launch_fused(gpu, blocks, &p)?;
    let grid = d.rows.div_ceil(256) as u32;
    gpu.launch("logprob_fused_combine", grid, 256, &p)?;
    // The workspaces go back to the pool; the stream orders their next use after ours.
    drop((part, tgt));
    Ok(())
}

fn launch_fused(gpu: &Gpu, blocks: u32, p: &LogprobFusedParams) -> Result<()> {
    const NAME: &str = "logprob_fused_fwd_bf16";
    gpu.function(NAME)?; // a missing kernel is named before any shared-memory opt-in
    gpu.opt_in_smem(NAME, FUSED_SMEM)?;
    // forward_fused sized the buffers behind p's pointers.
    gpu.launch_grid(NAME, (blocks, 1, 1), FUSED_THREADS, FUSED_SMEM as u32, p)
}

/// One chunk's kernel on its own (the bench's unfused baseline runs it over all rows):
/// `logits [rows, vocab]` bf16 from `hidden · headᵀ` → `lse`, and `logp` with the target
/// logit taken in f32 from `hidden` and `head`.
#[allow(clippy::too_many_arguments)]
pub fn logsoftmax_gather(
    gpu: &Gpu,
    logits: &DeviceBuffer<bf16>,
    rows: usize,
    vocab: usize,
    hidden_size: usize,
    hidden: &DeviceBuffer<bf16>,
    head: &DeviceBuffer<bf16>,
    targets: &DeviceBuffer<u32>,
    logp: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let d = dims(hidden, rows, head, vocab, hidden_size, targets)?;
    need(logits, rows * vocab, "logits")?;
    need(logp, rows, "logp")?;
    need(lse, rows, "lse")?;
    let p = LogsoftmaxGatherParams {
        logp: logp.ptr(),
        lse: lse.ptr(),
        logits: logits.ptr(),
        x: hidden.ptr(),
        head: head.ptr(),
        targets: targets.ptr(),
        rows: d.rows as i32,
        vocab: d.vocab as i32,
        hidden: d.h as i32,
        _pad: 0,
    };
    gpu.launch("logsoftmax_gather_bf16", rows as u32, ROW_THREADS, &p)
}

/// In place: `logits [rows, vocab]` → `dlogp_i · (onehot(t_i) − exp(logits − lse_i))`
/// (bf16), with `lse` given or recomputed from the logits.
pub fn logsoftmax_backward(
    gpu: &Gpu,
    logits: &mut DeviceBuffer<bf16>,
    rows: usize,
    vocab: usize,
    targets: &DeviceBuffer<u32>,
    dlogp: &DeviceBuffer<f32>,
    lse: Option<&DeviceBuffer<f32>>,
) -> Result<()> {
    to_i32(rows, "rows")?;
    to_i32(vocab, "vocab")?;
    need(logits, rows * vocab, "logits")?;
    need(targets, rows, "targets")?;
    need(dlogp, rows, "dlogp")?;
    if let Some(l) = lse {
        need(l, rows, "lse")?;
    }
    let p = LogsoftmaxBackwardParams {
        logits: logits.ptr(),
        targets: targets.ptr(),
        dlogp: dlogp.ptr(),
        lse: lse.map_or(0, |l| l.ptr()),
        rows: rows as i32,
        vocab: vocab as i32,
    };
    gpu.launch("logsoftmax_backward_bf16", rows as u32, ROW_THREADS, &p)
}

// ---------------------------------------------------------------- DPO

/// Number of sequences an offsets array `[n + 1]` describes.
fn n_segments(offsets: &DeviceBuffer<u32>) -> Result<usize> {
    match offsets.len() {
        0 => Err(bad("logprob: sequence offsets need at least one entry")),
        n => Ok(n - 1),
    }
}

/// `out[s] = Σ logp[offsets[s] .. offsets[s+1]]` in f64, stored f32; with `mean` divided
/// by the count (IPO's per-token means; an empty sequence gives 0). Offsets past
/// `logp.len()` are clamped; they must not decrease.
pub fn seq_logp_sums(
    gpu: &Gpu,
    logp: &DeviceBuffer<f32>,
    offsets: &DeviceBuffer<u32>,
    mean: bool,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = n_segments(offsets)?;
    need(out, n, "sequence sums")?;
    let p = SeqLogpSumParams {
        out: out.ptr(),
        logp: logp.ptr(),
        offsets: offsets.ptr(),
        n_seqs: to_i32(n, "sequences")?,
        n_tokens: to_i32(logp.len(), "tokens")?,
        mean: mean as i32,
        _pad: 0,
    };
    gpu.launch("seq_logp_sum_f32", n as u32, ROW_THREADS, &p)
}

/// What [`dpo_loss`] writes; every buffer is overwritten.
pub struct DpoOut<'a> {
    /// `[pairs]`: the pair's loss (not divided by `norm`).
    pub loss: &'a mut DeviceBuffer<f32>,
    /// `[pairs]`: `β·(πc − rc)`.
    pub reward_chosen: &'a mut DeviceBuffer<f32>,
    /// `[pairs]`: `β·(πr − rr)`.
    pub reward_rejected: &'a mut DeviceBuffer<f32>,
    /// `[2·pairs]`: `∂loss/∂π ÷ norm` for chosen, rejected of each pair.
    pub d_policy: &'a mut DeviceBuffer<f32>,
    /// `[tokens]`: `∂(Σ loss ÷ norm)/∂logp` per token; 0 outside every sequence.
    pub dlogp: &'a mut DeviceBuffer<f32>,
}

/// TRL's DPO loss per pair as `train::loss::dpo_pair` (f64 on the device), from the
/// sequence values `policy`/`reference` `[2·pairs]` (chosen, rejected of pair 0, then
/// pair 1, ...: sums for sigmoid, per-token means for IPO, as [`seq_logp_sums`] makes
/// them), and the gradient broadcast to the policy's tokens (`offsets [2·pairs + 1]` into
/// `out.dlogp`, the trainer's token order). `norm` is the loss denominator (the step's
/// pairs), so the gradients are those of the mean loss.
pub fn dpo_loss(
    gpu: &Gpu,
    cfg: &DpoCfg,
    norm: f64,
    policy: &DeviceBuffer<f32>,
    reference: &DeviceBuffer<f32>,
    offsets: &DeviceBuffer<u32>,
    out: DpoOut<'_>,
) -> Result<()> {
    let n_seqs = n_segments(offsets)?;
    if !n_seqs.is_multiple_of(2) {
        return Err(bad(format!(
            "dpo: {n_seqs} sequences are not (chosen, rejected) pairs"
        )));
    }
    if !(norm.is_finite() && norm > 0.0) {
        return Err(bad(format!(
            "dpo: the loss denominator must be > 0, got {norm}"
        )));
    }
    if !(cfg.beta.is_finite() && cfg.beta > 0.0) {
        return Err(bad(format!("dpo: beta must be > 0, got {}", cfg.beta)));
    }
    let pairs = n_seqs / 2;
    need(policy, n_seqs, "policy values")?;
    need(reference, n_seqs, "reference values")?;
    need(out.loss, pairs, "dpo loss")?;
    need(out.reward_chosen, pairs, "chosen rewards")?;
    need(out.reward_rejected, pairs, "rejected rewards")?;
    need(out.d_policy, n_seqs, "d_policy")?;
    let p = DpoLossParams {
        loss: out.loss.ptr(),
        reward_chosen: out.reward_chosen.ptr(),
        reward_rejected: out.reward_rejected.ptr(),
        d_policy: out.d_policy.ptr(),
        dlogp: out.dlogp.ptr(),
        policy: policy.ptr(),
        reference: reference.ptr(),
        offsets: offsets.ptr(),
        beta: cfg.beta,
        label_smoothing: cfg.label_smoothing,
        norm,
        n_pairs: to_i32(pairs, "pairs")?,
        n_tokens: to_i32(out.dlogp.len(), "tokens")?,
        ipo: (cfg.kind == DpoKind::Ipo) as i32,
        _pad: 0,
    };
    // Tokens outside every sequence get no gradient.
    gpu.memset_zero(out.dlogp)?;
    gpu.launch("dpo_loss_f32", pairs as u32, DPO_THREADS, &p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::log_softmax_at;

    #[test]
    fn chunk_rows_fit_the_budget() {
        assert_eq!(default_chunk_rows(32000), 512);
        assert_eq!(default_chunk_rows(1000), CHUNK_LOGIT_BYTES / 2000 / 64 * 64);
        for v in [1, 7, 1000, 32000, 128256, 1 << 24, 1 << 26] {
            let r = default_chunk_rows(v);
            assert!(r >= 1, "vocab {v}");
            assert!(
                r == 1 || r * v * 2 <= CHUNK_LOGIT_BYTES,
                "vocab {v}: {r} rows"
            );
        }
    }

    #[test]
    fn fused_splits_cover_the_vocab_without_empty_splits() {
        for rt in [1, 2, 17, 64, 1000] {
            for vt in [1, 2, 8, 250, 1002] {
                for sms in [1, 108, 132] {
                    let (per, n) = fused_splits(rt, vt, sms);
                    assert!(per >= 1 && n >= 1);
                    assert!(per * n >= vt, "{rt} {vt} {sms}: {per} x {n}");
                    assert!((n - 1) * per < vt, "{rt} {vt} {sms}: an empty split");
                }
            }
        }
        // 8192 tokens at V = 32000 on 132 SMs: ~2000 blocks of ~8 vocab tiles.
        let (per, n) = fused_splits(64, 250, 132);
        assert_eq!((per, n), (8, 32));
    }

    /// The fused kernel's math on the host: logits folded tile by tile into per-thread
    /// (max, sum) in base 2, merged over threads and splits, lse = (m + log2 s)·ln 2.
    fn fused_emulation(z: &[f32], tile: usize, per_split: usize) -> f32 {
        let merge = |(m, s): (f32, f32), (m2, s2): (f32, f32)| {
            let mn = m.max(m2);
            if mn == f32::NEG_INFINITY {
                (m, s)
            } else {
                (mn, s * (m - mn).exp2() + s2 * (m2 - mn).exp2())
            }
        };
        let splits: Vec<(f32, f32)> = z
            .chunks(tile * per_split)
            .map(|split| {
                // Two "threads" per tile, each its own running pair, merged at the end.
                let mut th = [(f32::NEG_INFINITY, 0.0f32); 2];
                for t in split.chunks(tile) {
                    for (k, half) in t.chunks(tile.div_ceil(2)).enumerate() {
                        let x: Vec<f32> =
                            half.iter().map(|v| v * std::f32::consts::LOG2_E).collect();
                        let mx = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let (m, s) = th[k];
                        let mn = m.max(mx);
                        th[k] = (
                            mn,
                            s * (m - mn).exp2() + x.iter().map(|v| (v - mn).exp2()).sum::<f32>(),
                        );
                    }
                }
                merge(th[0], th[1])
            })
            .collect();
        let (m, s) = splits.into_iter().fold((f32::NEG_INFINITY, 0.0), merge);
        (m + s.log2()) * std::f32::consts::LN_2
    }

    #[test]
    fn fused_fold_and_merge_give_the_log_sum_exp() {
        // Logits of mixed scale; compare lse − z_t with the CPU's log_softmax_at.
        let v = 1003;
        let z: Vec<f32> = (0..v)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 30.0)
            .collect();
        for (tile, per_split) in [(128, 1), (128, 3), (16, 5), (1003, 1)] {
            let lse = fused_emulation(&z, tile, per_split);
            for t in [0, 500, v - 1] {
                let want = log_softmax_at(&z, t);
                let got = z[t] - lse;
                assert!(
                    (got - want).abs() < 1e-4,
                    "tile {tile} x {per_split}: {got} vs {want}"
                );
            }
        }
    }
}
