//! LoRA target projections on the device (PEFT semantics, `s = alpha / r`):
//!
//! ```text
//! forward   Y  = X·Wᵀ + s·(drop(X)·Aᵀ)·Bᵀ    W [out, in] frozen, A [r, in], B [out, r]
//! backward  dX = dY·W + s·(dY·B)·A            (drop = identity; see below)
//!           dB += s·dYᵀ·(drop(X)·Aᵀ)      dA += s·(dY·B)ᵀ·drop(X)
//! ```
//!
//! The adapter term is an extra reduction slab of width r appended to the base GEMM,
//! `Y = [X | s·XA]·[W | B]ᵀ` with `XA = drop(X)·Aᵀ` `[m, r]`: cuBLAS computes the small
//! factor first (s folded in, so it is rounded to bf16 once), then for an NF4 base
//! kernels/nf4.cu `nf4_gemm_fwd_lora` runs the fused NF4 GEMM plus that slab into the
//! same f32 accumulators and writes Y once. Backward the same with `s·dY·B` `[m, r]`
//! and A (`nf4_gemm_bwd_lora`). A dense bf16 base has no GEMM kernel of its own here:
//! it takes the unfused path, cuBLAS `Y = X·Wᵀ` then cuBLAS `Y += (s·XA)·Bᵀ` (beta = 1).
//! The same unfused path (NF4 GEMM, then the rank-r update) runs whenever the fused
//! kernel's limits ([`check_fused_lora`]) do not hold or `fused` is false.
//!
//! Saved tensors differ from the CPU model's `LoraSaved` by the factor s: `xa_out`
//! holds `s·drop(X)·Aᵀ` and `dyb_out` holds `s·dY·B`, which is what
//! [`lora_weight_grads`] expects (so its GEMMs need no scale).
//!
//! Dropout: the forward takes X and drop(X) (the caller applies the mask) and stays
//! fused. [`lora_backward_input`] is exact when the adapter input is X itself (no
//! dropout, or p = 0). With a mask the adapter's input gradient must be masked before
//! it is added, `dX = dY·W + mask ⊙ (s·(dY·B)·A)`, which a GEMM epilogue cannot do
//! with one accumulator; [`lora_backward_input_parts`] returns the two terms
//! separately for the caller's elementwise kernels.

use cudarc::driver::DeviceRepr;
use half::bf16;

use super::blas::{self, Gemm};
use super::nf4::{self, Nf4Op, Nf4Weight, Out, GEMM_TILE, NF4_GEMM_SMEM_BYTES};
use super::params::{Nf4GemmLoraParams, Nf4GemmParams};
use super::{DeviceBuffer, Gpu};
use crate::error::{bad, Result};

// SAFETY: bindgen's #[repr(C)] translation of kernels/params.h (bytemuck::Pod is
// derived, which rules out padding); the kernels' only argument, passed by value.
unsafe impl DeviceRepr for Nf4GemmLoraParams {}

/// The kernels of this module (in kernels/nf4.cu; all listed in `KERNEL_NAMES`).
pub const KERNELS: &[&str] = &["nf4_gemm_fwd_lora", "nf4_gemm_bwd_lora"];

/// The fused kernels consume the rank in mma k16 steps.
pub const FUSED_RANK_MULTIPLE: usize = 16;

/// The frozen base weight of a projection, `[out, in]` (nn.Linear layout).
#[derive(Clone, Copy)]
pub enum LoraBase<'a> {
    /// NF4 (QLoRA): fused path available.
    Nf4(&'a Nf4Weight),
    /// bf16 row-major `[out, inp]`: cuBLAS, unfused.
    Dense {
        w: &'a DeviceBuffer<bf16>,
        out: usize,
        inp: usize,
    },
}

impl LoraBase<'_> {
    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            LoraBase::Nf4(w) => w.shape(),
            LoraBase::Dense { out, inp, .. } => [*out, *inp],
        }
    }
}

/// One adapter on the device: A `[rank, in]`, B `[out, rank]` (bf16 copies of the f32
/// master weights), `scale = alpha / rank`.
#[derive(Clone, Copy)]
pub struct LoraDev<'a> {
    pub a: &'a DeviceBuffer<bf16>,
    pub b: &'a DeviceBuffer<bf16>,
    pub rank: usize,
    pub scale: f32,
}

/// Which path computed a projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPath {
    /// One NF4 kernel with the adapter slab.
    Fused,
    /// Base GEMM, then a cuBLAS rank-r update with beta = 1.
    Unfused,
}

/// The fused kernels' limits: the NF4 GEMM's ([`nf4::check_fused`]), a rank that is a
/// positive multiple of 16, and `m` within the launch grid (128 rows per block).
pub fn check_fused_lora(op: Nf4Op, w_shape: [usize; 2], m: usize, rank: usize) -> Result<()> {
    nf4::check_fused(op, w_shape)?;
    if rank == 0 || !rank.is_multiple_of(FUSED_RANK_MULTIPLE) || rank > i32::MAX as usize {
        return Err(bad(format!(
            "fused NF4 LoRA GEMM: rank {rank} is not a positive multiple of \
             {FUSED_RANK_MULTIPLE} (ranks 16, 32, 64, ... are fused; others take the \
             unfused path)"
        )));
    }
    if m.div_ceil(GEMM_TILE.0) > 65535 {
        return Err(bad(format!(
            "fused NF4 LoRA GEMM: {m} rows exceed the launch grid"
        )));
    }
    Ok(())
}

/// Whether [`lora_forward`] (`Forward`) or [`lora_backward_input`] (`Backward`) with
/// `fused = true` runs the fused kernel for this base, `m` and rank.
pub fn fused_applies(base: &LoraBase<'_>, op: Nf4Op, m: usize, rank: usize) -> bool {
    matches!(base, LoraBase::Nf4(w) if check_fused_lora(op, w.shape(), m, rank).is_ok())
}

fn aligned(ptr: u64, bytes: u64) -> bool {
    ptr.is_multiple_of(bytes)
}

/// The fused kernel alone: `Forward` computes `out[m, n] = a[m, k]·bf16(W)ᵀ +
/// left[m, r]·right[n, r]ᵀ`, `Backward` computes `out[m, k] = a[m, n]·bf16(W) +
/// left[m, r]·right[r, k]` for W `[n, k]`. Any scale belongs in `left`. See
/// [`check_fused_lora`] for the limits.
#[allow(clippy::too_many_arguments)]
pub fn gemm_fused_lora(
    gpu: &Gpu,
    op: Nf4Op,
    a: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    left: &DeviceBuffer<bf16>,
    right: &DeviceBuffer<bf16>,
    rank: usize,
    out: Out<'_>,
) -> Result<()> {
    let shape = w.shape();
    check_fused_lora(op, shape, m, rank)?;
    let (inner, outc) = op.dims(shape);
    if a.len() < m * inner || out.len() < m * outc || left.len() < m * rank {
        return Err(bad(format!(
            "fused NF4 LoRA GEMM ({}): weight {shape:?}, {m} rows, rank {rank} need input \
             {}, left factor {} and output {} elements (buffers hold {}, {} and {})",
            op.name(),
            m * inner,
            m * rank,
            m * outc,
            a.len(),
            left.len(),
            out.len()
        )));
    }
    if right.len() < rank * outc {
        return Err(bad(format!(
            "fused NF4 LoRA GEMM ({}): the right factor needs {} elements ({rank} x {outc}), \
             the buffer holds {}",
            op.name(),
            rank * outc,
            right.len()
        )));
    }
    // cp.async moves 16-byte pieces; the epilogue stores element pairs.
    if ![a.ptr(), left.ptr(), right.ptr()]
        .iter()
        .all(|&p| aligned(p, 16))
        || !aligned(out.ptr(), if out.is_f32() { 8 } else { 4 })
    {
        return Err(bad(
            "fused NF4 LoRA GEMM: buffers must be 16-byte aligned (whole pool buffers are)",
        ));
    }
    if m == 0 {
        return Ok(());
    }
    let name = match op {
        Nf4Op::Forward => "nf4_gemm_fwd_lora",
        Nf4Op::Backward => "nf4_gemm_bwd_lora",
    };
    gpu.opt_in_smem(name, NF4_GEMM_SMEM_BYTES as usize)?;
    let p = Nf4GemmLoraParams {
        base: Nf4GemmParams {
            out: out.ptr(),
            a: a.ptr(),
            w: w.params(),
            m: m as i32,
            out_f32: out.is_f32() as i32,
        },
        left: left.ptr(),
        right: right.ptr(),
        rank: rank as i32,
        _pad: 0,
    };
    // Every buffer behind p's pointers was checked above against the shapes the kernel
    // addresses.
    let grid = (
        outc.div_ceil(GEMM_TILE.1) as u32,
        m.div_ceil(GEMM_TILE.0) as u32,
        1,
    );
    gpu.launch_grid(name, grid, 256, NF4_GEMM_SMEM_BYTES, &p)
}

/// Checks the adapter against the base shape and the buffers for `m` rows.
fn check_adapter(
    what: &str,
    base: &LoraBase<'_>,
    lora: &LoraDev<'_>,
    bufs: &[(&str, usize, usize)],
) -> Result<()> {
    let [out, inp] = base.shape();
    if out == 0 || inp == 0 {
        return Err(bad(format!("{what}: empty base weight [{out}, {inp}]")));
    }
    if let LoraBase::Dense { w, .. } = base {
        if w.len() < out * inp {
            return Err(bad(format!(
                "{what}: dense base [{out}, {inp}] needs {} elements, the buffer holds {}",
                out * inp,
                w.len()
            )));
        }
    }
    let r = lora.rank;
    if r == 0 || !lora.scale.is_finite() {
        return Err(bad(format!(
            "{what}: rank {r} and scale {} (need rank >= 1 and a finite scale)",
            lora.scale
        )));
    }
    if lora.a.len() < r * inp || lora.b.len() < out * r {
        return Err(bad(format!(
            "{what}: rank {r} on [{out}, {inp}] needs A {} and B {} elements (buffers hold \
             {} and {})",
            r * inp,
            out * r,
            lora.a.len(),
            lora.b.len()
        )));
    }
    for &(name, have, need) in bufs {
        if have < need {
            return Err(bad(format!(
                "{what}: {name} needs {need} elements, the buffer holds {have}"
            )));
        }
    }
    Ok(())
}

/// The base product alone into `out` (bf16): NF4 on the fused NF4 GEMM where its
/// limits hold, else dequant + cuBLAS; dense on cuBLAS.
fn base_product(
    gpu: &Gpu,
    base: &LoraBase<'_>,
    op: Nf4Op,
    a: &DeviceBuffer<bf16>,
    m: usize,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    match base {
        LoraBase::Nf4(w) if nf4::check_fused(op, w.shape()).is_ok() => {
            nf4::gemm_fused(gpu, op, a, m, w, Out::Bf16(out))
        }
        LoraBase::Nf4(w) => nf4::gemm_dequant_cublas(gpu, op, a, m, w, out),
        LoraBase::Dense { w, out: n, inp: k } => {
            let g = match op {
                Nf4Op::Forward => Gemm::linear(m, *n, *k),
                Nf4Op::Backward => plain(m, *k, *n, 1.0, 0.0),
            };
            blas::gemm_bf16(gpu, g, a, w, out)
        }
    }
}

/// `C[m, n] = alpha·A[m, k]·B[k, n] + beta·C`, no transposes.
fn plain(m: usize, n: usize, k: usize, alpha: f32, beta: f32) -> Gemm {
    Gemm {
        m,
        n,
        k,
        trans_a: false,
        trans_b: false,
        alpha,
        beta,
    }
}

/// Forward of a LoRA projection for `m` rows: `xa_out[m, r] = s·drop(X)·Aᵀ` (saved for
/// backward), then `y[m, out] = X·Wᵀ + xa_out·Bᵀ`. `x_dropped` is the adapter's input
/// after dropout (the caller applies the mask); `None` means no dropout (X itself).
/// `fused` asks for the fused NF4 kernel; it runs when [`fused_applies`], else the
/// unfused path does. Returns the path.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    gpu: &Gpu,
    base: LoraBase<'_>,
    x: &DeviceBuffer<bf16>,
    x_dropped: Option<&DeviceBuffer<bf16>>,
    m: usize,
    lora: LoraDev<'_>,
    xa_out: &mut DeviceBuffer<bf16>,
    y: &mut DeviceBuffer<bf16>,
    fused: bool,
) -> Result<LoraPath> {
    let [out, inp] = base.shape();
    let r = lora.rank;
    check_adapter(
        "LoRA forward",
        &base,
        &lora,
        &[
            ("x", x.len(), m * inp),
            ("x_dropped", x_dropped.unwrap_or(x).len(), m * inp),
            ("xa_out", xa_out.len(), m * r),
            ("y", y.len(), m * out),
        ],
    )?;
    let path = if fused && fused_applies(&base, Nf4Op::Forward, m, r) {
        LoraPath::Fused
    } else {
        LoraPath::Unfused
    };
    if m == 0 {
        return Ok(path);
    }
    let xa_gemm = Gemm {
        alpha: lora.scale,
        ..Gemm::linear(m, r, inp)
    };
    blas::gemm_bf16(gpu, xa_gemm, x_dropped.unwrap_or(x), lora.a, xa_out)?;
    match (path, &base) {
        (LoraPath::Fused, LoraBase::Nf4(w)) => gemm_fused_lora(
            gpu,
            Nf4Op::Forward,
            x,
            m,
            w,
            xa_out,
            lora.b,
            r,
            Out::Bf16(y),
        )?,
        _ => {
            base_product(gpu, &base, Nf4Op::Forward, x, m, y)?;
            let update = Gemm {
                beta: 1.0,
                ..Gemm::linear(m, out, r)
            };
            blas::gemm_bf16(gpu, update, xa_out, lora.b, y)?;
        }
    }
    Ok(path)
}

/// Input gradient of a LoRA projection without dropout: `dyb_out[m, r] = s·dY·B`
/// (for [`lora_weight_grads`]) and `dx[m, in] = dY·W + dyb_out·A`. Fused as in
/// [`lora_forward`]; returns the path.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_input(
    gpu: &Gpu,
    base: LoraBase<'_>,
    dy: &DeviceBuffer<bf16>,
    m: usize,
    lora: LoraDev<'_>,
    dyb_out: &mut DeviceBuffer<bf16>,
    dx: &mut DeviceBuffer<bf16>,
    fused: bool,
) -> Result<LoraPath> {
    let [out, inp] = base.shape();
    let r = lora.rank;
    check_adapter(
        "LoRA backward",
        &base,
        &lora,
        &[
            ("dy", dy.len(), m * out),
            ("dyb_out", dyb_out.len(), m * r),
            ("dx", dx.len(), m * inp),
        ],
    )?;
    let path = if fused && fused_applies(&base, Nf4Op::Backward, m, r) {
        LoraPath::Fused
    } else {
        LoraPath::Unfused
    };
    if m == 0 {
        return Ok(path);
    }
    blas::gemm_bf16(gpu, plain(m, r, out, lora.scale, 0.0), dy, lora.b, dyb_out)?;
    match (path, &base) {
        (LoraPath::Fused, LoraBase::Nf4(w)) => gemm_fused_lora(
            gpu,
            Nf4Op::Backward,
            dy,
            m,
            w,
            dyb_out,
            lora.a,
            r,
            Out::Bf16(dx),
        )?,
        _ => {
            base_product(gpu, &base, Nf4Op::Backward, dy, m, dx)?;
            blas::gemm_bf16(gpu, plain(m, inp, r, 1.0, 1.0), dyb_out, lora.a, dx)?;
        }
    }
    Ok(path)
}

/// Input gradient with dropout, as two terms: `dx_base[m, in] = dY·W`, `dyb_out =
/// s·dY·B` and `dx_adapter[m, in] = dyb_out·A`; the caller forms `dx_base + mask ⊙
/// dx_adapter` (elementwise kernels). Always unfused (the mask sits between the terms).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_input_parts(
    gpu: &Gpu,
    base: LoraBase<'_>,
    dy: &DeviceBuffer<bf16>,
    m: usize,
    lora: LoraDev<'_>,
    dyb_out: &mut DeviceBuffer<bf16>,
    dx_base: &mut DeviceBuffer<bf16>,
    dx_adapter: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let [out, inp] = base.shape();
    let r = lora.rank;
    check_adapter(
        "LoRA backward (parts)",
        &base,
        &lora,
        &[
            ("dy", dy.len(), m * out),
            ("dyb_out", dyb_out.len(), m * r),
            ("dx_base", dx_base.len(), m * inp),
            ("dx_adapter", dx_adapter.len(), m * inp),
        ],
    )?;
    if m == 0 {
        return Ok(());
    }
    blas::gemm_bf16(gpu, plain(m, r, out, lora.scale, 0.0), dy, lora.b, dyb_out)?;
    base_product(gpu, &base, Nf4Op::Backward, dy, m, dx_base)?;
    blas::gemm_bf16(gpu, plain(m, inp, r, 1.0, 0.0), dyb_out, lora.a, dx_adapter)
}

/// Adapter weight gradients, accumulated in f32 (beta = 1, so micro-batches add up):
/// `grad_b[out, r] += dYᵀ·xa` and `grad_a[r, in] += dybᵀ·x_dropped`, where `xa` and
/// `dyb` are the s-scaled factors [`lora_forward`] and [`lora_backward_input`] wrote
/// (so these are `s·dYᵀ·(drop(X)·Aᵀ)` and `s·(dY·B)ᵀ·drop(X)`). `shape` = `[out, in]`;
/// `lora.rank` sizes the factors (A, B and the scale are not read).
#[allow(clippy::too_many_arguments)]
pub fn lora_weight_grads(
    gpu: &Gpu,
    dy: &DeviceBuffer<bf16>,
    x_dropped: &DeviceBuffer<bf16>,
    xa: &DeviceBuffer<bf16>,
    dyb: &DeviceBuffer<bf16>,
    m: usize,
    shape: [usize; 2],
    lora: LoraDev<'_>,
    grad_a: &mut DeviceBuffer<f32>,
    grad_b: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let [out, inp] = shape;
    let r = lora.rank;
    if out == 0 || inp == 0 || r == 0 {
        return Err(bad(format!(
            "LoRA weight gradients: shape [{out}, {inp}] with rank {r}"
        )));
    }
    for (name, have, need) in [
        ("dy", dy.len(), m * out),
        ("x_dropped", x_dropped.len(), m * inp),
        ("xa", xa.len(), m * r),
        ("dyb", dyb.len(), m * r),
        ("grad_a", grad_a.len(), r * inp),
        ("grad_b", grad_b.len(), out * r),
    ] {
        if have < need {
            return Err(bad(format!(
                "LoRA weight gradients: {name} needs {need} elements, the buffer holds {have}"
            )));
        }
    }
    if m == 0 {
        return Ok(());
    }
    let at_b = |rows: usize, cols: usize| Gemm {
        trans_a: true,
        ..plain(rows, cols, m, 1.0, 1.0)
    };
    blas::gemm_bf16_f32out(gpu, at_b(out, r), dy, xa, grad_b)?;
    blas::gemm_bf16_f32out(gpu, at_b(r, inp), dyb, x_dropped, grad_a)
}
