//! The ops the model is written in. Each dispatches on the tensors' storage: CPU tensors
//! go to the f32 reference (`backend::cpu::ops`), device tensors to the CUDA arm
//! (`backend::cuda::tensor_ops`, bf16 activations, f32 adapter gradients). Every op
//! returns `Result`, since the device can fail (out of memory, a driver error).

pub use crate::backend::cpu::ops::AttnShape;
use crate::backend::cpu::ops::{self as cpu, MatRef};
use crate::backend::cuda::nf4::Nf4Weight;
use crate::backend::cuda::tensor_ops as dev;
use crate::error::Result;
pub use crate::packing::{Group, Packing, Prefixes};
use crate::quant::Nf4Tensor;
use crate::tensor::Tensor;
use crate::train::loss::{dpo_pair, DpoCfg, DpoKind};
use std::sync::Arc;

/// A frozen projection weight `[out, in]` (PyTorch `nn.Linear` layout).
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// f32 on the CPU, bf16 on the device; shared (`Arc`) so tied embeddings are not
    /// copied.
    Dense(Arc<Tensor>),
    /// bitsandbytes NF4; the CPU backend dequantizes it for each product (QLoRA base).
    Nf4(Arc<Nf4Tensor>),
    /// bitsandbytes NF4 on the device, multiplied by the NF4 kernels.
    Nf4Cuda(Arc<Nf4Weight>),
}

impl LinearWeight {
    /// This weight on the device: dense as bf16 (rounded to nearest even, as
    /// `model.to(torch.bfloat16)` does), NF4 in its packed form; one already there is
    /// shared, not copied.
    pub fn to_device(&self) -> Result<LinearWeight> {
        Ok(match self {
            LinearWeight::Dense(t) if !t.is_cuda() => {
                LinearWeight::Dense(Arc::new(t.to_cuda_bf16()?))
            }
            LinearWeight::Nf4(q) => {
                LinearWeight::Nf4Cuda(Arc::new(crate::backend::cuda::nf4::Nf4Weight::upload(
                    &*crate::backend::cuda::Gpu::get()?,
                    q,
                )?))
            }
            other => other.clone(),
        })
    }

    pub fn out_features(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.shape[0],
            LinearWeight::Nf4(q) => q.shape[0],
            LinearWeight::Nf4Cuda(q) => q.shape()[0],
        }
    }
    pub fn in_features(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.shape[1],
            LinearWeight::Nf4(q) => q.shape[1],
            LinearWeight::Nf4Cuda(q) => q.shape()[1],
        }
    }

    pub fn is_cuda(&self) -> bool {
        match self {
            LinearWeight::Dense(t) => t.is_cuda(),
            LinearWeight::Nf4(_) => false,
            LinearWeight::Nf4Cuda(_) => true,
        }
    }

    /// The weight as f32 (dequantized for NF4), borrowed when it already is (CPU only).
    fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            LinearWeight::Dense(t) => f(t.cpu()),
            LinearWeight::Nf4(q) => f(&q.dequantize()),
            LinearWeight::Nf4Cuda(_) => unreachable!("CPU product with a device NF4 weight"),
        }
    }
}

/// `x · Wᵀ` for `x` of shape `[m, in]`.
pub fn linear(x: &Tensor, w: &LinearWeight) -> Result<Tensor> {
    if x.is_cuda() {
        return dev::linear(x, w);
    }
    let m = x.rows();
    Ok(Tensor::from_vec(
        linear_rows(x.cpu(), m, w),
        &[m, w.out_features()],
    ))
}

/// `x · Wᵀ` for `m` rows of `in` values in a plain slice.
fn linear_rows(x: &[f32], m: usize, w: &LinearWeight) -> Vec<f32> {
    let (n, k) = (w.out_features(), w.in_features());
    w.with_f32(|wt| cpu::gemm_new(MatRef::new(x, m, k), MatRef::new(wt, n, k).t(), 1.0))
}

/// Input gradient of a frozen projection: `dX = dY · W` (`[m, out]` → `[m, in]`).
pub fn linear_backward(dy: &Tensor, w: &LinearWeight) -> Result<Tensor> {
    if dy.is_cuda() {
        return dev::linear_backward(dy, w);
    }
    let (m, n, k) = (dy.rows(), w.out_features(), w.in_features());
    let out =
        w.with_f32(|wt| cpu::gemm_new(MatRef::new(dy.cpu(), m, n), MatRef::new(wt, n, k), 1.0));
    Ok(Tensor::from_vec(out, &[m, k]))
}

/// `dx += dY · W`: the input gradient of one more projection of a shared input (k, v
/// after q; up after gate) summed in the GEMM itself, with no separate add pass.
pub fn linear_backward_acc_(dx: &mut Tensor, dy: &Tensor, w: &LinearWeight) -> Result<()> {
    if dy.is_cuda() {
        return dev::linear_backward_acc_(dx, dy, w);
    }
    let (m, n, k) = (dy.rows(), w.out_features(), w.in_features());
    w.with_f32(|wt| {
        cpu::gemm(
            MatRef::new(dy.cpu(), m, n),
            MatRef::new(wt, n, k),
            dx.cpu_mut(),
            1.0,
            1.0,
        )
    });
    Ok(())
}

/// `x · aᵀ` for two plain tensors (`[m, k]`, `[n, k]`); the LoRA products.
pub fn matmul_t(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    if x.is_cuda() {
        return dev::matmul_new(x, a, true);
    }
    let (m, n, k) = (x.rows(), a.rows(), a.cols());
    let out = cpu::gemm_new(
        MatRef::new(x.cpu(), m, k),
        MatRef::new(a.cpu(), n, k).t(),
        1.0,
    );
    Ok(Tensor::from_vec(out, &[m, n]))
}

/// `x · a` for `[m, k]` and `[k, n]`.
pub fn matmul(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    if x.is_cuda() {
        return dev::matmul_new(x, a, false);
    }
    let (m, k, n) = (x.rows(), a.rows(), a.cols());
    let out = cpu::gemm_new(MatRef::new(x.cpu(), m, k), MatRef::new(a.cpu(), k, n), 1.0);
    Ok(Tensor::from_vec(out, &[m, n]))
}

/// `y += alpha · x · aᵀ` (the LoRA update added onto the base projection in one GEMM).
pub fn matmul_t_acc_(y: &mut Tensor, x: &Tensor, a: &Tensor, alpha: f32) -> Result<()> {
    if x.is_cuda() {
        return dev::matmul_acc(y, x, a, true, alpha);
    }
    let (m, n, k) = (x.rows(), a.rows(), a.cols());
    cpu::gemm(
        MatRef::new(x.cpu(), m, k),
        MatRef::new(a.cpu(), n, k).t(),
        y.cpu_mut(),
        alpha,
        1.0,
    );
    Ok(())
}

/// `y += alpha · x · a` (the adapter's input gradient added onto the base one).
pub fn matmul_acc_(y: &mut Tensor, x: &Tensor, a: &Tensor, alpha: f32) -> Result<()> {
    if x.is_cuda() {
        return dev::matmul_acc(y, x, a, false, alpha);
    }
    let (m, k, n) = (x.rows(), a.rows(), a.cols());
    cpu::gemm(
        MatRef::new(x.cpu(), m, k),
        MatRef::new(a.cpu(), k, n),
        y.cpu_mut(),
        alpha,
        1.0,
    );
    Ok(())
}

/// The fused LoRA projection, where it applies (device tensors, an NF4 base, the fused
/// kernel's shape limits, `PALIGN_FUSED_LORA` not `0`): `(x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ,
/// s·drop(x)·Aᵀ)`. `None` means: use the separate products.
pub fn lora_fused_forward(
    x: &Tensor,
    dropped: Option<&Tensor>,
    w: &LinearWeight,
    pair: &crate::lora::LoraPair,
    s: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    if !x.is_cuda() {
        return Ok(None);
    }
    dev::lora_fused_forward(x, dropped, w, &pair.a, &pair.b, s)
}

/// The fused LoRA input gradient, where it applies (see `lora_fused_forward`; no
/// dropout): `(dY·W + s·dY·B·A, s·dY·B)`.
pub fn lora_fused_backward(
    dy: &Tensor,
    w: &LinearWeight,
    pair: &crate::lora::LoraPair,
    s: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    if !dy.is_cuda() {
        return Ok(None);
    }
    dev::lora_fused_backward(dy, w, &pair.a, &pair.b, s)
}

/// Whether device projections take the fused NF4 LoRA kernels (`PALIGN_FUSED_LORA=1`);
/// those take one adapter at a time, so the model then projects one head at a time.
pub fn lora_fused_wanted(x: &Tensor) -> bool {
    x.is_cuda() && dev::fused_lora_enabled()
}

/// One adapter of a group of projections that share their input (q/k/v; gate/up; or a
/// single projection): its A `[r, in]` and the dropout mask on its input (`None`: none).
/// Each adapter has its own mask, as PEFT gives each `lora_dropout` module its own draw.
#[derive(Clone, Copy)]
pub struct LoraHead<'a> {
    pub a: &'a Tensor,
    pub mask: Option<DropMask>,
}

/// `xa_i = drop_i(x)·A_iᵀ` `[m, r_i]` for every head. On the device one kernel reads `x`
/// once for all heads and draws the masks on the fly where it takes the shapes and
/// measured faster (`dev::lora_drop_applies`); else the dropout kernel and a GEMM per
/// head.
pub fn lora_down(x: &Tensor, heads: &[LoraHead]) -> Result<Vec<Tensor>> {
    if x.is_cuda() && dev::lora_drop_applies(dev::LoraPass::Down, x.cols(), heads)? {
        return dev::lora_down(x, heads);
    }
    heads
        .iter()
        .map(|h| match h.mask {
            Some(m) => matmul_t(&dropout(x, m)?, h.a),
            None => matmul_t(x, h.a),
        })
        .collect()
}

/// The adapter's up-projection backward: `dB += alpha·dYᵀ·xa` and returns `dY·B`
/// `[m, r]`. Both read dY; on the device `PALIGN_LORA_UP=fused` takes one kernel that
/// reads it once (off by default: it passed its GPU parity tests but was slower than the
/// two cuBLAS products on every shape benches/lora.rs measured on an H200).
pub fn lora_up_backward_(
    grad_b: &mut Tensor,
    dy: &Tensor,
    xa: &Tensor,
    b: &Tensor,
    alpha: f32,
) -> Result<Tensor> {
    if dy.is_cuda() && dev::lora_up_applies(dy, b) {
        return dev::lora_up_backward_(grad_b, dy, xa, b, alpha);
    }
    add_at_b_(grad_b, dy, xa, alpha)?;
    matmul(dy, b)
}

/// `dA_i += alpha · dyb_iᵀ · drop_i(x)` for every head (`dyb_i = dY_i·B_i` `[m, r_i]`,
/// `dA_i` f32 `[r_i, in]`): on the device one pass over `x` with `PALIGN_LORA_DROP=fused`
/// (`auto` keeps the dropout copy + cuBLAS per head, which measured faster).
pub fn lora_grad_a_(
    grads: &mut [&mut Tensor],
    x: &Tensor,
    heads: &[LoraHead],
    dybs: &[&Tensor],
    alpha: f32,
) -> Result<()> {
    if grads.len() != heads.len() || dybs.len() != heads.len() {
        return Err(crate::error::bad(
            "internal: lora_grad_a_ head counts differ",
        ));
    }
    if x.is_cuda() && dev::lora_drop_applies(dev::LoraPass::GradA, x.cols(), heads)? {
        return dev::lora_grad_a_(grads, x, heads, dybs, alpha);
    }
    for ((g, h), dyb) in grads.iter_mut().zip(heads).zip(dybs) {
        match h.mask {
            Some(m) => add_at_b_(g, dyb, &dropout(x, m)?, alpha)?,
            None => add_at_b_(g, dyb, x, alpha)?,
        }
    }
    Ok(())
}

/// `dx += alpha · Σ_i drop_i(dyb_i · A_i)`: the adapters' share of the input gradient
/// (the mask of head i applies to its own term). On the device one pass over `dx`.
pub fn lora_dx_acc_(
    dx: &mut Tensor,
    heads: &[LoraHead],
    dybs: &[&Tensor],
    alpha: f32,
) -> Result<()> {
    if dybs.len() != heads.len() {
        return Err(crate::error::bad(
            "internal: lora_dx_acc_ head counts differ",
        ));
    }
    if dx.is_cuda() && dev::lora_drop_applies(dev::LoraPass::DxAcc, dx.cols(), heads)? {
        return dev::lora_dx_acc_(dx, heads, dybs, alpha);
    }
    for (h, dyb) in heads.iter().zip(dybs) {
        match h.mask {
            Some(m) => {
                let dxa = matmul(dyb, h.a)?; // [m, in]
                axpy_(dx, alpha, &dropout(&dxa, m)?)?;
            }
            None => matmul_acc_(dx, dyb, h.a, alpha)?,
        }
    }
    Ok(())
}

/// `g += alpha · aᵀ · b` for `a` `[m, p]`, `b` `[m, q]`, `g` `[p, q]` (weight gradients;
/// `g` is f32 on both backends).
pub fn add_at_b_(g: &mut Tensor, a: &Tensor, b: &Tensor, alpha: f32) -> Result<()> {
    if a.is_cuda() {
        return dev::add_at_b_(g, a, b, alpha);
    }
    let (m, p, q) = (a.rows(), a.cols(), b.cols());
    cpu::gemm(
        MatRef::new(a.cpu(), m, p).t(),
        MatRef::new(b.cpu(), m, q),
        g.cpu_mut(),
        alpha,
        1.0,
    );
    Ok(())
}

/// `y += alpha · x`.
pub fn axpy_(y: &mut Tensor, alpha: f32, x: &Tensor) -> Result<()> {
    if y.is_cuda() {
        return dev::axpy_(y, alpha, x);
    }
    cpu::axpy(y.cpu_mut(), alpha, x.cpu());
    Ok(())
}

/// Identifies one dropout mask: element `i` is kept iff
/// `backend::cpu::rng::dropout_keep(stream, i, p)`. Both backends draw the same mask,
/// and backward recomputes it from these two numbers instead of storing it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropMask {
    pub stream: u64,
    pub p: f32,
}

/// `x ∘ mask / (1 − p)`: PEFT's `lora_dropout` on an adapter's input.
pub fn dropout(x: &Tensor, mask: DropMask) -> Result<Tensor> {
    if x.is_cuda() {
        return dev::dropout(x, mask);
    }
    use rayon::prelude::*;
    let keep = 1.0 / (1.0 - mask.p);
    let v = x
        .cpu()
        .par_iter()
        .enumerate()
        .map(|(i, &a)| {
            if crate::backend::cpu::rng::dropout_keep(mask.stream, i as u64, mask.p) {
                a * keep
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, &x.shape))
}

/// Rows of an embedding table `[vocab, hidden]`.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    if table.is_cuda() {
        return dev::embedding(table, ids);
    }
    let h = table.cols();
    let mut out = vec![0.0; ids.len() * h];
    cpu::embedding(table.cpu(), h, ids, &mut out);
    Ok(Tensor::from_vec(out, &[ids.len(), h]))
}

/// RMSNorm over the last dimension; returns (output, rstd per row).
pub fn rmsnorm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    if x.is_cuda() {
        return dev::rmsnorm(x, weight, eps);
    }
    let rows = x.numel() / weight.numel();
    let mut out = vec![0.0; x.numel()];
    let mut rstd = vec![0.0; rows];
    cpu::rmsnorm_forward(x.cpu(), weight.cpu(), eps, &mut out, &mut rstd);
    Ok((
        Tensor::from_vec(out, &x.shape),
        Tensor::from_vec(rstd, &[rows]),
    ))
}

/// Precomputed RoPE angles for the positions of one batch (device copies made on
/// first use by a device op and kept for the batch's backward).
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub positions: Vec<u32>,
    pub head_dim: usize,
    pub(crate) dev: dev::RopeDev,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, positions: Vec<u32>) -> Self {
        let max_pos = positions.iter().max().map_or(0, |p| *p as usize + 1);
        let (cos, sin) = cpu::rope_tables(head_dim, theta, max_pos);
        Rope {
            cos,
            sin,
            positions,
            head_dim,
            dev: dev::RopeDev::default(),
        }
    }

    /// New positions over the same tables (one decode step); the device keeps its
    /// copy of the tables and uploads only the positions.
    pub fn set_positions(&mut self, positions: Vec<u32>) {
        self.positions = positions;
        self.dev.clear_positions();
    }
}

/// Rotate-half RoPE in place on q `[tokens, Hq·d]` and k `[tokens, Hkv·d]`.
pub fn rope_qk_(
    q: &mut Tensor,
    k: &mut Tensor,
    n_heads: usize,
    n_kv: usize,
    rope: &Rope,
) -> Result<()> {
    if q.is_cuda() {
        return dev::rope_qk(q, k, n_heads, n_kv, rope, false);
    }
    let d = rope.head_dim;
    for (x, h) in [(q, n_heads), (k, n_kv)] {
        cpu::rope_forward(x.cpu_mut(), h, d, &rope.positions, &rope.cos, &rope.sin);
    }
    Ok(())
}

/// RoPE backward in place (rotation by −angle) on dq and dk.
pub fn rope_qk_backward_(
    dq: &mut Tensor,
    dk: &mut Tensor,
    n_heads: usize,
    n_kv: usize,
    rope: &Rope,
) -> Result<()> {
    if dq.is_cuda() {
        return dev::rope_qk(dq, dk, n_heads, n_kv, rope, true);
    }
    let d = rope.head_dim;
    for (x, h) in [(dq, n_heads), (dk, n_kv)] {
        cpu::rope_backward(x.cpu_mut(), h, d, &rope.positions, &rope.cos, &rope.sin);
    }
    Ok(())
}

/// Causal (optionally windowed) GQA attention over packed sequences; returns (out, lse).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pack: &Packing,
    shape: AttnShape,
) -> Result<(Tensor, Tensor)> {
    if let Some(x) = pack.prefixes() {
        return attention_shared(q, k, v, x, shape);
    }
    if q.is_cuda() {
        return dev::attention(q, k, v, pack, shape);
    }
    let t = q.rows();
    let mut out = vec![0.0; q.numel()];
    let mut lse = vec![0.0; t * shape.n_heads];
    cpu::attention_forward(q.cpu(), k.cpu(), v.cpu(), pack, shape, &mut out, &mut lse);
    Ok((
        Tensor::from_vec(out, &q.shape),
        Tensor::from_vec(lse, &[t, shape.n_heads]),
    ))
}

/// `attention` over a packing with shared prefixes: q/k/v gathered into the expanded
/// layout (each branch its own sequence after a copy of its prefix), attention there,
/// each packed row's output taken from the expanded row that stands for it. The lse
/// stays in the expanded layout: only `attention_backward` reads it.
fn attention_shared(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    x: &Prefixes,
    shape: AttnShape,
) -> Result<(Tensor, Tensor)> {
    let (qe, ke, ve) = (
        gather_rows(q, &x.gather)?,
        gather_rows(k, &x.gather)?,
        gather_rows(v, &x.gather)?,
    );
    let (oe, lse) = attention(&qe, &ke, &ve, &x.expanded, shape)?;
    Ok((gather_rows(&oe, &x.owner)?, lse))
}

/// The backward of `attention_shared`. dO goes to the standing-for rows only (zero on
/// the other prefix copies, whose outputs were not used), so dQ of a packed row is its
/// standing-for row's; dK/dV of a prefix row sum over its copies, one scatter-add pass
/// per extra branch.
#[allow(clippy::too_many_arguments)]
fn attention_backward_shared(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse_expanded: &Tensor,
    x: &Prefixes,
    shape: AttnShape,
) -> Result<(Tensor, Tensor, Tensor)> {
    let e = |t: &Tensor| gather_rows(t, &x.gather);
    let mut doe = Tensor::zeros_on(&[x.gather.len(), d_o.cols()], d_o.is_cuda())?;
    scatter_add_rows(&mut doe, &x.owner, d_o)?;
    let (dqe, dke, dve) = attention_backward(
        &e(q)?,
        &e(k)?,
        &e(v)?,
        &e(o)?,
        &doe,
        lse_expanded,
        &x.expanded,
        shape,
    )?;
    let fold = |ge: &Tensor| -> Result<Tensor> {
        let mut g = gather_rows(ge, &x.owner)?;
        for (expanded_rows, rows) in &x.copies {
            scatter_add_rows(&mut g, rows, &gather_rows(ge, expanded_rows)?)?;
        }
        Ok(g)
    };
    Ok((gather_rows(&dqe, &x.owner)?, fold(&dke)?, fold(&dve)?))
}

/// Decode attention: query row i (one new token of a sequence) against cache rows
/// `starts[i] .. starts[i] + lens[i]` of `k_cache` / `v_cache` (`[rows, Hkv·d]`); the
/// caller passes only keys the query may see. Returns `[n, H·d]`.
pub fn attention_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    starts: &[usize],
    lens: &[usize],
    shape: AttnShape,
) -> Result<Tensor> {
    if q.is_cuda() {
        return dev::attention_decode(q, k_cache, v_cache, starts, lens, shape);
    }
    let mut out = vec![0.0; q.numel()];
    cpu::attention_decode(
        q.cpu(),
        k_cache.cpu(),
        v_cache.cpu(),
        starts,
        lens,
        shape,
        &mut out,
    );
    Ok(Tensor::from_vec(out, &q.shape))
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.is_cuda() {
        return dev::swiglu(gate, up);
    }
    let mut out = vec![0.0; gate.numel()];
    cpu::swiglu_forward(gate.cpu(), up.cpu(), &mut out);
    Ok(Tensor::from_vec(out, &gate.shape))
}

/// `y += x`.
pub fn add_(y: &mut Tensor, x: &Tensor) -> Result<()> {
    if y.is_cuda() {
        return dev::axpy_(y, 1.0, x);
    }
    cpu::add_inplace(y.cpu_mut(), x.cpu());
    Ok(())
}

/// Zeros with `like`'s shape and storage kind (gradient buffers).
pub fn zeros_like(like: &Tensor) -> Result<Tensor> {
    if like.is_cuda() {
        return dev::zeros_like(like);
    }
    Ok(Tensor::zeros(&like.shape))
}

/// Index of the largest value; the lowest index among equal maxima, and a NaN counts as
/// larger than any number (`torch.argmax`: the first NaN wins).
pub fn argmax(x: &[f32]) -> u32 {
    if let Some(i) = x.iter().position(|v| v.is_nan()) {
        return i as u32;
    }
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// `argmax` of each row of `x [rows, cols]` (greedy decoding's tokens). On the device
/// only the ids come back to the host.
pub fn argmax_rows(x: &Tensor) -> Result<Vec<u32>> {
    if x.is_cuda() {
        return dev::argmax_rows(x);
    }
    use rayon::prelude::*;
    Ok(x.cpu().par_chunks(x.cols().max(1)).map(argmax).collect())
}

/// Select rows of a 2-D tensor.
pub fn gather_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    if x.is_cuda() {
        return dev::gather_rows(x, rows);
    }
    let h = x.cols();
    let src = x.cpu();
    let mut out = Vec::with_capacity(rows.len() * h);
    for &r in rows {
        out.extend_from_slice(&src[r * h..(r + 1) * h]);
    }
    Ok(Tensor::from_vec(out, &[rows.len(), h]))
}

/// Log-probabilities of `targets[i]` under `softmax(hidden[i] · headᵀ)` (f32
/// `[targets]`, on the device for device inputs), computed in chunks of rows so the full
/// tokens × vocab logits never exist at once. Also returns the per-row log-sum-exp for
/// the backward on the device (empty on the CPU, whose backward recomputes it).
pub fn target_logprobs(
    hidden: &Tensor,
    head: &LinearWeight,
    targets: &[u32],
) -> Result<(Tensor, Tensor)> {
    if hidden.is_cuda() {
        return dev::target_logprobs(hidden, head, targets);
    }
    const CHUNK: usize = 256;
    let h = hidden.cols();
    let v = head.out_features();
    let mut out = vec![0.0; targets.len()];
    for (ci, chunk) in targets.chunks(CHUNK).enumerate() {
        let start = ci * CHUNK;
        let rows = &hidden.cpu()[start * h..(start + chunk.len()) * h];
        let logits = linear_rows(rows, chunk.len(), head);
        cpu::log_softmax_rows_at(&logits, v, chunk, &mut out[start..start + chunk.len()]);
    }
    Ok((Tensor::from_vec(out, &[targets.len()]), Tensor::zeros(&[0])))
}

/// `target_logprobs` for a training forward, plus each row's gradient of its own
/// log-prob, `∂logp_i/∂hidden_i = (onehot(t_i) − softmax_i)·head` `[rows, H]`: the
/// backward is then `scale_rows(grad, dlogp)`, with no second pass through the lm_head.
pub fn target_logprobs_and_grad(
    hidden: &Tensor,
    head: &LinearWeight,
    targets: &[u32],
) -> Result<(Tensor, Tensor)> {
    if hidden.is_cuda() {
        return dev::target_logprobs_and_grad(hidden, head, targets);
    }
    let (lp, lse) = target_logprobs(hidden, head, targets)?;
    let ones = Tensor::from_vec(vec![1.0; targets.len()], &[targets.len()]);
    let grad = target_logprobs_backward(hidden, head, targets, &lse, &ones)?;
    Ok((lp, grad))
}

/// `out[r, :] = scale[r] · x[r, :]` (`scale`: f32 `[rows]`, host or device).
pub fn scale_rows(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if scale.numel() != x.rows() {
        return Err(crate::error::bad(
            "internal: scale_rows needs one scale per row",
        ));
    }
    if x.is_cuda() {
        return dev::scale_rows(x, scale);
    }
    let c = x.cols();
    let mut out = x.cpu().to_vec();
    for (row, &g) in out.chunks_mut(c.max(1)).zip(scale.cpu()) {
        row.iter_mut().for_each(|v| *v *= g);
    }
    Ok(Tensor::from_vec(out, &x.shape))
}

/// RMSNorm input gradient (weights frozen).
pub fn rmsnorm_backward(dy: &Tensor, x: &Tensor, weight: &Tensor, rstd: &Tensor) -> Result<Tensor> {
    if dy.is_cuda() {
        return dev::rmsnorm_backward(dy, x, weight, rstd);
    }
    let mut dx = vec![0.0; x.numel()];
    cpu::rmsnorm_backward(dy.cpu(), x.cpu(), weight.cpu(), rstd.cpu(), &mut dx);
    Ok(Tensor::from_vec(dx, &x.shape))
}

/// `dx += rmsnorm_backward(dy, x, weight, rstd)`: a residual stream's gradient (held in
/// `dx`) plus the gradient through the norm on its branch.
pub fn rmsnorm_backward_acc_(
    dx: &mut Tensor,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    if dy.is_cuda() {
        return dev::rmsnorm_backward_acc_(dx, dy, x, weight, rstd);
    }
    let d = rmsnorm_backward(dy, x, weight, rstd)?;
    add_(dx, &d)
}

/// Attention backward: (dQ, dK, dV) from the forward's inputs, output and lse.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
    pack: &Packing,
    shape: AttnShape,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(x) = pack.prefixes() {
        return attention_backward_shared(q, k, v, o, d_o, lse, x, shape);
    }
    if q.is_cuda() {
        return dev::attention_backward(q, k, v, o, d_o, lse, pack, shape);
    }
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; q.numel()],
        vec![0.0; k.numel()],
        vec![0.0; v.numel()],
    );
    cpu::attention_backward(
        q.cpu(),
        k.cpu(),
        v.cpu(),
        o.cpu(),
        d_o.cpu(),
        lse.cpu(),
        pack,
        shape,
        &mut dq,
        &mut dk,
        &mut dv,
    );
    Ok((
        Tensor::from_vec(dq, &q.shape),
        Tensor::from_vec(dk, &k.shape),
        Tensor::from_vec(dv, &v.shape),
    ))
}

/// SwiGLU backward: (d gate, d up).
pub fn swiglu_backward(dout: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    if dout.is_cuda() {
        return dev::swiglu_backward(dout, gate, up);
    }
    let (mut dg, mut du) = (vec![0.0; gate.numel()], vec![0.0; up.numel()]);
    cpu::swiglu_backward(dout.cpu(), gate.cpu(), up.cpu(), &mut dg, &mut du);
    Ok((
        Tensor::from_vec(dg, &gate.shape),
        Tensor::from_vec(du, &up.shape),
    ))
}

/// Backward of `target_logprobs`: given `dlogp[i] = ∂L/∂ log p(targets[i])` (f32
/// `[targets]`, host or device), returns ∂L/∂hidden for those rows:
/// `(dlogp_i · (onehot − softmax_i)) · head`. Logits are recomputed chunk by chunk, never
/// stored whole. `lse` is what the forward returned.
pub fn target_logprobs_backward(
    hidden: &Tensor,
    head: &LinearWeight,
    targets: &[u32],
    lse: &Tensor,
    dlogp: &Tensor,
) -> Result<Tensor> {
    if dlogp.numel() != targets.len() {
        return Err(crate::error::bad(
            "internal: target_logprobs_backward needs one dlogp per target",
        ));
    }
    if hidden.is_cuda() {
        return dev::target_logprobs_backward(hidden, head, targets, lse, dlogp);
    }
    const CHUNK: usize = 256;
    let h = hidden.cols();
    let v = head.out_features();
    let mut out = Vec::with_capacity(hidden.numel());
    for (ci, chunk) in targets.chunks(CHUNK).enumerate() {
        let start = ci * CHUNK;
        let rows = &hidden.cpu()[start * h..(start + chunk.len()) * h];
        let mut logits = linear_rows(rows, chunk.len(), head);
        let g = &dlogp.cpu()[start..start + chunk.len()];
        cpu::log_softmax_rows_at_backward(&mut logits, v, chunk, g);
        let logits = Tensor::from_vec(logits, &[chunk.len(), v]);
        out.extend_from_slice(linear_backward(&logits, head)?.cpu());
    }
    Ok(Tensor::from_vec(out, &[targets.len(), h]))
}

/// Per-segment sums of `x` (f32 `[Σ counts]`, segments in order), accumulated in f64 and
/// stored f32 on `x`'s device; with `mean`, divided by the count (an empty segment gives
/// 0). Sequence log-probs from per-token ones: sums for SFT and DPO, means for IPO.
pub fn segment_sums(x: &Tensor, counts: &[usize], mean: bool) -> Result<Tensor> {
    if x.numel() != counts.iter().sum::<usize>() {
        return Err(crate::error::bad(
            "internal: segment_sums counts do not cover the values",
        ));
    }
    if x.is_cuda() {
        return dev::segment_sums(x, counts, mean);
    }
    let mut at = 0;
    let out = counts
        .iter()
        .map(|&n| {
            let s: f64 = x.cpu()[at..at + n].iter().map(|&v| v as f64).sum();
            at += n;
            (if mean && n > 0 { s / n as f64 } else { s }) as f32
        })
        .collect();
    Ok(Tensor::from_vec(out, &[counts.len()]))
}

/// What [`dpo_loss`] gives: per pair, the loss and the rewards `β·(π − r)` (not divided
/// by `norm`), on the host for the metrics; and `dlogp`, ∂(Σ loss ÷ norm)/∂logp for
/// every policy token, on the policy's device for the backward.
pub struct DpoLoss {
    pub loss: Vec<f32>,
    pub reward_chosen: Vec<f32>,
    pub reward_rejected: Vec<f32>,
    pub dlogp: Tensor,
}

/// TRL's DPO loss (`train::loss::dpo_pair`, f64) for the pairs of sequences (chosen,
/// rejected, chosen, ...) whose policy and reference values are `policy`/`reference`
/// `[2·pairs]` (as [`segment_sums`] makes them) and whose tokens number `counts`. On the
/// device the loss and its per-token gradient never leave it; only the per-pair numbers
/// come back. `norm` is the step's loss denominator (its pairs).
pub fn dpo_loss(
    cfg: &DpoCfg,
    norm: f64,
    policy: &Tensor,
    reference: &Tensor,
    counts: &[usize],
) -> Result<DpoLoss> {
    let n = counts.len();
    if !n.is_multiple_of(2) || policy.numel() != n || reference.numel() != n {
        return Err(crate::error::bad(
            "internal: dpo_loss needs one policy and reference value per sequence of each pair",
        ));
    }
    if policy.is_cuda() {
        return dev::dpo_loss(cfg, norm, policy, reference, counts);
    }
    if reference.is_cuda() {
        return Err(crate::error::bad(
            "internal: dpo_loss with host policy values and device reference values",
        ));
    }
    let (pol, refs) = (policy.cpu(), reference.cpu());
    let mut out = DpoLoss {
        loss: Vec::with_capacity(n / 2),
        reward_chosen: Vec::with_capacity(n / 2),
        reward_rejected: Vec::with_capacity(n / 2),
        dlogp: Tensor::zeros(&[0]),
    };
    let mut dlogp = Vec::with_capacity(counts.iter().sum());
    for k in 0..n / 2 {
        let [pc, pr, rc, rr] =
            [pol[2 * k], pol[2 * k + 1], refs[2 * k], refs[2 * k + 1]].map(|v| v as f64);
        let pl = dpo_pair(cfg, pc, pr, rc, rr);
        out.loss.push(pl.loss as f32);
        out.reward_chosen.push((cfg.beta * (pc - rc)) as f32);
        out.reward_rejected.push((cfg.beta * (pr - rr)) as f32);
        for (which, d) in [(2 * k, pl.d_chosen), (2 * k + 1, pl.d_rejected)] {
            // IPO's π are per-token means, so each token gets 1/count of the gradient.
            let c = counts[which];
            let per_token = if cfg.kind == DpoKind::Ipo {
                d / c as f64
            } else {
                d
            } / norm;
            dlogp.extend(std::iter::repeat_n(per_token as f32, c));
        }
    }
    let len = dlogp.len();
    out.dlogp = Tensor::from_vec(dlogp, &[len]);
    Ok(out)
}

/// Copies row `src_rows[i]` of `src` into row `dst_rows[i]` of `dst` (KV-cache writes).
pub fn copy_rows(
    dst: &mut Tensor,
    dst_rows: &[usize],
    src: &Tensor,
    src_rows: &[usize],
) -> Result<()> {
    if dst.is_cuda() {
        return dev::copy_rows(dst, dst_rows, src, src_rows);
    }
    let h = dst.cols();
    let (d, s) = (dst.cpu_mut(), src.cpu());
    for (&r, &sr) in dst_rows.iter().zip(src_rows) {
        d[r * h..(r + 1) * h].copy_from_slice(&s[sr * h..(sr + 1) * h]);
    }
    Ok(())
}

/// The tensor's values in host memory (logits for sampling).
pub fn to_host(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.to_cpu()?.into_vec())
}

/// Adds row i of `src` into row `rows[i]` of `dst` (scatter-add; a row named several
/// times gets every addition, in order).
pub fn scatter_add_rows(dst: &mut Tensor, rows: &[usize], src: &Tensor) -> Result<()> {
    if dst.is_cuda() {
        return dev::scatter_add_rows(dst, rows, src);
    }
    let h = dst.cols();
    let d = dst.cpu_mut();
    for (i, &r) in rows.iter().enumerate() {
        for (a, b) in d[r * h..(r + 1) * h]
            .iter_mut()
            .zip(&src.cpu()[i * h..(i + 1) * h])
        {
            *a += b;
        }
    }
    Ok(())
}

// Encoder ops (the RoBERTa toxicity classifier), CPU only: that model never runs on the
// device.

/// `y[r] += bias` for every row of `y` (the bias of an `nn.Linear`).
pub fn add_bias_(y: &mut Tensor, bias: &Tensor) {
    cpu::add_bias(y.cpu_mut(), bias.cpu());
}

/// LayerNorm with weight and bias over the last dimension (encoder models).
pub fn layernorm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Tensor {
    let mut out = vec![0.0; x.numel()];
    cpu::layernorm_forward(x.cpu(), weight.cpu(), bias.cpu(), eps, &mut out);
    Tensor::from_vec(out, &x.shape)
}

/// Exact (erf) GELU in place.
pub fn gelu_(x: &mut Tensor) {
    cpu::gelu_inplace(x.cpu_mut());
}

/// tanh in place.
pub fn tanh_(x: &mut Tensor) {
    cpu::tanh_inplace(x.cpu_mut());
}

/// Bidirectional attention over packed sequences (an encoder's self-attention; each
/// sequence sees only itself, so no padding is needed). q/k/v `[tokens, H·d]`.
pub fn attention_bidir(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pack: &Packing,
    n_heads: usize,
    head_dim: usize,
) -> Tensor {
    let mut out = vec![0.0; q.numel()];
    cpu::attention_bidir_forward(q.cpu(), k.cpu(), v.cpu(), pack, n_heads, head_dim, &mut out);
    Tensor::from_vec(out, &q.shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row's first maximum, as `torch.argmax`: ties to the lower index, a row of
    /// −inf gives 0, the maximum found in the last column too, a NaN above everything.
    #[test]
    fn argmax_rows_takes_each_rows_first_maximum() {
        let ninf = f32::NEG_INFINITY;
        let x = Tensor::from_vec(
            vec![
                0.0, 3.0, 1.0, 3.0, //
                ninf, ninf, ninf, ninf, //
                -5.0, -4.0, -3.0, -2.0, //
                7.0, 7.0, 7.0, 7.0,
            ],
            &[4, 4],
        );
        assert_eq!(argmax_rows(&x).unwrap(), vec![1, 0, 3, 0]);
        let nan = f32::NAN;
        let x = Tensor::from_vec(vec![1.0, nan, 9.0, nan, f32::INFINITY, 2.0], &[2, 3]);
        assert_eq!(argmax_rows(&x).unwrap(), vec![1, 0], "the first NaN wins");
        assert_eq!(
            argmax_rows(&Tensor::from_vec(Vec::new(), &[0, 4])).unwrap(),
            Vec::<u32>::new()
        );
    }

    /// Σ loss ÷ norm of `dpo_loss` over token log-probs `lp`, through `segment_sums`.
    fn total(cfg: &DpoCfg, lp: &[f32], refs: &Tensor, counts: &[usize], norm: f64) -> f64 {
        let mean = cfg.kind == DpoKind::Ipo;
        let pol = segment_sums(&Tensor::from_vec(lp.to_vec(), &[lp.len()]), counts, mean).unwrap();
        let d = dpo_loss(cfg, norm, &pol, refs, counts).unwrap();
        d.loss.iter().map(|&l| l as f64).sum::<f64>() / norm
    }

    /// The per-token gradient `dpo_loss` hands the backward is the derivative of the step's
    /// loss through the sequence reduction: central differences per token, for sigmoid
    /// (with label smoothing) and IPO (per-token means, so each token gets 1/count).
    #[test]
    fn dpo_token_gradient_matches_finite_differences() {
        let counts = [3usize, 5, 1, 4];
        let n: usize = counts.iter().sum();
        let lp: Vec<f32> = (0..n).map(|i| -0.5 - 0.37 * ((i * 7) % 5) as f32).collect();
        let refs = Tensor::from_vec(vec![-2.0, -3.5, -1.25, -1.5], &[4]);
        let norm = 2.0;
        let cases = [
            (DpoKind::Sigmoid, 0.3, 0.0),
            (DpoKind::Sigmoid, 0.1, 0.2),
            (DpoKind::Ipo, 0.5, 0.0),
        ];
        for (kind, beta, label_smoothing) in cases {
            let cfg = DpoCfg {
                beta,
                label_smoothing,
                kind,
            };
            let pol = segment_sums(
                &Tensor::from_vec(lp.clone(), &[n]),
                &counts,
                kind == DpoKind::Ipo,
            )
            .unwrap();
            let d = dpo_loss(&cfg, norm, &pol, &refs, &counts).unwrap();
            assert_eq!(d.dlogp.numel(), n);
            // f32 sequence values: a step well above their rounding.
            let h = 1e-2f32;
            for i in 0..n {
                let (mut up, mut down) = (lp.clone(), lp.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (total(&cfg, &up, &refs, &counts, norm)
                    - total(&cfg, &down, &refs, &counts, norm))
                    / (2.0 * h as f64);
                let got = d.dlogp.cpu()[i] as f64;
                assert!(
                    (fd - got).abs() < 1e-4 + 1e-3 * fd.abs(),
                    "{kind:?} β {beta} ls {label_smoothing} token {i}: {got} vs {fd}"
                );
            }
            // Rewards as TRL logs them: β·(π − r) per pair.
            let p = pol.cpu();
            assert!((d.reward_chosen[1] as f64 - beta * (p[2] as f64 + 1.25)).abs() < 1e-5);
            assert!((d.reward_rejected[0] as f64 - beta * (p[1] as f64 + 3.5)).abs() < 1e-5);
        }
    }

    #[test]
    fn segment_sums_reduce_each_segment_and_refuse_a_mismatch() {
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[6]);
        let s = segment_sums(&x, &[2, 0, 4], false).unwrap();
        assert_eq!(s.cpu(), &[3.0, 0.0, 18.0]);
        let m = segment_sums(&x, &[2, 0, 4], true).unwrap();
        assert_eq!(m.cpu(), &[1.5, 0.0, 4.5]);
        assert!(segment_sums(&x, &[2, 3], false).is_err());
        let one = Tensor::from_vec(vec![0.0; 3], &[3]);
        let cfg = DpoCfg {
            beta: 0.1,
            label_smoothing: 0.0,
            kind: DpoKind::Sigmoid,
        };
        assert!(dpo_loss(&cfg, 1.0, &one, &one, &[1, 1, 1]).is_err());
    }

    /// A prefix of 3 shared by two branches, a plain sequence, a prefix of 2 shared by
    /// three branches; GQA 4:2 and a window of 3, shorter than the sequences.
    fn shared_case() -> (Packing, Vec<Vec<usize>>, AttnShape) {
        let groups = [
            Group {
                prefix: 3,
                branches: vec![4, 2],
            },
            Group {
                prefix: 0,
                branches: vec![5],
            },
            Group {
                prefix: 2,
                branches: vec![1, 3, 2],
            },
        ];
        // The packed rows of each whole sequence, written out by hand.
        let seqs = vec![
            vec![0, 1, 2, 3, 4, 5, 6],
            vec![0, 1, 2, 7, 8],
            vec![9, 10, 11, 12, 13],
            vec![14, 15, 16],
            vec![14, 15, 17, 18, 19],
            vec![14, 15, 20, 21],
        ];
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            window: Some(3),
        };
        (Packing::with_prefixes(&groups), seqs, shape)
    }

    fn rows_of(x: &[f32], rows: &[usize], w: usize) -> Vec<f32> {
        rows.iter()
            .flat_map(|&r| x[r * w..(r + 1) * w].to_vec())
            .collect()
    }

    /// Every packed row's attention output over shared prefixes is its output in its own
    /// whole sequence, attended alone (positions, window and causality as if unshared).
    #[test]
    fn attention_over_shared_prefixes_matches_each_sequence_alone() {
        let (pack, seqs, shape) = shared_case();
        let t = pack.n_tokens();
        assert_eq!(t, 22);
        let (q, k, v) = (cpu::lcg(t * 16, 1), cpu::lcg(t * 8, 2), cpu::lcg(t * 8, 3));
        let tq = |x: &[f32], w: usize| Tensor::from_vec(x.to_vec(), &[x.len() / w, w]);
        let (o, _) = attention(&tq(&q, 16), &tq(&k, 8), &tq(&v, 8), &pack, shape).unwrap();
        for rows in &seqs {
            let alone = Packing::from_lengths(&[rows.len()]);
            let (want, _) = attention(
                &tq(&rows_of(&q, rows, 16), 16),
                &tq(&rows_of(&k, rows, 8), 8),
                &tq(&rows_of(&v, rows, 8), 8),
                &alone,
                shape,
            )
            .unwrap();
            let got = rows_of(o.cpu(), rows, 16);
            for (a, b) in got.iter().zip(want.cpu()) {
                assert!((a - b).abs() < 1e-6, "{rows:?}: {a} vs {b}");
            }
        }
    }

    /// The backward over shared prefixes against central differences of
    /// Σ c ∘ attention(q, k, v): a prefix row's dK/dV gather every branch's use of it.
    #[test]
    fn attention_backward_over_shared_prefixes_matches_finite_differences() {
        let (pack, _, shape) = shared_case();
        let t = pack.n_tokens();
        let (q, k, v) = (cpu::lcg(t * 16, 4), cpu::lcg(t * 8, 5), cpu::lcg(t * 8, 6));
        let c = cpu::lcg(t * 16, 7);
        let tq = |x: &[f32], w: usize| Tensor::from_vec(x.to_vec(), &[x.len() / w, w]);
        let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
            attention(&tq(q, 16), &tq(k, 8), &tq(v, 8), &pack, shape).unwrap()
        };
        let (o, lse) = fwd(&q, &k, &v);
        let (dq, dk, dv) = attention_backward(
            &tq(&q, 16),
            &tq(&k, 8),
            &tq(&v, 8),
            &o,
            &tq(&c, 16),
            &lse,
            &pack,
            shape,
        )
        .unwrap();
        let loss = |o: &Tensor| -> f64 {
            o.cpu()
                .iter()
                .zip(&c)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        let h = 1e-2f32;
        let check = |which: usize, x: &[f32], analytic: &Tensor| {
            for i in 0..x.len() {
                let at = |d: f32| {
                    let mut y = x.to_vec();
                    y[i] += d;
                    let o = match which {
                        0 => fwd(&y, &k, &v).0,
                        1 => fwd(&q, &y, &v).0,
                        _ => fwd(&q, &k, &y).0,
                    };
                    loss(&o)
                };
                let num = (at(h) - at(-h)) / (2.0 * h as f64);
                let a = analytic.cpu()[i] as f64;
                assert!(
                    (num - a).abs() < 2e-3 + 2e-2 * a.abs(),
                    "input {which}, element {i}: fd {num} vs analytic {a}"
                );
            }
        };
        check(0, &q, &dq);
        check(1, &k, &dk);
        check(2, &v, &dv);
    }
}
