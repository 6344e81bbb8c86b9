//! The ops the model is written in. Each dispatches on the tensors' storage: today the
//! CPU reference (`backend::cpu::ops`); the CUDA backend adds its arm beside it.

use crate::backend::cpu::ops::{self as cpu, MatRef};
pub use crate::backend::cpu::ops::{AttnShape, Packing};
use crate::quant::Nf4Tensor;
use crate::tensor::Tensor;
use std::sync::Arc;

/// A frozen projection weight `[out, in]` (PyTorch `nn.Linear` layout).
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// Widened to f32 on the CPU; shared (`Arc`) so tied embeddings are not copied.
    Dense(Arc<Tensor>),
    /// bitsandbytes NF4; the CPU backend dequantizes it for each product (QLoRA base).
    Nf4(Arc<Nf4Tensor>),
}

impl LinearWeight {
    pub fn out_features(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.shape[0],
            LinearWeight::Nf4(q) => q.shape[0],
        }
    }
    pub fn in_features(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.shape[1],
            LinearWeight::Nf4(q) => q.shape[1],
        }
    }

    /// The weight as f32 (dequantized for NF4), borrowed when it already is.
    fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            LinearWeight::Dense(t) => f(t.cpu()),
            LinearWeight::Nf4(q) => f(&q.dequantize()),
        }
    }
}

/// `x · Wᵀ` for `x` of shape `[m, in]`.
pub fn linear(x: &Tensor, w: &LinearWeight) -> Tensor {
    let m = x.rows();
    Tensor::from_vec(linear_rows(x.cpu(), m, w), &[m, w.out_features()])
}

/// `x · Wᵀ` for `m` rows of `in` values in a plain slice.
fn linear_rows(x: &[f32], m: usize, w: &LinearWeight) -> Vec<f32> {
    let (n, k) = (w.out_features(), w.in_features());
    w.with_f32(|wt| cpu::gemm_new(MatRef::new(x, m, k), MatRef::new(wt, n, k).t(), 1.0))
}

/// Input gradient of a frozen projection: `dX = dY · W` (`[m, out]` → `[m, in]`).
pub fn linear_backward(dy: &Tensor, w: &LinearWeight) -> Tensor {
    let (m, n, k) = (dy.rows(), w.out_features(), w.in_features());
    let out =
        w.with_f32(|wt| cpu::gemm_new(MatRef::new(dy.cpu(), m, n), MatRef::new(wt, n, k), 1.0));
    Tensor::from_vec(out, &[m, k])
}

/// `x · aᵀ` for two plain tensors (`[m, k]`, `[n, k]`); the LoRA products.
pub fn matmul_t(x: &Tensor, a: &Tensor) -> Tensor {
    let (m, n, k) = (x.rows(), a.rows(), a.cols());
    let out = cpu::gemm_new(
        MatRef::new(x.cpu(), m, k),
        MatRef::new(a.cpu(), n, k).t(),
        1.0,
    );
    Tensor::from_vec(out, &[m, n])
}

/// `x · a` for `[m, k]` and `[k, n]`.
pub fn matmul(x: &Tensor, a: &Tensor) -> Tensor {
    let (m, k, n) = (x.rows(), a.rows(), a.cols());
    let out = cpu::gemm_new(MatRef::new(x.cpu(), m, k), MatRef::new(a.cpu(), k, n), 1.0);
    Tensor::from_vec(out, &[m, n])
}

/// `g += alpha · aᵀ · b` for `a` `[m, p]`, `b` `[m, q]`, `g` `[p, q]` (weight gradients).
pub fn add_at_b_(g: &mut Tensor, a: &Tensor, b: &Tensor, alpha: f32) {
    let (m, p, q) = (a.rows(), a.cols(), b.cols());
    cpu::gemm(
        MatRef::new(a.cpu(), m, p).t(),
        MatRef::new(b.cpu(), m, q),
        g.cpu_mut(),
        alpha,
        1.0,
    );
}

/// `y += alpha · x`.
pub fn axpy_(y: &mut Tensor, alpha: f32, x: &Tensor) {
    cpu::axpy(y.cpu_mut(), alpha, x.cpu());
}

/// `x ∘ m` elementwise (dropout masks).
pub fn mul(x: &Tensor, m: &Tensor) -> Tensor {
    Tensor::from_vec(
        x.cpu().iter().zip(m.cpu()).map(|(a, b)| a * b).collect(),
        &x.shape,
    )
}

/// Rows of an embedding table `[vocab, hidden]`.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Tensor {
    let h = table.cols();
    let mut out = vec![0.0; ids.len() * h];
    cpu::embedding(table.cpu(), h, ids, &mut out);
    Tensor::from_vec(out, &[ids.len(), h])
}

/// RMSNorm over the last dimension; returns (output, rstd per row).
pub fn rmsnorm(x: &Tensor, weight: &Tensor, eps: f32) -> (Tensor, Tensor) {
    let rows = x.numel() / weight.numel();
    let mut out = vec![0.0; x.numel()];
    let mut rstd = vec![0.0; rows];
    cpu::rmsnorm_forward(x.cpu(), weight.cpu(), eps, &mut out, &mut rstd);
    (
        Tensor::from_vec(out, &x.shape),
        Tensor::from_vec(rstd, &[rows]),
    )
}

/// Precomputed RoPE angles for the positions of one batch.
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub positions: Vec<u32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, positions: Vec<u32>) -> Self {
        let max_pos = positions.iter().max().map_or(0, |p| *p as usize + 1);
        let (cos, sin) = cpu::rope_tables(head_dim, theta, max_pos);
        Rope {
            cos,
            sin,
            positions,
        }
    }
}

/// Rotate-half RoPE in place on `[tokens, heads·head_dim]`.
pub fn rope_(x: &mut Tensor, n_heads: usize, head_dim: usize, rope: &Rope) {
    cpu::rope_forward(
        x.cpu_mut(),
        n_heads,
        head_dim,
        &rope.positions,
        &rope.cos,
        &rope.sin,
    );
}

/// Causal (optionally windowed) GQA attention over packed sequences; returns (out, lse).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pack: &Packing,
    shape: AttnShape,
) -> (Tensor, Tensor) {
    let t = q.rows();
    let mut out = vec![0.0; q.numel()];
    let mut lse = vec![0.0; t * shape.n_heads];
    cpu::attention_forward(q.cpu(), k.cpu(), v.cpu(), pack, shape, &mut out, &mut lse);
    (
        Tensor::from_vec(out, &q.shape),
        Tensor::from_vec(lse, &[t, shape.n_heads]),
    )
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
) -> Tensor {
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
    Tensor::from_vec(out, &q.shape)
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Tensor {
    let mut out = vec![0.0; gate.numel()];
    cpu::swiglu_forward(gate.cpu(), up.cpu(), &mut out);
    Tensor::from_vec(out, &gate.shape)
}

/// `y += x`.
pub fn add_(y: &mut Tensor, x: &Tensor) {
    cpu::add_inplace(y.cpu_mut(), x.cpu());
}

/// Select rows of a 2-D tensor.
pub fn gather_rows(x: &Tensor, rows: &[usize]) -> Tensor {
    let h = x.cols();
    let src = x.cpu();
    let mut out = Vec::with_capacity(rows.len() * h);
    for &r in rows {
        out.extend_from_slice(&src[r * h..(r + 1) * h]);
    }
    Tensor::from_vec(out, &[rows.len(), h])
}

/// Log-probabilities of `targets[i]` under `softmax(hidden[i] · headᵀ)`, computed in
/// chunks of rows so the full tokens × vocab logits never exist at once.
pub fn target_logprobs(hidden: &Tensor, head: &LinearWeight, targets: &[u32]) -> Vec<f32> {
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
    out
}

/// RMSNorm input gradient (weights frozen).
pub fn rmsnorm_backward(dy: &Tensor, x: &Tensor, weight: &Tensor, rstd: &Tensor) -> Tensor {
    let mut dx = vec![0.0; x.numel()];
    cpu::rmsnorm_backward(dy.cpu(), x.cpu(), weight.cpu(), rstd.cpu(), &mut dx);
    Tensor::from_vec(dx, &x.shape)
}

/// RoPE backward in place (rotation by −angle).
pub fn rope_backward_(dx: &mut Tensor, n_heads: usize, head_dim: usize, rope: &Rope) {
    cpu::rope_backward(
        dx.cpu_mut(),
        n_heads,
        head_dim,
        &rope.positions,
        &rope.cos,
        &rope.sin,
    );
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
) -> (Tensor, Tensor, Tensor) {
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
    (
        Tensor::from_vec(dq, &q.shape),
        Tensor::from_vec(dk, &k.shape),
        Tensor::from_vec(dv, &v.shape),
    )
}

/// SwiGLU backward: (d gate, d up).
pub fn swiglu_backward(dout: &Tensor, gate: &Tensor, up: &Tensor) -> (Tensor, Tensor) {
    let (mut dg, mut du) = (vec![0.0; gate.numel()], vec![0.0; up.numel()]);
    cpu::swiglu_backward(dout.cpu(), gate.cpu(), up.cpu(), &mut dg, &mut du);
    (
        Tensor::from_vec(dg, &gate.shape),
        Tensor::from_vec(du, &up.shape),
    )
}

/// Backward of `target_logprobs`: given `dlogp[i] = ∂L/∂ log p(targets[i])`, returns
/// ∂L/∂hidden for those rows: `(dlogp_i · (onehot − softmax_i)) · head`. Logits are
/// recomputed chunk by chunk, never stored whole.
pub fn target_logprobs_backward(
    hidden: &Tensor,
    head: &LinearWeight,
    targets: &[u32],
    dlogp: &[f32],
) -> Tensor {
    const CHUNK: usize = 256;
    let h = hidden.cols();
    let v = head.out_features();
    let mut out = Vec::with_capacity(hidden.numel());
    for (ci, chunk) in targets.chunks(CHUNK).enumerate() {
        let start = ci * CHUNK;
        let rows = &hidden.cpu()[start * h..(start + chunk.len()) * h];
        let mut logits = linear_rows(rows, chunk.len(), head);
        let g = &dlogp[start..start + chunk.len()];
        cpu::log_softmax_rows_at_backward(&mut logits, v, chunk, g);
        let logits = Tensor::from_vec(logits, &[chunk.len(), v]);
        out.extend_from_slice(linear_backward(&logits, head).cpu());
    }
    Tensor::from_vec(out, &[targets.len(), h])
}

/// Copies row `src_rows[i]` of `src` into row `dst_rows[i]` of `dst` (KV-cache writes).
pub fn copy_rows(dst: &mut Tensor, dst_rows: &[usize], src: &Tensor, src_rows: &[usize]) {
    let h = dst.cols();
    let (d, s) = (dst.cpu_mut(), src.cpu());
    for (&r, &sr) in dst_rows.iter().zip(src_rows) {
        d[r * h..(r + 1) * h].copy_from_slice(&s[sr * h..(sr + 1) * h]);
    }
}

/// The tensor's values in host memory (logits for sampling).
pub fn to_host(x: &Tensor) -> Vec<f32> {
    x.cpu().to_vec()
}

/// Adds rows of `src` into rows `rows` of `dst` (scatter-add).
pub fn scatter_add_rows(dst: &mut Tensor, rows: &[usize], src: &Tensor) {
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
}

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
