//! The CUDA arm of `crate::ops`: the same ops on device tensors, each a thin wrapper
//! that allocates the output from the pool and calls one launcher (or cuBLAS).
//!
//! Storage: activations and frozen weights bf16, adapter gradients and per-row
//! statistics (rstd, attention and lm_head log-sum-exp) f32. Index lists (token ids,
//! rows, targets) come from the host and are uploaded per call; they are a few KiB.
//! Every op charges its GPU time to a kernel family (`profile`), for the breakdown of
//! `palign bench train`.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::OnceLock;

use half::bf16;

use super::attention::{
    self as attn, AttnGradInputs, AttnGrads, DecodeBatch, DecodeSpec, KvCacheView, SeqLayout,
};
use super::blas::{self, Gemm};
use super::lora::{self, LoraBase, LoraDev};
use super::lora_drop;
use super::nf4::{Nf4Dispatcher, Nf4Op, Out};
use super::{elementwise as ew, logprob, ops as k, profile, DeviceBuffer, Gpu};
use crate::error::{bad, Error, Result};
use crate::ops::{AttnShape, DpoLoss, DropMask, LinearWeight, Packing, Rope};
use crate::tensor::Tensor;
use crate::train::loss::DpoCfg;

/// Kernel families of the breakdown.
pub const GEMM: &str = "gemm (cuBLAS)";
pub const NF4: &str = "nf4 gemm";
pub const ATTENTION: &str = "attention";
pub const LOGPROB: &str = "lm_head log-prob";
pub const NORM: &str = "rmsnorm";
pub const ROPE: &str = "rope";
pub const SWIGLU: &str = "swiglu";
pub const ELEMENTWISE: &str = "elementwise";

fn gpu() -> Result<std::sync::Arc<Gpu>> {
    Gpu::get()
}

/// The process's NF4 dispatcher (its per-shape path cache is loaded once).
fn nf4() -> Result<&'static Nf4Dispatcher> {
    static D: OnceLock<Nf4Dispatcher> = OnceLock::new();
    if let Some(d) = D.get() {
        return Ok(d);
    }
    let d = Nf4Dispatcher::new(&*gpu()?)?;
    Ok(D.get_or_init(|| d))
}

/// Which lm_head log-prob path the device uses: `PALIGN_LOGPROB=fused|chunked`, default
/// chunked (cuBLAS logits per 32 MiB chunk + one kernel) until the GPU report shows the
/// fused tensor-core forward faster (benches/logprob.rs measures both).
fn logprob_path() -> logprob::LogprobPath {
    if crate::switches::LOGPROB_FUSED.get() {
        logprob::LogprobPath::Fused
    } else {
        logprob::LogprobPath::Chunked
    }
}

fn new_bf16(g: &Gpu, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::cuda_bf16(g.alloc(shape.iter().product())?, shape))
}

fn new_f32(g: &Gpu, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::cuda_f32(g.alloc(shape.iter().product())?, shape))
}

fn upload_u32(g: &Gpu, v: impl Iterator<Item = usize>, what: &str) -> Result<DeviceBuffer<u32>> {
    let h: Vec<u32> = v
        .map(|x| u32::try_from(x).map_err(|_| bad(format!("{what}: index {x} exceeds u32"))))
        .collect::<Result<_>>()?;
    g.upload(&h)
}

fn dense_bf16(w: &LinearWeight) -> Result<&DeviceBuffer<bf16>> {
    match w {
        LinearWeight::Dense(t) => t.bf16_buf(),
        _ => Err(Error::Cuda(
            "internal: expected a dense bf16 device weight".into(),
        )),
    }
}

pub fn linear(x: &Tensor, w: &LinearWeight) -> Result<Tensor> {
    let g = gpu()?;
    let (m, n, kk) = (x.rows(), w.out_features(), w.in_features());
    let mut y = new_bf16(&g, &[m, n])?;
    match w {
        LinearWeight::Nf4Cuda(q) => profile::scope(&g, NF4, || {
            nf4()?
                .matmul(
                    &g,
                    Nf4Op::Forward,
                    x.bf16_buf()?,
                    m,
                    q,
                    Out::Bf16(y.bf16_buf_mut()?),
                )
                .map(|_| ())
        })?,
        _ => profile::scope(&g, GEMM, || {
            blas::gemm_bf16(
                &g,
                Gemm::linear(m, n, kk),
                x.bf16_buf()?,
                dense_bf16(w)?,
                y.bf16_buf_mut()?,
            )
        })?,
    }
    Ok(y)
}

pub fn linear_backward(dy: &Tensor, w: &LinearWeight) -> Result<Tensor> {
    let g = gpu()?;
    let (m, kk) = (dy.rows(), w.in_features());
    let mut dx = new_bf16(&g, &[m, kk])?;
    match w {
        LinearWeight::Nf4Cuda(q) => profile::scope(&g, NF4, || {
            nf4()?
                .matmul(
                    &g,
                    Nf4Op::Backward,
                    dy.bf16_buf()?,
                    m,
                    q,
                    Out::Bf16(dx.bf16_buf_mut()?),
                )
                .map(|_| ())
        })?,
        _ => dense_backward(&g, dy, w, &mut dx, 0.0)?,
    }
    Ok(dx)
}

/// `dX = dY·W + beta·dX` for a dense bf16 weight: `[m, out] · [out, in]`, a plain (not
/// transposed) product.
fn dense_backward(
    g: &Gpu,
    dy: &Tensor,
    w: &LinearWeight,
    dx: &mut Tensor,
    beta: f32,
) -> Result<()> {
    let gm = Gemm {
        m: dy.rows(),
        n: w.in_features(),
        k: w.out_features(),
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        beta,
    };
    profile::scope(g, GEMM, || {
        blas::gemm_bf16(g, gm, dy.bf16_buf()?, dense_bf16(w)?, dx.bf16_buf_mut()?)
    })
}

/// `dx += dY·W`. Dense: cuBLAS with beta = 1. NF4: the dequant + cuBLAS path with
/// beta = 1 for training-sized products (the dispatcher's pick there on Hopper; the
/// fused kernels write without reading); decode-sized ones take a temporary and an add.
pub fn linear_backward_acc_(dx: &mut Tensor, dy: &Tensor, w: &LinearWeight) -> Result<()> {
    let g = gpu()?;
    let m = dy.rows();
    match w {
        LinearWeight::Nf4Cuda(q) if m > super::nf4::GEMV_MAX_M => profile::scope(&g, NF4, || {
            super::nf4::gemm_dequant_cublas_beta(
                &g,
                Nf4Op::Backward,
                dy.bf16_buf()?,
                m,
                q,
                dx.bf16_buf_mut()?,
                1.0,
            )
        }),
        LinearWeight::Nf4Cuda(_) => {
            let t = linear_backward(dy, w)?;
            axpy_(dx, 1.0, &t)
        }
        _ => dense_backward(&g, dy, w, dx, 1.0),
    }
}

/// `x · aᵀ` (`trans_b`) or `x · a`, both bf16.
fn gemm_shape(x: &Tensor, a: &Tensor, trans_b: bool, alpha: f32, beta: f32) -> Gemm {
    let (m, kk) = (x.rows(), x.cols());
    let n = if trans_b { a.rows() } else { a.cols() };
    Gemm {
        m,
        n,
        k: kk,
        trans_a: false,
        trans_b,
        alpha,
        beta,
    }
}

pub fn matmul_new(x: &Tensor, a: &Tensor, trans_b: bool) -> Result<Tensor> {
    let g = gpu()?;
    let gm = gemm_shape(x, a, trans_b, 1.0, 0.0);
    let mut y = new_bf16(&g, &[gm.m, gm.n])?;
    profile::scope(&g, GEMM, || {
        blas::gemm_bf16(&g, gm, x.bf16_buf()?, a.bf16_buf()?, y.bf16_buf_mut()?)
    })?;
    Ok(y)
}

/// `y += alpha · x · op(a)` in one GEMM (beta = 1).
pub fn matmul_acc(y: &mut Tensor, x: &Tensor, a: &Tensor, trans_b: bool, alpha: f32) -> Result<()> {
    let g = gpu()?;
    let gm = gemm_shape(x, a, trans_b, alpha, 1.0);
    profile::scope(&g, GEMM, || {
        blas::gemm_bf16(&g, gm, x.bf16_buf()?, a.bf16_buf()?, y.bf16_buf_mut()?)
    })
}

/// `grad (f32) += alpha · aᵀ · b` with bf16 `a` `[m, p]`, `b` `[m, q]`.
pub fn add_at_b_(grad: &mut Tensor, a: &Tensor, b: &Tensor, alpha: f32) -> Result<()> {
    let g = gpu()?;
    let gm = Gemm {
        m: a.cols(),
        n: b.cols(),
        k: a.rows(),
        trans_a: true,
        trans_b: false,
        alpha,
        beta: 1.0,
    };
    profile::scope(&g, GEMM, || {
        blas::gemm_bf16_f32out(&g, gm, a.bf16_buf()?, b.bf16_buf()?, grad.f32_buf_mut()?)
    })
}

pub fn axpy_(y: &mut Tensor, alpha: f32, x: &Tensor) -> Result<()> {
    let g = gpu()?;
    profile::scope(&g, ELEMENTWISE, || {
        if alpha == 1.0 {
            ew::add_bf16(&g, x.bf16_buf()?, y.bf16_buf_mut()?)
        } else {
            ew::axpy_bf16(&g, alpha, x.bf16_buf()?, y.bf16_buf_mut()?)
        }
    })
}

pub fn dropout(x: &Tensor, mask: DropMask) -> Result<Tensor> {
    let g = gpu()?;
    let mut out = new_bf16(&g, &x.shape)?;
    profile::scope(&g, ELEMENTWISE, || {
        ew::dropout_bf16(&g, x.bf16_buf()?, mask.stream, mask.p, out.bf16_buf_mut()?)
    })?;
    Ok(out)
}

pub fn zeros_like(like: &Tensor) -> Result<Tensor> {
    let g = gpu()?;
    Ok(match like.storage {
        crate::tensor::Storage::CudaF32(_) => Tensor::cuda_f32(g.zeros(like.numel())?, &like.shape),
        _ => Tensor::cuda_bf16(g.zeros(like.numel())?, &like.shape),
    })
}

pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let g = gpu()?;
    let h = table.cols();
    let ids_dev = g.upload(ids)?;
    let mut out = new_bf16(&g, &[ids.len(), h])?;
    profile::scope(&g, ELEMENTWISE, || {
        k::embedding_forward(&g, table.bf16_buf()?, h, &ids_dev, out.bf16_buf_mut()?)
    })?;
    Ok(out)
}

pub fn rmsnorm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let g = gpu()?;
    let rows = x.numel() / weight.numel().max(1);
    let mut y = new_bf16(&g, &x.shape)?;
    let mut rstd = new_f32(&g, &[rows])?;
    profile::scope(&g, NORM, || {
        k::rmsnorm_forward(
            &g,
            x.bf16_buf()?,
            weight.bf16_buf()?,
            eps,
            y.bf16_buf_mut()?,
            Some(rstd.f32_buf_mut()?),
        )
    })?;
    Ok((y, rstd))
}

pub fn rmsnorm_backward(dy: &Tensor, x: &Tensor, weight: &Tensor, rstd: &Tensor) -> Result<Tensor> {
    let g = gpu()?;
    let mut dx = new_bf16(&g, &x.shape)?;
    profile::scope(&g, NORM, || {
        k::rmsnorm_backward(
            &g,
            dy.bf16_buf()?,
            x.bf16_buf()?,
            weight.bf16_buf()?,
            rstd.f32_buf()?,
            dx.bf16_buf_mut()?,
            false,
        )
    })?;
    Ok(dx)
}

/// `dx += rmsnorm_backward(dy, ...)`: the kernel's accumulate mode (f32 sum, one
/// rounding), which sums the residual stream's gradient without an add pass.
pub fn rmsnorm_backward_acc_(
    dx: &mut Tensor,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    let g = gpu()?;
    profile::scope(&g, NORM, || {
        k::rmsnorm_backward(
            &g,
            dy.bf16_buf()?,
            x.bf16_buf()?,
            weight.bf16_buf()?,
            rstd.f32_buf()?,
            dx.bf16_buf_mut()?,
            true,
        )
    })
}

/// RoPE's device copies, kept in `ops::Rope`: the tables (for the whole run of a
/// generator) and the current positions (replaced each decode step).
#[derive(Default)]
pub struct RopeDev {
    tables: OnceLock<k::RopeTables>,
    positions: OnceLock<DeviceBuffer<u32>>,
}

impl std::fmt::Debug for RopeDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RopeDev(on device: {})", self.tables.get().is_some())
    }
}

impl RopeDev {
    /// Forget the positions (new ones come with the next op); the tables stay.
    pub fn clear_positions(&mut self) {
        self.positions = OnceLock::new();
    }
}

fn rope_dev<'a>(g: &Gpu, rope: &'a Rope) -> Result<(&'a k::RopeTables, &'a DeviceBuffer<u32>)> {
    let half = (rope.head_dim / 2).max(1);
    let max_pos = rope.cos.len() / half;
    let tables = match rope.dev.tables.get() {
        Some(t) => t,
        None => {
            let t = k::RopeTables {
                cos: g.upload(&rope.cos)?,
                sin: g.upload(&rope.sin)?,
                head_dim: rope.head_dim,
                max_pos,
            };
            rope.dev.tables.get_or_init(|| t)
        }
    };
    let positions = match rope.dev.positions.get() {
        Some(p) => p,
        None => {
            if rope.positions.iter().any(|&p| p as usize >= max_pos) {
                return Err(Error::Cuda(
                    "internal: a RoPE position is past the tables".into(),
                ));
            }
            let p = g.upload(&rope.positions)?;
            rope.dev.positions.get_or_init(|| p)
        }
    };
    Ok((tables, positions))
}

/// RoPE (or its backward) on q and k in one launch.
pub fn rope_qk(
    q: &mut Tensor,
    kt: &mut Tensor,
    n_heads: usize,
    n_kv: usize,
    rope: &Rope,
    backward: bool,
) -> Result<()> {
    let g = gpu()?;
    let (tables, positions) = rope_dev(&g, rope)?;
    profile::scope(&g, ROPE, || {
        let args = k::RopeArgs {
            q: q.bf16_buf_mut()?,
            k: kt.bf16_buf_mut()?,
            n_q_heads: n_heads,
            n_kv_heads: n_kv,
            positions,
        };
        if backward {
            k::rope_backward(&g, args, tables)
        } else {
            k::rope_forward(&g, args, tables)
        }
    })
}

/// A batch's sequence layout on the device (kept in `ops::Packing`; a clone starts empty).
#[derive(Default)]
pub struct LayoutCache(OnceLock<SeqLayout>);

impl Clone for LayoutCache {
    fn clone(&self) -> Self {
        LayoutCache::default()
    }
}

impl std::fmt::Debug for LayoutCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayoutCache(on device: {})", self.0.get().is_some())
    }
}

fn layout<'a>(g: &Gpu, pack: &'a Packing) -> Result<&'a SeqLayout> {
    if pack.prefixes().is_some() {
        // ops::attention runs these on the expanded layout.
        return Err(bad("internal: device attention over shared prefixes"));
    }
    if let Some(l) = pack.dev.0.get() {
        return Ok(l);
    }
    let l = SeqLayout::from_packing(g, pack)?;
    Ok(pack.dev.0.get_or_init(|| l))
}

/// Whether this shape runs the CPU reference: the flash kernels take head_dim 64 and
/// 128 (LLaMA/Mistral); other sizes (the tiny test models use 16 and 32) run on
/// downloaded copies, correct and slow, so every model runs on `--device cuda`.
fn host_attention(shape: &AttnShape) -> bool {
    !matches!(shape.head_dim, 64 | 128)
}

pub fn attention(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    pack: &Packing,
    shape: AttnShape,
) -> Result<(Tensor, Tensor)> {
    if host_attention(&shape) {
        let (o, lse) =
            crate::ops::attention(&q.to_cpu()?, &kt.to_cpu()?, &v.to_cpu()?, pack, shape)?;
        return Ok((o.to_cuda_bf16()?, lse.to_cuda_f32()?));
    }
    let g = gpu()?;
    let layout = layout(&g, pack)?;
    let t = q.rows();
    let mut out = new_bf16(&g, &q.shape)?;
    let mut lse = new_f32(&g, &[t, shape.n_heads])?;
    profile::scope(&g, ATTENTION, || {
        attn::attention_forward(
            &g,
            q.bf16_buf()?,
            kt.bf16_buf()?,
            v.bf16_buf()?,
            layout,
            shape,
            out.bf16_buf_mut()?,
            lse.f32_buf_mut()?,
        )
    })?;
    Ok((out, lse))
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
    pack: &Packing,
    shape: AttnShape,
) -> Result<(Tensor, Tensor, Tensor)> {
    if host_attention(&shape) {
        let (dq, dk, dv) = crate::ops::attention_backward(
            &q.to_cpu()?,
            &kt.to_cpu()?,
            &v.to_cpu()?,
            &o.to_cpu()?,
            &d_o.to_cpu()?,
            &lse.to_cpu()?,
            pack,
            shape,
        )?;
        return Ok((dq.to_cuda_bf16()?, dk.to_cuda_bf16()?, dv.to_cuda_bf16()?));
    }
    let g = gpu()?;
    let layout = layout(&g, pack)?;
    let mut dq = new_bf16(&g, &q.shape)?;
    let mut dk = new_bf16(&g, &kt.shape)?;
    let mut dv = new_bf16(&g, &v.shape)?;
    profile::scope(&g, ATTENTION, || {
        attn::attention_backward(
            &g,
            AttnGradInputs {
                q: q.bf16_buf()?,
                k: kt.bf16_buf()?,
                v: v.bf16_buf()?,
                o: o.bf16_buf()?,
                d_o: d_o.bf16_buf()?,
                lse: lse.f32_buf()?,
            },
            layout,
            shape,
            AttnGrads {
                dq: dq.bf16_buf_mut()?,
                dk: dk.bf16_buf_mut()?,
                dv: dv.bf16_buf_mut()?,
            },
        )
    })?;
    Ok((dq, dk, dv))
}

thread_local! {
    /// The last decode step's (starts, lens, cache rows) and its batch on the device.
    static LAST_DECODE: RefCell<Option<DecodeKey>> = const { RefCell::new(None) };
}
type DecodeKey = (Vec<usize>, Vec<usize>, usize, Rc<DecodeBatch>);

/// The CPU semantics (query i sees cache rows `starts[i] .. starts[i] + lens[i]`) as a
/// decode batch whose ring never wraps and whose window was applied by the caller.
pub fn attention_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    starts: &[usize],
    lens: &[usize],
    shape: AttnShape,
) -> Result<Tensor> {
    if host_attention(&shape) {
        let o = crate::ops::attention_decode(
            &q.to_cpu()?,
            &k_cache.to_cpu()?,
            &v_cache.to_cpu()?,
            starts,
            lens,
            shape,
        )?;
        return o.to_cuda_bf16();
    }
    let g = gpu()?;
    let cache_rows = k_cache.rows();
    // Every layer of a decode step asks for the same batch: upload it once per step.
    let batch = LAST_DECODE.with(|last| -> Result<Rc<DecodeBatch>> {
        let mut last = last.borrow_mut();
        if let Some((s, l, r, b)) = last.as_ref() {
            if s == starts && l == lens && *r == cache_rows {
                return Ok(b.clone());
            }
        }
        let capacity = lens.iter().copied().max().unwrap_or(1).max(1);
        let spec = DecodeSpec::new(starts, lens, capacity, None, cache_rows)?;
        let b = Rc::new(DecodeBatch::new(&g, &spec)?);
        *last = Some((starts.to_vec(), lens.to_vec(), cache_rows, b.clone()));
        Ok(b)
    })?;
    let shape = AttnShape {
        window: None,
        ..shape
    };
    let mut out = new_bf16(&g, &q.shape)?;
    profile::scope(&g, ATTENTION, || {
        attn::attention_decode(
            &g,
            q.bf16_buf()?,
            KvCacheView {
                k: k_cache.bf16_buf()?,
                v: v_cache.bf16_buf()?,
            },
            &batch,
            shape,
            out.bf16_buf_mut()?,
        )
    })?;
    Ok(out)
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let g = gpu()?;
    let mut out = new_bf16(&g, &gate.shape)?;
    profile::scope(&g, SWIGLU, || {
        k::swiglu_forward(&g, gate.bf16_buf()?, up.bf16_buf()?, out.bf16_buf_mut()?)
    })?;
    Ok(out)
}

pub fn swiglu_backward(dout: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let g = gpu()?;
    let mut dg = new_bf16(&g, &gate.shape)?;
    let mut du = new_bf16(&g, &up.shape)?;
    profile::scope(&g, SWIGLU, || {
        k::swiglu_backward(
            &g,
            dout.bf16_buf()?,
            gate.bf16_buf()?,
            up.bf16_buf()?,
            dg.bf16_buf_mut()?,
            du.bf16_buf_mut()?,
        )
    })?;
    Ok((dg, du))
}

pub fn gather_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let g = gpu()?;
    let h = x.cols();
    let idx = upload_u32(&g, rows.iter().copied(), "gather rows")?;
    let mut out = new_bf16(&g, &[rows.len(), h])?;
    profile::scope(&g, ELEMENTWISE, || {
        ew::gather_rows_bf16(&g, x.bf16_buf()?, h, &idx, out.bf16_buf_mut()?)
    })?;
    Ok(out)
}

/// `dst[rows[i]] += src[i]`. The kernel gives each source row its own block with no
/// atomics, so a row named twice (the shared prompt row that predicts the first token of
/// both DPO completions) is added in passes of distinct rows.
pub fn scatter_add_rows(dst: &mut Tensor, rows: &[usize], src: &Tensor) -> Result<()> {
    match distinct_passes(rows) {
        None => scatter_add_distinct(dst, rows, src),
        Some(passes) => {
            for (src_rows, dst_rows) in passes {
                scatter_add_distinct(dst, &dst_rows, &gather_rows(src, &src_rows)?)?;
            }
            Ok(())
        }
    }
}

/// `None` when the rows are distinct; else passes of (positions in `rows`, their rows),
/// pass k holding every row's (k+1)-th occurrence.
fn distinct_passes(rows: &[usize]) -> Option<Vec<(Vec<usize>, Vec<usize>)>> {
    // A count per row: this runs on every device scatter, once per layer and more.
    let mut seen = vec![0u32; rows.iter().max().map_or(0, |&m| m + 1)];
    let pass: Vec<usize> = rows
        .iter()
        .map(|&r| {
            seen[r] += 1;
            seen[r] as usize - 1
        })
        .collect();
    let n_passes = pass.iter().max().map_or(0, |&m| m + 1);
    if n_passes <= 1 {
        return None;
    }
    let mut out = vec![(Vec::new(), Vec::new()); n_passes];
    for (i, (&r, &k)) in rows.iter().zip(&pass).enumerate() {
        out[k].0.push(i);
        out[k].1.push(r);
    }
    Some(out)
}

fn scatter_add_distinct(dst: &mut Tensor, rows: &[usize], src: &Tensor) -> Result<()> {
    let g = gpu()?;
    let h = dst.cols();
    let idx = upload_u32(&g, rows.iter().copied(), "scatter rows")?;
    profile::scope(&g, ELEMENTWISE, || {
        ew::scatter_add_rows_bf16(&g, src.bf16_buf()?, h, &idx, dst.bf16_buf_mut()?)
    })
}

pub fn copy_rows(
    dst: &mut Tensor,
    dst_rows: &[usize],
    src: &Tensor,
    src_rows: &[usize],
) -> Result<()> {
    let g = gpu()?;
    let h = dst.cols();
    let d = upload_u32(&g, dst_rows.iter().copied(), "copy rows")?;
    let s = upload_u32(&g, src_rows.iter().copied(), "copy rows")?;
    profile::scope(&g, ELEMENTWISE, || {
        ew::copy_rows_bf16(&g, src.bf16_buf()?, &s, dst.bf16_buf_mut()?, &d, h)
    })
}

fn check_targets(targets: &[u32], vocab: usize) -> Result<()> {
    match targets.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(bad(format!(
            "target id {t} is outside the vocabulary ({vocab})"
        ))),
        None => Ok(()),
    }
}

pub fn target_logprobs(
    hidden: &Tensor,
    head: &LinearWeight,
    targets: &[u32],
) -> Result<(Tensor, Tensor)> {
    let g = gpu()?;
    let (rows, h, v) = (hidden.rows(), hidden.cols(), head.out_features());
    check_targets(targets, v)?;
    let t = g.upload(targets)?;
    let mut logp = g.alloc::<f32>(rows)?;
    let mut lse = new_f32(&g, &[rows])?;
    profile::scope(&g, LOGPROB, || {
        logprob::target_logprobs(
            &g,
            hidden.bf16_buf()?,
            rows,
            dense_bf16(head)?,
            v,
            h,
            &t,
            &mut logp,
            lse.f32_buf_mut()?,
            logprob_path(),
        )
    })?;
    Ok((Tensor::cuda_f32(logp, &[rows]), lse))
}

pub fn target_logprobs_backward(
    hidden: &Tensor,
    head: &LinearWeight,
    targets: &[u32],
    lse: &Tensor,
    dlogp: &Tensor,
) -> Result<Tensor> {
    let g = gpu()?;
    let (rows, h, v) = (hidden.rows(), hidden.cols(), head.out_features());
    check_targets(targets, v)?;
    let t = g.upload(targets)?;
    let mut slot = None;
    let d = f32_on_device(&g, dlogp, &mut slot)?;
    let mut dh = new_bf16(&g, &[rows, h])?;
    profile::scope(&g, LOGPROB, || {
        logprob::target_logprobs_backward(
            &g,
            hidden.bf16_buf()?,
            rows,
            dense_bf16(head)?,
            v,
            h,
            &t,
            lse.f32_buf()?,
            d,
            dh.bf16_buf_mut()?,
            logprob_path(),
        )
    })?;
    Ok(dh)
}

pub fn target_logprobs_and_grad(
    hidden: &Tensor,
    head: &LinearWeight,
    targets: &[u32],
) -> Result<(Tensor, Tensor)> {
    let g = gpu()?;
    let (rows, h, v) = (hidden.rows(), hidden.cols(), head.out_features());
    check_targets(targets, v)?;
    let t = g.upload(targets)?;
    let mut logp = g.alloc::<f32>(rows)?;
    let mut lse = g.alloc::<f32>(rows)?;
    let mut grad = new_bf16(&g, &[rows, h])?;
    profile::scope(&g, LOGPROB, || {
        logprob::target_logprobs_and_grad(
            &g,
            hidden.bf16_buf()?,
            rows,
            dense_bf16(head)?,
            v,
            h,
            &t,
            &mut logp,
            &mut lse,
            grad.bf16_buf_mut()?,
            logprob::default_chunk_rows(v),
        )
    })?;
    Ok((Tensor::cuda_f32(logp, &[rows]), grad))
}

/// `t`'s f32 device buffer; host values (a per-target vector made by the trainer) are
/// uploaded into `slot` first.
fn f32_on_device<'a>(
    g: &Gpu,
    t: &'a Tensor,
    slot: &'a mut Option<DeviceBuffer<f32>>,
) -> Result<&'a DeviceBuffer<f32>> {
    if t.is_cuda() {
        return t.f32_buf();
    }
    Ok(slot.insert(g.upload(t.cpu())?))
}

/// Prefix sums of `counts` as the u32 offsets `[counts.len() + 1]` the sequence kernels
/// take.
fn segment_offsets(g: &Gpu, counts: &[usize]) -> Result<DeviceBuffer<u32>> {
    let mut at = 0usize;
    let offsets = std::iter::once(0).chain(counts.iter().map(|&n| {
        at += n;
        at
    }));
    upload_u32(g, offsets, "sequence offset")
}

pub fn segment_sums(x: &Tensor, counts: &[usize], mean: bool) -> Result<Tensor> {
    let g = gpu()?;
    let mut slot = None;
    let xs = f32_on_device(&g, x, &mut slot)?;
    let offsets = segment_offsets(&g, counts)?;
    let mut out = g.alloc::<f32>(counts.len())?;
    profile::scope(&g, LOGPROB, || {
        logprob::seq_logp_sums(&g, xs, &offsets, mean, &mut out)
    })?;
    Ok(Tensor::cuda_f32(out, &[counts.len()]))
}

pub fn dpo_loss(
    cfg: &DpoCfg,
    norm: f64,
    policy: &Tensor,
    reference: &Tensor,
    counts: &[usize],
) -> Result<DpoLoss> {
    let g = gpu()?;
    let (mut pslot, mut rslot) = (None, None);
    let pol = f32_on_device(&g, policy, &mut pslot)?;
    let refs = f32_on_device(&g, reference, &mut rslot)?;
    let offsets = segment_offsets(&g, counts)?;
    let pairs = counts.len() / 2;
    let mut loss = g.alloc::<f32>(pairs)?;
    let mut reward_chosen = g.alloc::<f32>(pairs)?;
    let mut reward_rejected = g.alloc::<f32>(pairs)?;
    let mut d_policy = g.alloc::<f32>(counts.len())?;
    let mut dlogp = g.alloc::<f32>(counts.iter().sum())?;
    profile::scope(&g, LOGPROB, || {
        logprob::dpo_loss(
            &g,
            cfg,
            norm,
            pol,
            refs,
            &offsets,
            logprob::DpoOut {
                loss: &mut loss,
                reward_chosen: &mut reward_chosen,
                reward_rejected: &mut reward_rejected,
                d_policy: &mut d_policy,
                dlogp: &mut dlogp,
            },
        )
    })?;
    let n = dlogp.len();
    Ok(DpoLoss {
        loss: g.download(&loss)?,
        reward_chosen: g.download(&reward_chosen)?,
        reward_rejected: g.download(&reward_rejected)?,
        dlogp: Tensor::cuda_f32(dlogp, &[n]),
    })
}

pub fn scale_rows(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let g = gpu()?;
    let mut slot = None;
    let s = f32_on_device(&g, scale, &mut slot)?;
    let mut out = new_bf16(&g, &x.shape)?;
    profile::scope(&g, LOGPROB, || {
        logprob::scale_rows(
            &g,
            x.bf16_buf()?,
            s,
            x.rows(),
            x.cols(),
            out.bf16_buf_mut()?,
        )
    })?;
    Ok(out)
}

/// The index of each row's largest value (lowest among equals; `logprob::argmax_rows`),
/// downloaded: one id per row crosses to the host.
pub fn argmax_rows(x: &Tensor) -> Result<Vec<u32>> {
    let g = gpu()?;
    let mut out = g.alloc::<u32>(x.rows())?;
    profile::scope(&g, LOGPROB, || {
        logprob::argmax_rows(&g, x.bf16_buf()?, x.rows(), x.cols(), &mut out)
    })?;
    g.download(&out)
}

/// Whether the fused NF4 LoRA kernels are used: only with `PALIGN_FUSED_LORA=1`. On an
/// H200 (benches/RESULTS.md, 2026-11-27) the fused kernel is within 1.05× of its own
/// NF4 GEMM, but that mma.sync GEMM runs at ~250 TFLOP/s while the dispatcher's
/// dequant + cuBLAS path reaches ~700: a Mistral-7B QLoRA SFT step took 816 ms fused
/// against 526 ms with the dispatcher. Worth it again once the NF4 GEMM uses wgmma.
pub fn fused_lora_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| crate::switches::FUSED_LORA.get())
}

/// The NF4 base of `w` when the fused LoRA kernel takes `op` for `m` rows and rank `r`.
fn fused_base(w: &LinearWeight, op: Nf4Op, m: usize, r: usize) -> Option<LoraBase<'_>> {
    match w {
        // Decode-sized m (≤ 16 rows) is the dispatcher's GEMV's, not a 128-row tile's.
        LinearWeight::Nf4Cuda(q)
            if fused_lora_enabled() && (op == Nf4Op::Backward || m > super::nf4::GEMV_MAX_M) =>
        {
            let base = LoraBase::Nf4(q);
            lora::fused_applies(&base, op, m, r).then_some(base)
        }
        _ => None,
    }
}

pub fn lora_fused_forward(
    x: &Tensor,
    dropped: Option<&Tensor>,
    w: &LinearWeight,
    a: &Tensor,
    b: &Tensor,
    s: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    let (m, r) = (x.rows(), a.rows());
    let Some(base) = fused_base(w, Nf4Op::Forward, m, r) else {
        return Ok(None);
    };
    let g = gpu()?;
    let mut y = new_bf16(&g, &[m, w.out_features()])?;
    let mut xa = new_bf16(&g, &[m, r])?;
    let dev = LoraDev {
        a: a.bf16_buf()?,
        b: b.bf16_buf()?,
        rank: r,
        scale: s,
    };
    let dropped = dropped.map(|d| d.bf16_buf()).transpose()?;
    profile::scope(&g, NF4, || {
        lora::lora_forward(
            &g,
            base,
            x.bf16_buf()?,
            dropped,
            m,
            dev,
            xa.bf16_buf_mut()?,
            y.bf16_buf_mut()?,
            true,
        )
    })?;
    Ok(Some((y, xa)))
}

pub fn lora_fused_backward(
    dy: &Tensor,
    w: &LinearWeight,
    a: &Tensor,
    b: &Tensor,
    s: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    let (m, r) = (dy.rows(), a.rows());
    let Some(base) = fused_base(w, Nf4Op::Backward, m, r) else {
        return Ok(None);
    };
    let g = gpu()?;
    let mut dx = new_bf16(&g, &[m, w.in_features()])?;
    let mut dyb = new_bf16(&g, &[m, r])?;
    let dev = LoraDev {
        a: a.bf16_buf()?,
        b: b.bf16_buf()?,
        rank: r,
        scale: s,
    };
    profile::scope(&g, NF4, || {
        lora::lora_backward_input(
            &g,
            base,
            dy.bf16_buf()?,
            m,
            dev,
            dyb.bf16_buf_mut()?,
            dx.bf16_buf_mut()?,
            true,
        )
    })?;
    Ok(Some((dx, dyb)))
}

// ---- LoRA heads with dropout fused (kernels/lora_drop.cu) ----

/// Profile family of the adapter kernels with dropout fused.
pub const LORA: &str = "lora (dropout fused)";

/// The three adapter passes kernels/lora_drop.cu can take over from the dropout copy +
/// cuBLAS per adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPass {
    /// `xa_i = drop_i(x)·A_iᵀ` (`ops::lora_down`).
    Down,
    /// `dA_i += alpha·dyb_iᵀ·drop_i(x)` (`ops::lora_grad_a_`).
    GradA,
    /// `dx += alpha·Σ drop_i(dyb_i·A_i)` (`ops::lora_dx_acc_`).
    DxAcc,
}

/// `PALIGN_LORA_DROP`: `auto` (default) takes the fused kernel only for the passes and
/// ranks where it measured faster ([`lora_drop_auto`]); `fused` for every pass that fits;
/// `unfused` for none; any other value is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraDropMode {
    Auto,
    Fused,
    Unfused,
}

impl LoraDropMode {
    pub fn parse(v: Option<&str>) -> Result<LoraDropMode> {
        match v {
            None | Some("") | Some("auto") => Ok(LoraDropMode::Auto),
            Some("fused") => Ok(LoraDropMode::Fused),
            Some("unfused") => Ok(LoraDropMode::Unfused),
            Some(other) => Err(bad(format!(
                "PALIGN_LORA_DROP={other:?}: expected auto, fused or unfused"
            ))),
        }
    }
}

fn lora_drop_mode() -> Result<LoraDropMode> {
    static MODE: OnceLock<LoraDropMode> = OnceLock::new();
    if let Some(m) = MODE.get() {
        return Ok(*m);
    }
    let m = LoraDropMode::parse(std::env::var("PALIGN_LORA_DROP").ok().as_deref())?;
    Ok(*MODE.get_or_init(|| m))
}

/// Whether `auto` takes the fused kernel for `pass` on heads of rank at most `max_rank`.
/// From `benches/lora.rs` on an H200 (benches/RESULTS.md, 2026-11-28; m = 8192, k = 4096
/// and 14336, 1 and 3 heads, p = 0.05): the fused dX pass won every case (1.03–1.9×);
/// the fused down-projection tied or won at rank 16 (1.0–1.09×) and lost at rank 64
/// (2.3–5.1× slower); the fused dA pass lost every case (0.32–0.79× the speed).
pub fn lora_drop_auto(pass: LoraPass, max_rank: usize) -> bool {
    match pass {
        LoraPass::Down => max_rank <= 16,
        LoraPass::GradA => false,
        LoraPass::DxAcc => true,
    }
}

/// Whether kernels/lora_drop.cu takes `pass` for these heads over an input of `k` columns
/// (ranks a multiple of 8 up to 128, at most 3 heads, k a multiple of 8, and the mode
/// above); other shapes (e.g. the tiny fixtures' ranks) take the unfused path.
pub fn lora_drop_applies(pass: LoraPass, k: usize, heads: &[crate::ops::LoraHead]) -> Result<bool> {
    let mode = lora_drop_mode()?; // first, so a bad value is reported whatever the shape
    let fits = !heads.is_empty()
        && heads.len() <= lora_drop::MAX_HEADS
        && k.is_multiple_of(lora_drop::K_MULTIPLE)
        && heads.iter().all(|h| {
            let r = h.a.rows();
            r.is_multiple_of(lora_drop::RANK_MULTIPLE) && (1..=lora_drop::MAX_RANK).contains(&r)
        });
    Ok(fits
        && match mode {
            LoraDropMode::Fused => true,
            LoraDropMode::Unfused => false,
            LoraDropMode::Auto => {
                let max_rank = heads.iter().map(|h| h.a.rows()).max().unwrap_or(0);
                lora_drop_auto(pass, max_rank)
            }
        })
}

fn drop_heads<'a>(heads: &[crate::ops::LoraHead<'a>]) -> Result<Vec<lora_drop::DropHead<'a>>> {
    heads
        .iter()
        .map(|h| {
            Ok(lora_drop::DropHead {
                a: h.a.bf16_buf()?,
                rank: h.a.rows(),
                stream: h.mask.map_or(0, |m| m.stream),
                p: h.mask.map_or(0.0, |m| m.p),
            })
        })
        .collect()
}

pub fn lora_down(x: &Tensor, heads: &[crate::ops::LoraHead]) -> Result<Vec<Tensor>> {
    let g = gpu()?;
    let (m, k) = (x.rows(), x.cols());
    let mut outs = heads
        .iter()
        .map(|h| new_bf16(&g, &[m, h.a.rows()]))
        .collect::<Result<Vec<_>>>()?;
    if heads.is_empty() {
        return Ok(outs);
    }
    let dh = drop_heads(heads)?;
    let mut bufs = outs
        .iter_mut()
        .map(|t| t.bf16_buf_mut())
        .collect::<Result<Vec<_>>>()?;
    profile::scope(&g, LORA, || {
        lora_drop::lora_down(&g, x.bf16_buf()?, m, k, &dh, &mut bufs)
    })?;
    drop(bufs);
    Ok(outs)
}

pub fn lora_grad_a_(
    grads: &mut [&mut Tensor],
    x: &Tensor,
    heads: &[crate::ops::LoraHead],
    dybs: &[&Tensor],
    alpha: f32,
) -> Result<()> {
    if heads.is_empty() {
        return Ok(());
    }
    let g = gpu()?;
    let (m, k) = (x.rows(), x.cols());
    let dh = drop_heads(heads)?;
    let dyb = dybs
        .iter()
        .map(|t| t.bf16_buf())
        .collect::<Result<Vec<_>>>()?;
    let mut gb = grads
        .iter_mut()
        .map(|t| t.f32_buf_mut())
        .collect::<Result<Vec<_>>>()?;
    profile::scope(&g, LORA, || {
        lora_drop::lora_grad_a(&g, x.bf16_buf()?, m, k, &dh, &dyb, alpha, &mut gb)
    })
}

pub fn lora_dx_acc_(
    dx: &mut Tensor,
    heads: &[crate::ops::LoraHead],
    dybs: &[&Tensor],
    alpha: f32,
) -> Result<()> {
    if heads.is_empty() {
        return Ok(());
    }
    let g = gpu()?;
    let (m, k) = (dx.rows(), dx.cols());
    let dh = drop_heads(heads)?;
    let dyb = dybs
        .iter()
        .map(|t| t.bf16_buf())
        .collect::<Result<Vec<_>>>()?;
    profile::scope(&g, LORA, || {
        lora_drop::lora_dx_acc(&g, dx.bf16_buf_mut()?, m, k, &dh, &dyb, alpha)
    })
}

/// Whether `ops::lora_up_backward_` takes the one-pass kernel (kernels/lora_drop.cu
/// `lora_up_backward`): only with `PALIGN_LORA_UP=fused`. Its dY·B is reduced through an
/// f32 partial per 128 output columns, (n/128)·m·r·4 bytes; on an H200 it was 1.3x (rank
/// 16) to 2.7x (rank 64) slower than the two cuBLAS products (benches/RESULTS.md).
pub fn lora_up_applies(dy: &Tensor, b: &Tensor) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| crate::switches::LORA_UP_FUSED.get());
    let (n, r) = (dy.cols(), b.cols());
    on && n.is_multiple_of(8) && r.is_multiple_of(8) && (8..=lora_drop::MAX_RANK).contains(&r)
}

pub fn lora_up_backward_(
    grad_b: &mut Tensor,
    dy: &Tensor,
    xa: &Tensor,
    b: &Tensor,
    alpha: f32,
) -> Result<Tensor> {
    let g = gpu()?;
    let (m, n, r) = (dy.rows(), dy.cols(), b.cols());
    let mut dyb = new_bf16(&g, &[m, r])?;
    profile::scope(&g, LORA, || {
        lora_drop::lora_up_backward(
            &g,
            dy.bf16_buf()?,
            m,
            n,
            b.bf16_buf()?,
            xa.bf16_buf()?,
            r,
            alpha,
            dyb.bf16_buf_mut()?,
            grad_b.f32_buf_mut()?,
        )
    })?;
    Ok(dyb)
}

#[cfg(test)]
mod tests {
    use super::{distinct_passes, lora_drop_auto, LoraDropMode, LoraPass};

    #[test]
    fn repeated_scatter_rows_split_into_passes_of_distinct_rows() {
        assert_eq!(distinct_passes(&[3, 1, 4, 0]), None);
        assert_eq!(distinct_passes(&[]), None);
        let passes = distinct_passes(&[5, 2, 5, 7, 5, 2]).unwrap();
        assert_eq!(
            passes,
            vec![
                (vec![0, 1, 3], vec![5, 2, 7]),
                (vec![2, 5], vec![5, 2]),
                (vec![4], vec![5]),
            ]
        );
    }

    #[test]
    fn lora_drop_mode_reads_the_switch() {
        assert_eq!(LoraDropMode::parse(None).unwrap(), LoraDropMode::Auto);
        assert_eq!(
            LoraDropMode::parse(Some("auto")).unwrap(),
            LoraDropMode::Auto
        );
        assert_eq!(
            LoraDropMode::parse(Some("fused")).unwrap(),
            LoraDropMode::Fused
        );
        assert_eq!(
            LoraDropMode::parse(Some("unfused")).unwrap(),
            LoraDropMode::Unfused
        );
        let e = LoraDropMode::parse(Some("on")).unwrap_err().to_string();
        assert!(
            e.contains("PALIGN_LORA_DROP=\"on\"") && e.contains("unfused"),
            "{e}"
        );
    }

    /// `auto` picks the faster path on every shape `benches/lora.rs` measured on an H200
    /// (benches/RESULTS.md, 2026-11-28: milliseconds, fused then unfused; m = 8192,
    /// p = 0.05), or either where they are within 10%. Changing the rule means measuring.
    #[test]
    fn lora_drop_auto_follows_the_h200_measurements() {
        use LoraPass::*;
        // (pass, k, rank, heads, fused ms, unfused ms)
        let measured: &[(LoraPass, usize, usize, usize, f64, f64)] = &[
            (Down, 4096, 16, 1, 0.0687, 0.0703),
            (GradA, 4096, 16, 1, 0.1204, 0.0729),
            (DxAcc, 4096, 16, 1, 0.0994, 0.1308),
            (Down, 4096, 16, 3, 0.1905, 0.2070),
            (GradA, 4096, 16, 3, 0.2778, 0.2182),
            (DxAcc, 4096, 16, 3, 0.2103, 0.3807),
            (Down, 4096, 64, 1, 0.1596, 0.0698),
            (GradA, 4096, 64, 1, 0.1356, 0.0732),
            (DxAcc, 4096, 64, 1, 0.1190, 0.1225),
            (Down, 4096, 64, 3, 0.9230, 0.2103),
            (GradA, 4096, 64, 3, 0.6924, 0.2203),
            (DxAcc, 4096, 64, 3, 0.2688, 0.3728),
            (Down, 14336, 16, 1, 0.2235, 0.2231),
            (GradA, 14336, 16, 1, 0.3543, 0.2218),
            (DxAcc, 14336, 16, 1, 0.2993, 0.4050),
            (Down, 14336, 16, 3, 0.6300, 0.6698),
            (GradA, 14336, 16, 3, 0.8588, 0.6665),
            (DxAcc, 14336, 16, 3, 0.6394, 1.2154),
            (Down, 14336, 64, 1, 0.5421, 0.2241),
            (GradA, 14336, 64, 1, 0.4072, 0.2224),
            (DxAcc, 14336, 64, 1, 0.3595, 0.4103),
            (Down, 14336, 64, 3, 3.4080, 0.6741),
            (GradA, 14336, 64, 3, 2.0208, 0.6670),
            (DxAcc, 14336, 64, 3, 0.8284, 1.2179),
        ];
        for &(pass, k, r, heads, fused, unfused) in measured {
            let close = (fused / unfused - 1.0).abs() <= 0.10;
            let pick = lora_drop_auto(pass, r);
            assert!(
                close || pick == (fused < unfused),
                "{pass:?} k={k} r={r} heads={heads}: auto takes fused={pick}, measured {fused} vs {unfused} ms"
            );
        }
    }
}
