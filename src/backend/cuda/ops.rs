//! Kernel launchers: one function per kernel in kernels/*.cu. Each checks the shapes
//! against the buffer lengths (the kernels trust them), fills the kernel's params struct
//! from kernels/params.h and queues the launch on the device's stream.
//!
//! The math each kernel implements is written at the top of its .cu file; the CPU
//! references are `backend::cpu::ops` and `backend::cpu::optim`.

use cudarc::driver::DeviceRepr;
use half::bf16;

use super::launch::{flat_grid, need, rows_of, to_i32, to_u32};
use super::params::*;
use super::{DeviceBuffer, Gpu};
use crate::backend::cpu::optim::AdamWScalars;
use crate::error::{bad, Result};

// SAFETY: bindgen's #[repr(C)] translations of kernels/params.h, made of u64/i32/f32
// fields without padding (bytemuck::Pod is derived, which checks that); each is the
// kernel's only argument, passed by value.
unsafe impl DeviceRepr for EmbeddingParams {}
unsafe impl DeviceRepr for RmsNormForwardParams {}
unsafe impl DeviceRepr for RmsNormBackwardParams {}
unsafe impl DeviceRepr for RopeParams {}
unsafe impl DeviceRepr for SwigluForwardParams {}
unsafe impl DeviceRepr for SwigluBackwardParams {}
unsafe impl DeviceRepr for AdamWParams {}
unsafe impl DeviceRepr for GradNormParams {}
unsafe impl DeviceRepr for CastBf16ToF32Params {}
unsafe impl DeviceRepr for CastF32ToBf16Params {}

/// Threads per block for every kernel here (a multiple of 32, as block_sum needs; the
/// same as the flat kernels' `launch::FLAT_BLOCK`).
const BLOCK: u32 = super::launch::FLAT_BLOCK;
/// Elements per TensorChunk in the multi-tensor kernels (one block each). A multiple of
/// 4, so chunk starts keep the 16-byte alignment of the tensors.
pub const CHUNK: usize = 16384;

/// `out[t, :] = table[ids[t], :]`; table is `[vocab, hidden]`, out `[ids.len(), hidden]`.
pub fn embedding_forward(
    gpu: &Gpu,
    table: &DeviceBuffer<bf16>,
    hidden: usize,
    ids: &DeviceBuffer<u32>,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    if hidden == 0 || !table.len().is_multiple_of(hidden) {
        return Err(bad(format!(
            "embedding: table of {} is not [vocab, {hidden}]",
            table.len()
        )));
    }
    need(out, ids.len() * hidden, "embedding out")?;
    let p = EmbeddingParams {
        out: out.ptr(),
        table: table.ptr(),
        ids: ids.ptr(),
        n_tokens: to_i32(ids.len(), "tokens")?,
        hidden: to_i32(hidden, "hidden")?,
        vocab: to_i32(table.len() / hidden, "vocab")?,
        _pad: 0,
    };
    gpu.launch(
        "embedding_forward_bf16",
        to_u32(ids.len(), "tokens")?,
        BLOCK,
        &p,
    )
}

/// RMSNorm forward over rows of `weight.len()`; saves f32 `rstd` per row when given.
pub fn rmsnorm_forward(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    weight: &DeviceBuffer<bf16>,
    eps: f32,
    y: &mut DeviceBuffer<bf16>,
    rstd: Option<&mut DeviceBuffer<f32>>,
) -> Result<()> {
    let rows = rows_of(x.len(), weight.len(), "rmsnorm")?;
    need(y, x.len(), "rmsnorm y")?;
    let rstd_ptr = match rstd {
        Some(r) => {
            need(r, rows, "rmsnorm rstd")?;
            r.ptr()
        }
        None => 0,
    };
    let p = RmsNormForwardParams {
        y: y.ptr(),
        rstd: rstd_ptr,
        x: x.ptr(),
        weight: weight.ptr(),
        rows: to_i32(rows, "rows")?,
        cols: to_i32(weight.len(), "cols")?,
        eps,
        _pad: 0,
    };
    gpu.launch("rmsnorm_forward_bf16", to_u32(rows, "rows")?, BLOCK, &p)
}

/// RMSNorm backward for the input: `dx = ...` or, with `accumulate`, `dx += ...`.
pub fn rmsnorm_backward(
    gpu: &Gpu,
    dy: &DeviceBuffer<bf16>,
    x: &DeviceBuffer<bf16>,
    weight: &DeviceBuffer<bf16>,
    rstd: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<bf16>,
    accumulate: bool,
) -> Result<()> {
    let rows = rows_of(x.len(), weight.len(), "rmsnorm backward")?;
    need(dy, x.len(), "rmsnorm dy")?;
    need(dx, x.len(), "rmsnorm dx")?;
    need(rstd, rows, "rmsnorm rstd")?;
    let p = RmsNormBackwardParams {
        dx: dx.ptr(),
        dy: dy.ptr(),
        x: x.ptr(),
        weight: weight.ptr(),
        rstd: rstd.ptr(),
        rows: to_i32(rows, "rows")?,
        cols: to_i32(weight.len(), "cols")?,
        accumulate: accumulate as i32,
        _pad: 0,
    };
    gpu.launch("rmsnorm_backward_bf16", to_u32(rows, "rows")?, BLOCK, &p)
}

/// RoPE cos/sin tables on the device, `[max_pos, head_dim/2]` each, f32.
pub struct RopeTables {
    pub cos: DeviceBuffer<f32>,
    pub sin: DeviceBuffer<f32>,
    pub head_dim: usize,
    pub max_pos: usize,
}

impl RopeTables {
    /// The CPU reference's tables (`cpu::ops::rope_tables`), uploaded.
    pub fn new(gpu: &Gpu, head_dim: usize, theta: f32, max_pos: usize) -> Result<RopeTables> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "rope: head_dim {head_dim} must be even and > 0"
            )));
        }
        let (cos, sin) = crate::backend::cpu::ops::rope_tables(head_dim, theta, max_pos);
        Ok(RopeTables {
            cos: gpu.upload(&cos)?,
            sin: gpu.upload(&sin)?,
            head_dim,
            max_pos,
        })
    }
}

/// Q `[tokens, n_q_heads*head_dim]` and K `[tokens, n_kv_heads*head_dim]`, rotated in place.
pub struct RopeArgs<'a> {
    pub q: &'a mut DeviceBuffer<bf16>,
    pub k: &'a mut DeviceBuffer<bf16>,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub positions: &'a DeviceBuffer<u32>,
}

fn rope(gpu: &Gpu, a: RopeArgs<'_>, t: &RopeTables, kernel: &str) -> Result<()> {
    let d = t.head_dim;
    let n_tokens = a.positions.len();
    need(a.q, n_tokens * a.n_q_heads * d, "rope q")?;
    need(a.k, n_tokens * a.n_kv_heads * d, "rope k")?;
    let p = RopeParams {
        q: a.q.ptr(),
        k: a.k.ptr(),
        positions: a.positions.ptr(),
        cos: t.cos.ptr(),
        sin: t.sin.ptr(),
        n_tokens: to_i32(n_tokens, "tokens")?,
        n_q_heads: to_i32(a.n_q_heads, "q heads")?,
        n_kv_heads: to_i32(a.n_kv_heads, "kv heads")?,
        head_dim: to_i32(d, "head_dim")?,
        q_stride: to_i32(a.n_q_heads * d, "q row")?,
        k_stride: to_i32(a.n_kv_heads * d, "k row")?,
        max_pos: to_i32(t.max_pos, "max_pos")?,
        _pad: 0,
    };
    gpu.launch(kernel, to_u32(n_tokens, "tokens")?, BLOCK, &p)
}

/// RoPE forward on Q and K in one launch. Positions must be `< tables.max_pos`
/// (rows with larger positions are left unchanged).
pub fn rope_forward(gpu: &Gpu, args: RopeArgs<'_>, tables: &RopeTables) -> Result<()> {
    rope(gpu, args, tables, "rope_forward_bf16")
}

/// RoPE backward (rotation by −angle) on dQ and dK in place.
pub fn rope_backward(gpu: &Gpu, args: RopeArgs<'_>, tables: &RopeTables) -> Result<()> {
    rope(gpu, args, tables, "rope_backward_bf16")
}

/// `out = silu(gate) * up`, elementwise (HF cast order, see kernels/swiglu.cu).
pub fn swiglu_forward(
    gpu: &Gpu,
    gate: &DeviceBuffer<bf16>,
    up: &DeviceBuffer<bf16>,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let n = gate.len();
    need(up, n, "swiglu up")?;
    need(out, n, "swiglu out")?;
    let p = SwigluForwardParams {
        out: out.ptr(),
        gate: gate.ptr(),
        up: up.ptr(),
        n: n as i64,
    };
    gpu.launch("swiglu_forward_bf16", flat_grid(gpu, n), BLOCK, &p)
}

/// SwiGLU backward: `dgate`, `dup` from `dout`, `gate`, `up`.
pub fn swiglu_backward(
    gpu: &Gpu,
    dout: &DeviceBuffer<bf16>,
    gate: &DeviceBuffer<bf16>,
    up: &DeviceBuffer<bf16>,
    dgate: &mut DeviceBuffer<bf16>,
    dup: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let n = gate.len();
    need(dout, n, "swiglu dout")?;
    need(up, n, "swiglu up")?;
    need(dgate, n, "swiglu dgate")?;
    need(dup, n, "swiglu dup")?;
    let p = SwigluBackwardParams {
        dgate: dgate.ptr(),
        dup: dup.ptr(),
        dout: dout.ptr(),
        gate: gate.ptr(),
        up: up.ptr(),
        n: n as i64,
    };
    gpu.launch("swiglu_backward_bf16", flat_grid(gpu, n), BLOCK, &p)
}

/// bf16 → f32 (exact), over `input.len()` elements.
pub fn cast_bf16_to_f32(
    gpu: &Gpu,
    input: &DeviceBuffer<bf16>,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = input.len();
    need(out, n, "cast out")?;
    let p = CastBf16ToF32Params {
        out: out.ptr(),
        in_: input.ptr(),
        n: n as i64,
    };
    gpu.launch("cast_bf16_to_f32", flat_grid(gpu, n), BLOCK, &p)
}

/// f32 → bf16, round to nearest even, over `input.len()` elements.
pub fn cast_f32_to_bf16(
    gpu: &Gpu,
    input: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let n = input.len();
    need(out, n, "cast out")?;
    let p = CastF32ToBf16Params {
        out: out.ptr(),
        in_: input.ptr(),
        n: n as i64,
    };
    gpu.launch("cast_f32_to_bf16", flat_grid(gpu, n), BLOCK, &p)
}

/// The device copy of a TensorChunk table, re-uploaded only when the tensors change
/// (so a training step neither allocates nor copies it).
#[derive(Default)]
struct ChunkTable {
    host: Vec<TensorChunk>,
    dev: Option<DeviceBuffer<TensorChunk>>,
}

impl ChunkTable {
    fn sync(&mut self, gpu: &Gpu, chunks: Vec<TensorChunk>) -> Result<u64> {
        let same = self.dev.is_some()
            && chunks.len() == self.host.len()
            && bytemuck::cast_slice::<_, u8>(&chunks) == bytemuck::cast_slice::<_, u8>(&self.host);
        if !same {
            let dev = match self.dev.take() {
                Some(mut d) if d.len() == chunks.len() => {
                    gpu.copy_to_device(&chunks, &mut d)?;
                    d
                }
                _ => gpu.upload(&chunks)?,
            };
            self.dev = Some(dev);
            self.host = chunks;
        }
        Ok(self.dev.as_ref().map_or(0, |d| d.ptr()))
    }
}

/// Split one tensor (and its optional state) into CHUNK-sized pieces.
fn push_chunks(out: &mut Vec<TensorChunk>, n: usize, param: u64, grad: u64, m: u64, v: u64) {
    let at = |base: u64, i: usize| if base == 0 { 0 } else { base + 4 * i as u64 };
    for start in (0..n).step_by(CHUNK) {
        out.push(TensorChunk {
            param: at(param, start),
            grad: at(grad, start),
            m: at(m, start),
            v: at(v, start),
            n: (n - start).min(CHUNK) as i64,
        });
    }
}

/// Global L2 norm of many gradient tensors and the clip_grad_norm_ coefficient, kept
/// on the device (`out[0]` = total norm, `out[1]` = min(1, max_norm/(total+1e-6))).
pub struct GradNorm {
    table: ChunkTable,
    partial: Option<DeviceBuffer<f32>>,
    out: DeviceBuffer<f32>,
}

impl GradNorm {
    pub fn new(gpu: &Gpu) -> Result<GradNorm> {
        Ok(GradNorm {
            table: ChunkTable::default(),
            partial: None,
            out: gpu.zeros(2)?,
        })
    }

    /// Compute the norm and coefficient; with `apply`, also scale the grads in place
    /// (otherwise pass `Some(&self)` to [`FusedAdamW::step`] to scale inside AdamW).
    pub fn compute(
        &mut self,
        gpu: &Gpu,
        grads: &mut [&mut DeviceBuffer<f32>],
        max_norm: f32,
        apply: bool,
    ) -> Result<()> {
        let mut chunks = Vec::new();
        for g in grads.iter() {
            push_chunks(&mut chunks, g.len(), 0, g.ptr(), 0, 0);
        }
        let n_chunks = chunks.len();
        let table = self.table.sync(gpu, chunks)?;
        if self
            .partial
            .as_ref()
            .is_none_or(|p| p.len() < n_chunks.max(1))
        {
            self.partial = Some(gpu.alloc(n_chunks.max(1))?);
        }
        let partial = self.partial.as_ref().map_or(0, |p| p.ptr());
        let p = GradNormParams {
            chunks: table,
            partial,
            out: self.out.ptr(),
            n_chunks: to_i32(n_chunks, "chunks")?,
            max_norm,
        };
        let grid = to_u32(n_chunks, "chunks")?;
        gpu.launch("grad_norm_partial_f32", grid, BLOCK, &p)?;
        gpu.launch("grad_norm_finalize_f32", 1, 1024, &p)?;
        if apply {
            gpu.launch("grad_clip_apply_f32", grid, BLOCK, &p)?;
        }
        Ok(())
    }

    /// (total norm, clip coefficient) from the last `compute`; waits for the device.
    pub fn read(&self, gpu: &Gpu) -> Result<(f32, f32)> {
        let v = gpu.download(&self.out)?;
        Ok((v[0], v[1]))
    }
}

/// One adapter tensor and its AdamW state, all f32 and the same length.
pub struct AdamWTensor<'a> {
    pub param: &'a mut DeviceBuffer<f32>,
    pub grad: &'a DeviceBuffer<f32>,
    pub m: &'a mut DeviceBuffer<f32>,
    pub v: &'a mut DeviceBuffer<f32>,
}

/// AdamW over every adapter tensor in one launch (torch.optim.AdamW semantics).
#[derive(Default)]
pub struct FusedAdamW {
    table: ChunkTable,
}

impl FusedAdamW {
    pub fn new() -> FusedAdamW {
        FusedAdamW::default()
    }

    /// One step with the scalars of step `s` (see `cpu::optim::AdamWScalars::new`).
    /// With `clip`, grads are scaled by its coefficient on the fly (their memory is
    /// left as is), which equals clip_grad_norm_ followed by the step.
    pub fn step(
        &mut self,
        gpu: &Gpu,
        tensors: &mut [AdamWTensor<'_>],
        s: &AdamWScalars,
        clip: Option<&GradNorm>,
    ) -> Result<()> {
        let mut chunks = Vec::new();
        for (i, t) in tensors.iter().enumerate() {
            let n = t.param.len();
            if t.grad.len() != n || t.m.len() != n || t.v.len() != n {
                return Err(bad(format!(
                    "adamw tensor {i}: lengths differ (param {n}, grad {}, m {}, v {})",
                    t.grad.len(),
                    t.m.len(),
                    t.v.len()
                )));
            }
            push_chunks(
                &mut chunks,
                n,
                t.param.ptr(),
                t.grad.ptr(),
                t.m.ptr(),
                t.v.ptr(),
            );
        }
        let n_chunks = chunks.len();
        let table = self.table.sync(gpu, chunks)?;
        let p = AdamWParams {
            chunks: table,
            grad_scale: clip.map_or(0, |c| c.out.ptr_at(1)),
            n_chunks: to_i32(n_chunks, "chunks")?,
            decay: s.decay,
            beta1: s.beta1,
            one_minus_beta1: s.one_minus_beta1,
            beta2: s.beta2,
            one_minus_beta2: s.one_minus_beta2,
            step_size: s.step_size,
            bc2_sqrt: s.bc2_sqrt,
            eps: s.eps,
            _pad: 0,
        };
        gpu.launch("adamw_step_f32", to_u32(n_chunks, "chunks")?, BLOCK, &p)
    }
}
