//! The ops the model is written in. Each dispatches on the tensors' storage: today the
//! CPU reference (`backend::cpu::ops`); the CUDA backend adds its arm beside it.

use crate::backend::cpu::ops as cpu;
pub use crate::backend::cpu::ops::{AttnShape, Packing};
use crate::tensor::Tensor;
use std::sync::Arc;

/// A frozen projection weight `[out, in]` (PyTorch `nn.Linear` layout).
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// Widened to f32 on the CPU; shared (`Arc`) so tied embeddings are not copied.
    Dense(Arc<Tensor>),
}

impl LinearWeight {
    pub fn out_features(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.shape[0],
        }
    }
    pub fn in_features(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.shape[1],
        }
    }
}

/// `x · Wᵀ` for `x` of shape `[m, in]`.
pub fn linear(x: &Tensor, w: &LinearWeight) -> Tensor {
    let m = x.rows();
    let n = w.out_features();
    let mut out = vec![0.0; m * n];
    match w {
        LinearWeight::Dense(wt) => cpu::linear(x.cpu(), m, wt.cpu(), n, &mut out),
    }
    Tensor::from_vec(out, &[m, n])
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
    (Tensor::from_vec(out, &x.shape), Tensor::from_vec(rstd, &[rows]))
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
        Rope { cos, sin, positions }
    }
}

/// Rotate-half RoPE in place on `[tokens, heads·head_dim]`.
pub fn rope_(x: &mut Tensor, n_heads: usize, head_dim: usize, rope: &Rope) {
    cpu::rope_forward(x.cpu_mut(), n_heads, head_dim, &rope.positions, &rope.cos, &rope.sin);
}

/// Causal (optionally windowed) GQA attention over packed sequences; returns (out, lse).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pack: &Packing, shape: AttnShape) -> (Tensor, Tensor) {
    let t = q.rows();
    let mut out = vec![0.0; q.numel()];
    let mut lse = vec![0.0; t * shape.n_heads];
    cpu::attention_forward(q.cpu(), k.cpu(), v.cpu(), pack, shape, &mut out, &mut lse);
    (Tensor::from_vec(out, &q.shape), Tensor::from_vec(lse, &[t, shape.n_heads]))
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
    let mut out = Vec::with_capacity(targets.len());
    for (ci, chunk) in targets.chunks(CHUNK).enumerate() {
        let start = ci * CHUNK;
        let rows = &hidden.cpu()[start * h..(start + chunk.len()) * h];
        let logits = linear(&Tensor::from_vec(rows.to_vec(), &[chunk.len(), h]), head);
        for (i, &t) in chunk.iter().enumerate() {
            out.push(cpu::log_softmax_at(&logits.cpu()[i * v..(i + 1) * v], t as usize));
        }
    }
    out
}
