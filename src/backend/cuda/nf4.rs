//! NF4 weights on the device and the kernels of kernels/nf4.cu (the math is written at
//! the top of that file):
//!
//! - [`Nf4Weight`]: an `Nf4Tensor` uploaded as is (packed codes plus f32 absmax, or the
//!   double-quant parts, decoded inside the kernels) or with its scales decoded to f32.
//! - [`dequantize`]: NF4 → f32 (bit-exact against `Nf4Tensor::dequantize`) or → bf16.
//! - [`gemv`]: `Y = X·Wᵀ` for M ≤ 16 rows, reading each weight byte once (decode).
//! - [`gemm_fused`]: `Y = X·Wᵀ` ([`Nf4Op::Forward`]) or `dX = dY·W` ([`Nf4Op::Backward`])
//!   on tensor cores, W unpacked to bf16 in shared memory only.
//! - [`gemm_dequant_cublas`]: the classic path, dequantize to a bf16 scratch + cuBLAS.
//! - [`gemm_wgmma_op`]: both products with Hopper warpgroup MMAs (sm_90a only), by three
//!   kernels ([`WgmmaKernel`]: 128 or 256 rows a block with W decoded into shared memory,
//!   or W as the register operand). The first ([`gemm_wgmma`], forward) passed its parity
//!   tests on an H200 and ran 1.2x the mma.sync kernel but 0.4x dequant + cuBLAS
//!   (benches/RESULTS.md, 2026-11-28); the others pass on kemu and are not yet measured.
//!   So the dispatcher times them only with `PALIGN_NF4_WGMMA=1`.
//! - [`Nf4Dispatcher`]: per shape, runs the fastest of those, measured once on this GPU
//!   and cached on disk ([`DispatchCache`], a [`super::tune`] file keyed by GPU name);
//!   for the GEMV also the fastest of its variants ([`GEMV_VARIANTS`], [`GemvCache`]).
//!
//! Every GEMM multiplies by `bf16(W)` (the bf16 dequantization) with f32 accumulation.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use cudarc::driver::DeviceRepr;
use half::bf16;
use serde::{Deserialize, Serialize};

use super::blas::{self, Gemm};
use super::params::{Nf4DequantParams, Nf4GemmParams, Nf4GemvParams, Nf4WeightParams};
use super::tune::{Choice, TuneCache, TuneEntry};
use super::{DeviceBuffer, Gpu, TARGETS};
use crate::error::{bad, Result};
use crate::quant::{check_blocksize, Absmax, Nf4Tensor};

// SAFETY: bindgen's #[repr(C)] translations of kernels/params.h (u64/i64/i32/f32 fields,
// no padding: bytemuck::Pod is derived, which checks it); each is its kernel's only
// argument, passed by value.
unsafe impl DeviceRepr for Nf4DequantParams {}
unsafe impl DeviceRepr for Nf4GemvParams {}
unsafe impl DeviceRepr for Nf4GemmParams {}

/// The kernels of kernels/nf4.cu (all listed in `KERNEL_NAMES`).
pub const KERNELS: &[&str] = &[
    "nf4_dequantize",
    "nf4_gemv_nt1u4b1",
    "nf4_gemv_nt1u4b1_m16",
    "nf4_gemv_nt2u4b1",
    "nf4_gemv_nt2u4b1_m16",
    "nf4_gemv_nt4u2b1",
    "nf4_gemv_nt4u2b1_m16",
    "nf4_gemv_nt1u4b4",
    "nf4_gemv_nt1u4b4_m16",
    "nf4_gemv_nt2u4b3",
    "nf4_gemv_nt2u4b3_m16",
    "nf4_gemv_nt2u2b4",
    "nf4_gemv_nt2u2b4_m16",
    "nf4_gemv_nt4u1b4",
    "nf4_gemv_nt4u1b4_m16",
    "nf4_gemv_nt1u1p3",
    "nf4_gemv_nt1u1p3_m16",
    "nf4_gemv_nt1u2p2",
    "nf4_gemv_nt1u2p2_m16",
    "nf4_gemv_nt2u1p3",
    "nf4_gemv_nt2u1p3_m16",
    "nf4_gemv_nt4u1p2",
    "nf4_gemv_nt4u1p2_m16",
    "nf4_gemv_naive",
    "nf4_gemm_fwd",
    "nf4_gemm_bwd",
    "nf4_gemm_fwd_wgmma",
    "nf4_gemm_fwd_wgmma_m256",
    "nf4_gemm_fwd_wgmma_rs",
    "nf4_gemm_bwd_wgmma",
    "nf4_gemm_bwd_wgmma_m256",
    "nf4_gemm_bwd_wgmma_rs",
];

const THREADS: u32 = 256;
/// Dynamic shared memory of the fused GEMM (GEMM_SMEM in kernels/nf4.cu, which
/// static_asserts the same number and traps when launched with less).
pub const NF4_GEMM_SMEM_BYTES: u32 = 73728;
/// Tile of the fused GEMM: rows of X per block, output columns per block, reduction step.
pub const GEMM_TILE: (usize, usize, usize) = (128, 128, 64);
/// Dynamic shared memory of the wgmma GEMM (wg_smem(2) in kernels/nf4.cu: 4 stages of
/// 16 KiB A + 16 KiB B, plus 1 KiB to align the 128-byte-swizzle atoms).
pub const NF4_WGMMA_SMEM_BYTES: u32 = 132096;
/// Dynamic shared memory of the 256-row wgmma GEMM (wg_smem(4): 4 stages of 32 KiB A +
/// 16 KiB B, plus 1 KiB).
pub const NF4_WGMMA_M256_SMEM_BYTES: u32 = 197632;
/// Dynamic shared memory of the register-A wgmma GEMM (RS_SMEM: 4 stages of 32 KiB X,
/// plus 1 KiB).
pub const NF4_WGMMA_RS_SMEM_BYTES: u32 = 132096;
/// Dynamic shared memory of the register-A backward (RSB_SMEM: 4 stages of 32 KiB dY, a
/// 3-slot ring of 512 f32 scales, plus 1 KiB).
pub const NF4_WGMMA_RS_BWD_SMEM_BYTES: u32 = 138240;
/// Tile of the wgmma GEMM (rows of X, output columns, reduction step); the M256 kernel
/// takes 256 rows ([`WgmmaKernel::rows`]).
pub const WGMMA_TILE: (usize, usize, usize) = (128, 128, 64);

/// The wgmma GEMMs (kernels/nf4.cu §5-§7), forward and backward: the same products of the
/// same bf16 weights. §5 decodes a block's 128-column W tile into shared memory once per
/// k-step for all of the block's rows (so 256 rows halve the decode per tensor-core
/// operation); §6 (forward) and §7 (backward) compute the product transposed with W from
/// registers, so decoded weights skip shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaKernel {
    /// §5, 128 rows of X a block, 256 threads.
    M128,
    /// §5, 256 rows of X a block, 512 threads (the same bits as M128).
    M256,
    /// §6 / §7, 256 rows of X (dY) a block, 256 threads.
    Rs,
}

impl WgmmaKernel {
    /// The kernel computing `op`.
    pub fn name(self, op: Nf4Op) -> &'static str {
        match (self, op) {
            (WgmmaKernel::M128, Nf4Op::Forward) => "nf4_gemm_fwd_wgmma",
            (WgmmaKernel::M256, Nf4Op::Forward) => "nf4_gemm_fwd_wgmma_m256",
            (WgmmaKernel::Rs, Nf4Op::Forward) => "nf4_gemm_fwd_wgmma_rs",
            (WgmmaKernel::M128, Nf4Op::Backward) => "nf4_gemm_bwd_wgmma",
            (WgmmaKernel::M256, Nf4Op::Backward) => "nf4_gemm_bwd_wgmma_m256",
            (WgmmaKernel::Rs, Nf4Op::Backward) => "nf4_gemm_bwd_wgmma_rs",
        }
    }
    /// Rows of X a block computes.
    pub fn rows(self) -> usize {
        match self {
            WgmmaKernel::M128 => 128,
            WgmmaKernel::M256 | WgmmaKernel::Rs => 256,
        }
    }
    fn threads(self) -> u32 {
        match self {
            WgmmaKernel::M128 | WgmmaKernel::Rs => 256,
            WgmmaKernel::M256 => 512,
        }
    }
    fn smem(self, op: Nf4Op) -> u32 {
        match (self, op) {
            (WgmmaKernel::M128, _) => NF4_WGMMA_SMEM_BYTES,
            (WgmmaKernel::M256, _) => NF4_WGMMA_M256_SMEM_BYTES,
            (WgmmaKernel::Rs, Nf4Op::Forward) => NF4_WGMMA_RS_SMEM_BYTES,
            (WgmmaKernel::Rs, Nf4Op::Backward) => NF4_WGMMA_RS_BWD_SMEM_BYTES,
        }
    }

    /// The kernel's own limits beyond [`check_wgmma_op`]: the register-A backward loads
    /// 16 codes of a row as 8 bytes (K % 16 == 0) at 32-bit byte offsets (the packed
    /// weight under 4 GiB).
    pub fn check(self, op: Nf4Op, w_shape: [usize; 2]) -> Result<()> {
        check_wgmma_op(op, w_shape)?;
        let [n, k] = w_shape;
        if self == WgmmaKernel::Rs
            && op == Nf4Op::Backward
            && (!k.is_multiple_of(16) || n * k / 2 > u32::MAX as usize)
        {
            return Err(bad(format!(
                "NF4 wgmma GEMM (bwd, register A): weight [{n}, {k}] needs K a multiple of \
                 16 and at most 4 GiB of codes"
            )));
        }
        Ok(())
    }
}
/// Set to 1 to let the dispatcher time (and so pick) the wgmma GEMM on sm_90.
pub const WGMMA_ENV: &str = "PALIGN_NF4_WGMMA";
/// The GEMV's row limit (one m16 tensor-core tile).
pub const GEMV_MAX_M: usize = 16;

/// Which product of an NF4 weight W `[n, k]` (nn.Linear layout `[out, in]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Nf4Op {
    /// `Y[m, n] = X[m, k] · Wᵀ`.
    Forward,
    /// `dX[m, k] = dY[m, n] · W` (the input gradient).
    Backward,
}

impl Nf4Op {
    pub fn name(self) -> &'static str {
        match self {
            Nf4Op::Forward => "fwd",
            Nf4Op::Backward => "bwd",
        }
    }

    /// (input row length, output row length) for a weight of shape `[n, k]`.
    pub fn dims(self, w_shape: [usize; 2]) -> (usize, usize) {
        let [n, k] = w_shape;
        match self {
            Nf4Op::Forward => (k, n),
            Nf4Op::Backward => (n, k),
        }
    }
}

/// The kernels' shape limits for the fused GEMM: the reduction length is a multiple of
/// 64 (K forward, N backward), backward also needs K % 64 == 0 (whole 32-code loads per
/// output tile), and dims fit the kernels' i32.
pub fn check_fused(op: Nf4Op, w_shape: [usize; 2]) -> Result<()> {
    let [n, k] = w_shape;
    check_dims(w_shape)?;
    let (inner, _) = op.dims(w_shape);
    if !inner.is_multiple_of(GEMM_TILE.2) || (op == Nf4Op::Backward && !k.is_multiple_of(64)) {
        return Err(bad(format!(
            "NF4 fused GEMM ({}): weight [{n}, {k}] needs {} a multiple of 64",
            op.name(),
            match op {
                Nf4Op::Forward => "K",
                Nf4Op::Backward => "N and K",
            }
        )));
    }
    // The epilogue stores column pairs (col, col + 1): an odd output width would write
    // one element into the next row and misalign the paired store.
    if op == Nf4Op::Forward && !n.is_multiple_of(2) {
        return Err(bad(format!(
            "NF4 fused GEMM (forward): weight [{n}, {k}] needs an even N"
        )));
    }
    Ok(())
}

/// The forward wgmma GEMMs' limits: K % 64 == 0 (whole k-tiles), N % 8 == 0 (the paired
/// output stores stay in the row and aligned), and dims fit the kernels' i32.
pub fn check_wgmma(w_shape: [usize; 2]) -> Result<()> {
    check_wgmma_op(Nf4Op::Forward, w_shape)
}

/// [`check_wgmma`] for either product. Backward (`dX = dY·W`, reduction over N): N % 64
/// == 0 and K % 8 == 0 (a thread loads 8 codes of a row as one 32-bit word; the paired
/// output stores).
pub fn check_wgmma_op(op: Nf4Op, w_shape: [usize; 2]) -> Result<()> {
    let [n, k] = w_shape;
    check_dims(w_shape)?;
    let (inner, outer) = op.dims(w_shape);
    if !inner.is_multiple_of(WGMMA_TILE.2) || !outer.is_multiple_of(8) {
        let (r, o) = match op {
            Nf4Op::Forward => ("K", "N"),
            Nf4Op::Backward => ("N", "K"),
        };
        return Err(bad(format!(
            "NF4 wgmma GEMM ({}): weight [{n}, {k}] needs {r} a multiple of 64 and {o} a \
             multiple of 8",
            op.name()
        )));
    }
    Ok(())
}

/// Whether a GPU of compute capability `cc` can run the wgmma GEMM from a fatbin built
/// for `targets` ([`TARGETS`]): only compute capability 9.0 with sm_90a SASS (every
/// other image of the kernel is a stub that traps).
pub fn wgmma_supported(cc: (i32, i32), targets: &str) -> bool {
    cc == (9, 0) && targets.split_whitespace().any(|t| t == "sm_90a")
}

/// Whether the dispatcher may time the wgmma GEMM: `env` (the value of [`WGMMA_ENV`])
/// turns it on (1, on, true; a value that is neither on nor off is an error) and the GPU
/// is supported. Off by default: it passed its parity tests on an
/// H200 but never beat dequant + cuBLAS there, so timing it would only cost each shape.
pub fn wgmma_gate(env: Option<&str>, cc: (i32, i32), targets: &str) -> Result<bool> {
    Ok(crate::switches::NF4_WGMMA.parse(env)? && wgmma_supported(cc, targets))
}

/// The GEMV's limits: 1 ≤ m ≤ 16 and K % 32 == 0 (each lane loads 32 codes).
pub fn check_gemv(m: usize, w_shape: [usize; 2]) -> Result<()> {
    check_dims(w_shape)?;
    if m == 0 || m > GEMV_MAX_M {
        return Err(bad(format!(
            "NF4 GEMV: {m} rows (1..={GEMV_MAX_M} supported; use the GEMM)"
        )));
    }
    if !w_shape[1].is_multiple_of(32) {
        return Err(bad(format!(
            "NF4 GEMV: weight {w_shape:?} needs K a multiple of 32"
        )));
    }
    Ok(())
}

fn check_dims(w_shape: [usize; 2]) -> Result<()> {
    let [n, k] = w_shape;
    if n == 0 || k == 0 || n > i32::MAX as usize || k > i32::MAX as usize {
        return Err(bad(format!(
            "NF4 weight shape {w_shape:?} is empty or exceeds the kernels' i32"
        )));
    }
    Ok(())
}

/// Checks that the input holds `m` rows and the output room for `m` rows of `op`.
fn check_io(op: Nf4Op, m: usize, w_shape: [usize; 2], x_len: usize, out_len: usize) -> Result<()> {
    let (inner, outc) = op.dims(w_shape);
    if m > i32::MAX as usize {
        return Err(bad(format!("NF4 matmul: {m} rows exceed the kernels' i32")));
    }
    if x_len < m * inner || out_len < m * outc {
        return Err(bad(format!(
            "NF4 matmul ({}): weight {w_shape:?}, {m} rows need input {} and output {} \
             elements (buffers hold {x_len} and {out_len})",
            op.name(),
            m * inner,
            m * outc
        )));
    }
    Ok(())
}

/// Checks an `Nf4Tensor`'s parts against its shape (the kernels trust them).
pub fn check_tensor(t: &Nf4Tensor) -> Result<()> {
    check_dims(t.shape)?;
    check_blocksize(t.blocksize)?;
    let numel = t.numel();
    let nblocks = t.nblocks();
    if t.packed.len() != numel.div_ceil(2) {
        return Err(bad(format!(
            "NF4 weight {:?}: {} packed bytes, expected {}",
            t.shape,
            t.packed.len(),
            numel.div_ceil(2)
        )));
    }
    match &t.absmax {
        Absmax::Plain(a) if a.len() != nblocks => Err(bad(format!(
            "NF4 weight {:?}: {} absmax values for {nblocks} blocks",
            t.shape,
            a.len()
        ))),
        Absmax::Plain(_) => Ok(()),
        Absmax::Double(d) => {
            if !d.blocksize2.is_power_of_two() || d.blocksize2 > 1 << 20 {
                return Err(bad(format!(
                    "NF4 nested blocksize {} is not a power of two",
                    d.blocksize2
                )));
            }
            if d.q.len() != nblocks
                || d.code2.len() != 256
                || d.absmax2.len() != nblocks.div_ceil(d.blocksize2)
            {
                return Err(bad(format!(
                    "NF4 weight {:?}: double-quant parts have {} codes, {} map entries, \
                     {} nested absmax (expected {nblocks}, 256, {})",
                    t.shape,
                    d.q.len(),
                    d.code2.len(),
                    d.absmax2.len(),
                    nblocks.div_ceil(d.blocksize2)
                )));
            }
            Ok(())
        }
    }
}

#[derive(Debug)]
enum Scales {
    Plain(DeviceBuffer<f32>),
    Double {
        q: DeviceBuffer<u8>,
        code2: DeviceBuffer<f32>,
        absmax2: DeviceBuffer<f32>,
        offset: f32,
        blocksize2: usize,
    },
}

/// An NF4 weight `[n, k]` in device memory (see the module docs).
#[derive(Debug)]
pub struct Nf4Weight {
    shape: [usize; 2],
    blocksize: usize,
    packed: DeviceBuffer<u8>,
    scales: Scales,
}

impl Nf4Weight {
    /// Uploads `t` in its own format: double-quantized scales stay 8-bit (≈4.13 bits
    /// per weight in HBM) and are decoded inside the kernels.
    pub fn upload(gpu: &Gpu, t: &Nf4Tensor) -> Result<Nf4Weight> {
        check_tensor(t)?;
        let scales = match &t.absmax {
            Absmax::Plain(a) => Scales::Plain(gpu.upload(a)?),
            Absmax::Double(d) => Scales::Double {
                q: gpu.upload(&d.q)?,
                code2: gpu.upload(&d.code2)?,
                absmax2: gpu.upload(&d.absmax2)?,
                offset: d.offset,
                blocksize2: d.blocksize2,
            },
        };
        Ok(Nf4Weight {
            shape: t.shape,
            blocksize: t.blocksize,
            packed: gpu.upload(&t.packed)?,
            scales,
        })
    }

    /// Uploads `t` with every block scale decoded to f32 on the host (`block_scale`,
    /// the same rounding as the kernels): 4.5 bits per weight, one load per scale.
    pub fn upload_decoded(gpu: &Gpu, t: &Nf4Tensor) -> Result<Nf4Weight> {
        check_tensor(t)?;
        Ok(Nf4Weight {
            shape: t.shape,
            blocksize: t.blocksize,
            packed: gpu.upload(&t.packed)?,
            scales: Scales::Plain(gpu.upload(&t.scales())?),
        })
    }

    /// `[n, k]` = `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    pub fn is_double_quant(&self) -> bool {
        matches!(self.scales, Scales::Double { .. })
    }

    /// Bytes a pass over the weight reads (codes and scales).
    pub fn device_bytes(&self) -> usize {
        self.packed.bytes()
            + match &self.scales {
                Scales::Plain(a) => a.bytes(),
                Scales::Double {
                    q, code2, absmax2, ..
                } => q.bytes() + code2.bytes() + absmax2.bytes(),
            }
    }

    /// The kernels' view of the weight (also used by the LoRA launchers in lora.rs).
    pub(crate) fn params(&self) -> Nf4WeightParams {
        let (absmax, qabsmax, code2, absmax2, offset, bs2) = match &self.scales {
            Scales::Plain(a) => (a.ptr(), 0, 0, 0, 0.0, 1),
            Scales::Double {
                q,
                code2,
                absmax2,
                offset,
                blocksize2,
            } => (0, q.ptr(), code2.ptr(), absmax2.ptr(), *offset, *blocksize2),
        };
        Nf4WeightParams {
            packed: self.packed.ptr(),
            absmax,
            qabsmax,
            code2,
            absmax2,
            numel: self.numel() as i64,
            rows: self.shape[0] as i32,
            cols: self.shape[1] as i32,
            log2_blocksize: self.blocksize.trailing_zeros() as i32,
            log2_blocksize2: bs2.trailing_zeros() as i32,
            offset,
            _pad: 0,
        }
    }
}

/// An output buffer of a kernel that writes bf16 or f32.
pub enum Out<'a> {
    Bf16(&'a mut DeviceBuffer<bf16>),
    F32(&'a mut DeviceBuffer<f32>),
}

impl Out<'_> {
    pub fn len(&self) -> usize {
        match self {
            Out::Bf16(b) => b.len(),
            Out::F32(b) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_f32(&self) -> bool {
        matches!(self, Out::F32(_))
    }
    pub(crate) fn ptr(&self) -> u64 {
        match self {
            Out::Bf16(b) => b.ptr(),
            Out::F32(b) => b.ptr(),
        }
    }
    /// A shorter-lived copy of the borrow (to run several paths into one buffer).
    pub fn reborrow(&mut self) -> Out<'_> {
        match self {
            Out::Bf16(b) => Out::Bf16(b),
            Out::F32(b) => Out::F32(b),
        }
    }
}

fn launch<P: DeviceRepr>(
    gpu: &Gpu,
    name: &str,
    grid: (u32, u32),
    smem: u32,
    params: &P,
) -> Result<()> {
    launch_threads(gpu, name, grid, THREADS, smem, params)
}

/// [`launch`] with `threads` a block (the 512-thread wgmma GEMM).
fn launch_threads<P: DeviceRepr>(
    gpu: &Gpu,
    name: &str,
    grid: (u32, u32),
    threads: u32,
    smem: u32,
    params: &P,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 {
        return Ok(());
    }
    // The callers check the buffers behind the params' pointers.
    gpu.launch_grid(name, (grid.0, grid.1, 1), threads, smem, params)
}

/// Dequantizes the whole weight into `out` (≥ numel elements, row-major): f32 values
/// equal `Nf4Tensor::dequantize` bit for bit, bf16 values are those rounded to nearest.
pub fn dequantize(gpu: &Gpu, w: &Nf4Weight, out: Out<'_>) -> Result<()> {
    if out.len() < w.numel() {
        return Err(bad(format!(
            "NF4 dequantize: output holds {} elements, weight {:?} has {}",
            out.len(),
            w.shape,
            w.numel()
        )));
    }
    let p = Nf4DequantParams {
        out: out.ptr(),
        w: w.params(),
        out_f32: out.is_f32() as i32,
        _pad: 0,
    };
    let groups = w.numel().div_ceil(16);
    let grid = groups
        .div_ceil(THREADS as usize)
        .min(gpu.sm_count() as usize * 16);
    launch(gpu, "nf4_dequantize", (grid as u32, 1), 0, &p)
}

fn gemv_params(
    x: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: &Out<'_>,
) -> Result<Nf4GemvParams> {
    check_gemv(m, w.shape)?;
    check_io(Nf4Op::Forward, m, w.shape, x.len(), out.len())?;
    Ok(Nf4GemvParams {
        y: out.ptr(),
        x: x.ptr(),
        w: w.params(),
        m: m as i32,
        out_f32: out.is_f32() as i32,
    })
}

/// One GEMV kernel pair of kernels/nf4.cu (the instantiations after `gemv`): `tiles`
/// 8-column output tiles a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvVariant {
    /// `nt<tiles>u<prefetched chunks>b<blocks>` (`p<blocks>`: the next group loads while
    /// this one decodes): `nf4_gemv_<name>` runs M ≤ 8, `nf4_gemv_<name>_m16` M > 8.
    pub name: &'static str,
    /// 8-column output tiles per block (1, 2 or 4).
    pub tiles: usize,
    m8: &'static str,
    m16: &'static str,
}

macro_rules! gemv_variant {
    ($name:literal, $tiles:expr) => {
        GemvVariant {
            name: $name,
            tiles: $tiles,
            m8: concat!("nf4_gemv_", $name),
            m16: concat!("nf4_gemv_", $name, "_m16"),
        }
    };
}

/// Every GEMV variant, in kernels/nf4.cu's order. The first three are the kernels the
/// H200 measured on 2026-11-28 (benches/RESULTS.md); the `b` ones after them trade words
/// in flight a warp for warps an SM, the `p` ones load a warp's next group during its
/// decode. None measured yet: `benches/nf4.rs` and `tools/prof/nf4_gemv.cu` time them
/// all, the GPU tests check them all.
pub const GEMV_VARIANTS: &[GemvVariant] = &[
    gemv_variant!("nt1u4b1", 1),
    gemv_variant!("nt2u4b1", 2),
    gemv_variant!("nt4u2b1", 4),
    gemv_variant!("nt1u4b4", 1),
    gemv_variant!("nt2u4b3", 2),
    gemv_variant!("nt2u2b4", 2),
    gemv_variant!("nt4u1b4", 4),
    gemv_variant!("nt1u1p3", 1),
    gemv_variant!("nt1u2p2", 1),
    gemv_variant!("nt2u1p3", 2),
    gemv_variant!("nt4u1p2", 4),
];

/// The GEMV variant [`gemv`] runs for `n` output columns on a GPU of `sms` SMs: the
/// widest tile (wide tiles share each X load among more columns) that still gives every
/// SM two blocks.
pub fn default_gemv_variant(sms: usize, n: usize) -> GemvVariant {
    let want = 2 * sms;
    let name = if n.div_ceil(32) >= want {
        "nt4u2b1"
    } else if n.div_ceil(16) >= want {
        "nt2u4b1"
    } else {
        "nt1u4b1"
    };
    gemv_by_name(name).expect("a listed variant")
}

/// The GEMV variant called `name`.
pub fn gemv_by_name(name: &str) -> Option<GemvVariant> {
    GEMV_VARIANTS.iter().copied().find(|v| v.name == name)
}

/// `Y[m, n] = X[m, k] · bf16(W)ᵀ` for 1 ≤ m ≤ 16 on tensor cores; each weight byte is
/// read once. Needs K % 32 == 0.
pub fn gemv(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: Out<'_>,
) -> Result<()> {
    let v = default_gemv_variant(gpu.sm_count() as usize, w.shape[0]);
    gemv_variant(gpu, x, m, w, out, v)
}

/// [`gemv`] with the variant `v` (the bench and the tests run each).
pub fn gemv_variant(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: Out<'_>,
    v: GemvVariant,
) -> Result<()> {
    let p = gemv_params(x, m, w, &out)?;
    let name = if m > 8 { v.m16 } else { v.m8 };
    let grid = w.shape[0].div_ceil(8 * v.tiles);
    launch(gpu, name, (grid as u32, 1), 0, &p)
}

/// The same product with one warp per output column and f32 weights (bitsandbytes'
/// inference-kernel layout): the baseline the benches compare [`gemv`] with.
pub fn gemv_naive(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: Out<'_>,
) -> Result<()> {
    let p = gemv_params(x, m, w, &out)?;
    let grid = w.shape[0].div_ceil(THREADS as usize / 32);
    launch(gpu, "nf4_gemv_naive", (grid as u32, 1), 0, &p)
}

/// Fused dequant-GEMM on tensor cores: `Forward` computes `out[m, n] = a[m, k] ·
/// bf16(W)ᵀ`, `Backward` computes `out[m, k] = a[m, n] · bf16(W)`. See [`check_fused`].
pub fn gemm_fused(
    gpu: &Gpu,
    op: Nf4Op,
    a: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: Out<'_>,
) -> Result<()> {
    check_fused(op, w.shape)?;
    check_io(op, m, w.shape, a.len(), out.len())?;
    let grid = gemm_grid(op, m, w.shape, GEMM_TILE.0, "fused")?;
    let name = match op {
        Nf4Op::Forward => "nf4_gemm_fwd",
        Nf4Op::Backward => "nf4_gemm_bwd",
    };
    gpu.opt_in_smem(name, NF4_GEMM_SMEM_BYTES as usize)?;
    launch(
        gpu,
        name,
        grid,
        NF4_GEMM_SMEM_BYTES,
        &gemm_params(a, m, w, &out),
    )
}

/// The launch grid of a GEMM with 128 output columns and `rows` rows of `a` a block;
/// BadInput when the rows need more than the grid's 65535 blocks in y.
fn gemm_grid(
    op: Nf4Op,
    m: usize,
    w_shape: [usize; 2],
    rows: usize,
    what: &str,
) -> Result<(u32, u32)> {
    let grid_y = m.div_ceil(rows);
    if grid_y > 65535 {
        return Err(bad(format!(
            "NF4 {what} GEMM: {m} rows exceed the launch grid"
        )));
    }
    let grid_x = op.dims(w_shape).1.div_ceil(GEMM_TILE.1);
    Ok((grid_x as u32, grid_y as u32))
}

fn gemm_params(a: &DeviceBuffer<bf16>, m: usize, w: &Nf4Weight, out: &Out<'_>) -> Nf4GemmParams {
    Nf4GemmParams {
        out: out.ptr(),
        a: a.ptr(),
        w: w.params(),
        m: m as i32,
        out_f32: out.is_f32() as i32,
    }
}

/// `out[m, n] = a[m, k] · bf16(W)ᵀ` with Hopper warpgroup MMAs (kernels/nf4.cu §5): the
/// product of [`gemm_fused`] `Forward`, the same bf16 weight. BadInput off sm_90, on a
/// build without sm_90a, or outside [`check_wgmma`].
pub fn gemm_wgmma(
    gpu: &Gpu,
    a: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: Out<'_>,
) -> Result<()> {
    gemm_wgmma_op(gpu, WgmmaKernel::M128, Nf4Op::Forward, a, m, w, out)
}

/// `op` (forward `a·bf16(W)ᵀ` or backward `a·bf16(W)`) with the wgmma kernel `kernel`:
/// the product of [`gemm_fused`]. BadInput off sm_90a or outside [`WgmmaKernel::check`].
pub fn gemm_wgmma_op(
    gpu: &Gpu,
    kernel: WgmmaKernel,
    op: Nf4Op,
    a: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: Out<'_>,
) -> Result<()> {
    let name = kernel.name(op);
    let cc = gpu.compute_capability();
    if !wgmma_supported(cc, TARGETS) {
        return Err(bad(format!(
            "NF4 wgmma GEMM: needs compute capability 9.0 and sm_90a kernels; this GPU \
             is {}.{} and the kernels were built for [{TARGETS}]",
            cc.0, cc.1
        )));
    }
    kernel.check(op, w.shape)?;
    check_io(op, m, w.shape, a.len(), out.len())?;
    let grid = gemm_grid(op, m, w.shape, kernel.rows(), "wgmma")?;
    gpu.opt_in_smem(name, kernel.smem(op) as usize)?;
    let p = gemm_params(a, m, w, &out);
    launch_threads(gpu, name, grid, kernel.threads(), kernel.smem(op), &p)
}

/// The unfused path: dequantize W to a bf16 scratch (from the caching pool), then
/// cuBLAS bf16 GEMM with f32 accumulation. Same product as [`gemm_fused`], bf16 out.
pub fn gemm_dequant_cublas(
    gpu: &Gpu,
    op: Nf4Op,
    a: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    gemm_dequant_cublas_beta(gpu, op, a, m, w, out, 0.0)
}

/// [`gemm_dequant_cublas`] with cuBLAS's `beta`: `out = A·op(W) + beta·out` (beta = 1
/// accumulates: summed input gradients of projections that share an input).
pub fn gemm_dequant_cublas_beta(
    gpu: &Gpu,
    op: Nf4Op,
    a: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: &mut DeviceBuffer<bf16>,
    beta: f32,
) -> Result<()> {
    check_dims(w.shape)?;
    check_io(op, m, w.shape, a.len(), out.len())?;
    if m == 0 {
        return Ok(());
    }
    let [n, k] = w.shape;
    let mut dense = gpu.alloc::<bf16>(n * k)?;
    dequantize(gpu, w, Out::Bf16(&mut dense))?;
    let g = match op {
        Nf4Op::Forward => Gemm {
            beta,
            ..Gemm::linear(m, n, k)
        },
        Nf4Op::Backward => Gemm {
            m,
            n: k,
            k: n,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta,
        },
    };
    blas::gemm_bf16(gpu, g, a, &dense, out)
}

// ------------------------------------------------------------------ dispatcher

/// One way to compute an NF4 product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Nf4Path {
    /// [`gemv`] (forward, M ≤ 16).
    Gemv,
    /// [`gemm_fused`].
    Fused,
    /// [`gemm_dequant_cublas`] (bf16 output).
    DequantCublas,
    /// [`gemm_wgmma_op`] with [`WgmmaKernel::M128`] (sm_90, only with `PALIGN_NF4_WGMMA=1`).
    Wgmma,
    /// [`gemm_wgmma_op`] with [`WgmmaKernel::M256`] (like [`Nf4Path::Wgmma`]).
    WgmmaM256,
    /// [`gemm_wgmma_op`] with [`WgmmaKernel::Rs`] (like [`Nf4Path::Wgmma`]).
    WgmmaRs,
}

impl Nf4Path {
    pub fn name(self) -> &'static str {
        match self {
            Nf4Path::Gemv => "gemv",
            Nf4Path::Fused => "fused",
            Nf4Path::DequantCublas => "dequant_cublas",
            Nf4Path::Wgmma => "wgmma",
            Nf4Path::WgmmaM256 => "wgmma_m256",
            Nf4Path::WgmmaRs => "wgmma_rs",
        }
    }

    pub fn parse(s: &str) -> Option<Nf4Path> {
        [
            Nf4Path::Gemv,
            Nf4Path::Fused,
            Nf4Path::DequantCublas,
            Nf4Path::Wgmma,
            Nf4Path::WgmmaM256,
            Nf4Path::WgmmaRs,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

/// The paths that can compute `op` for `m` rows of a weight `w_shape` (without the
/// opt-in wgmma GEMM; see [`candidates_with`]).
pub fn candidates(op: Nf4Op, m: usize, w_shape: [usize; 2], out_f32: bool) -> Vec<Nf4Path> {
    candidates_with(op, m, w_shape, out_f32, false)
}

/// [`candidates`], plus [`Nf4Path::Wgmma`], [`Nf4Path::WgmmaM256`] and
/// [`Nf4Path::WgmmaRs`] (after the others) where `wgmma` is true ([`wgmma_gate`]) and the
/// shape fits them ([`check_wgmma_op`], [`WgmmaKernel::check`]).
pub fn candidates_with(
    op: Nf4Op,
    m: usize,
    w_shape: [usize; 2],
    out_f32: bool,
    wgmma: bool,
) -> Vec<Nf4Path> {
    let mut v = Vec::new();
    if op == Nf4Op::Forward && check_gemv(m, w_shape).is_ok() {
        v.push(Nf4Path::Gemv);
    }
    if check_fused(op, w_shape).is_ok() {
        v.push(Nf4Path::Fused);
    }
    if !out_f32 && check_dims(w_shape).is_ok() {
        v.push(Nf4Path::DequantCublas);
    }
    if wgmma && check_wgmma_op(op, w_shape).is_ok() {
        v.push(Nf4Path::Wgmma);
        v.push(Nf4Path::WgmmaM256);
        if WgmmaKernel::Rs.check(op, w_shape).is_ok() {
            v.push(Nf4Path::WgmmaRs);
        }
    }
    v
}

/// The cache key of a product: rows up to 16 exactly (the GEMV range), above that the
/// next power of two, so a training run with varying token counts measures few shapes.
pub fn dispatch_key(op: Nf4Op, m: usize, w_shape: [usize; 2], out_f32: bool) -> String {
    let bucket = if m <= GEMV_MAX_M {
        m
    } else {
        m.next_power_of_two()
    };
    format!(
        "{} m<={bucket} n={} k={} {}",
        op.name(),
        w_shape[0],
        w_shape[1],
        if out_f32 { "f32" } else { "bf16" }
    )
}

impl Choice for Nf4Path {
    const FORMAT: &'static str = "palign-nf4-dispatch";
    const PREFIX: &'static str = "nf4-dispatch";
    const ENV: &'static str = "PALIGN_NF4_DISPATCH_CACHE";
}

/// A measured NF4 choice: the winner and each candidate's milliseconds per call.
pub type DispatchEntry = TuneEntry<Nf4Path>;
/// The NF4 dispatcher's measured choices for one GPU
/// (`~/.cache/palign/nf4-dispatch-<gpu>.json`).
pub type DispatchCache = TuneCache<Nf4Path>;

/// The GEMV variant measured fastest for one (m, n, k), by name
/// (`~/.cache/palign/nf4-gemv-<gpu>.json`). Every variant computes the same bits (the
/// GPU tests check it), so the choice changes speed only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GemvPick(pub String);

impl Choice for GemvPick {
    const FORMAT: &'static str = "palign-nf4-gemv";
    const PREFIX: &'static str = "nf4-gemv";
    const ENV: &'static str = "PALIGN_NF4_GEMV_CACHE";
}

/// The GEMV variant cache of one GPU.
pub type GemvCache = TuneCache<GemvPick>;

/// What the GEMV variant choice depends on: m, the weight's shape, blocksize and double
/// quantization, and whether the output is f32 ([`gemv_key`] spells it for the file).
type GemvShape = (usize, [usize; 2], usize, bool, bool);

/// The GEMV tuner's cache key: every m (decode batches shrink as sequences finish, and
/// the best variant depends on m), the weight's shape and scale format (the scale loads
/// differ), and the output type.
pub fn gemv_key(m: usize, w: &Nf4Weight, out_f32: bool) -> String {
    format!(
        "m={m} n={} k={} bs={}{} {}",
        w.shape[0],
        w.shape[1],
        w.blocksize,
        if w.is_double_quant() { " dq" } else { "" },
        if out_f32 { "f32" } else { "bf16" }
    )
}

/// Bytes written before each timed GEMV call of the tuner, so that the call reads its
/// weight from HBM as a model's decode does, not from L2: twice the L2, at least 96 MB
/// (L2 is 40 MB on an A100, 50 MB on an H100/H200). The buffer comes from the caching
/// pool and stays there for the next measurement.
fn l2_flush_bytes(gpu: &Gpu) -> usize {
    (2 * gpu.l2_bytes()).max(96 << 20)
}

/// Milliseconds per call of every GEMV variant (one warm-up, then 3 calls, each after an
/// L2 flush); None when the driver cannot time events.
fn measure_gemv(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: &mut Out<'_>,
) -> Result<Option<TuneEntry<GemvPick>>> {
    const REPS: usize = 3;
    // Without the memory for it (a full GPU mid-generation) the calls run unflushed.
    let mut flush = gpu.alloc::<u8>(l2_flush_bytes(gpu)).ok();
    let mut ms = BTreeMap::new();
    let mut best: Option<(&str, f64)> = None;
    for v in GEMV_VARIANTS {
        gemv_variant(gpu, x, m, w, out.reborrow(), *v)?;
        let mut total = 0.0;
        for _ in 0..REPS {
            if let Some(f) = flush.as_mut() {
                gpu.memset_zero(f)?;
            }
            let timer = gpu.timer()?;
            gemv_variant(gpu, x, m, w, out.reborrow(), *v)?;
            match timer.elapsed_ms(gpu) {
                Ok(t) => total += t as f64,
                Err(_) => return Ok(None),
            }
        }
        let t = total / REPS as f64;
        ms.insert(v.name.to_string(), t);
        if best.is_none_or(|(_, b)| t < b) {
            best = Some((v.name, t));
        }
    }
    Ok(best.map(|(name, _)| TuneEntry::new(GemvPick(name.to_string()), ms)))
}

/// Runs each NF4 product on the path measured fastest for its shape on this GPU.
pub struct Nf4Dispatcher {
    cache: Mutex<DispatchCache>,
    gemv: Mutex<GemvCache>,
    /// The GEMV variant resolved per [`GemvShape`] in this process: a decode step asks
    /// for it ~200 times a token, so it is looked up here without formatting a key or
    /// reading the cache's entries.
    gemv_resolved: Mutex<HashMap<GemvShape, GemvVariant>>,
    force: Option<Nf4Path>,
    wgmma: bool,
}

impl Nf4Dispatcher {
    /// With the on-disk cache of this GPU ([`DispatchCache::default_path`]);
    /// `PALIGN_NF4_PATH=gemv|fused|dequant_cublas|wgmma|wgmma_m256|wgmma_rs` forces a path
    /// where it applies;
    /// `PALIGN_NF4_WGMMA=1` adds the wgmma GEMM to the candidates on sm_90 ([`wgmma_gate`]).
    pub fn new(gpu: &Gpu) -> Result<Nf4Dispatcher> {
        let cache = DispatchCache::for_gpu(gpu.name());
        let force = match std::env::var("PALIGN_NF4_PATH") {
            Ok(v) if !v.is_empty() && v != "auto" => Some(Nf4Path::parse(&v).ok_or_else(|| {
                bad(format!(
                    "PALIGN_NF4_PATH={v:?}: expected auto, gemv, fused, dequant_cublas, wgmma, \
                     wgmma_m256 or wgmma_rs"
                ))
            })?),
            _ => None,
        };
        let env = std::env::var(WGMMA_ENV).ok();
        let wgmma = wgmma_gate(env.as_deref(), gpu.compute_capability(), TARGETS)?;
        Ok(Nf4Dispatcher::with_cache(cache, force)
            .with_gemv_cache(GemvCache::for_gpu(gpu.name()))
            .with_wgmma(wgmma))
    }

    /// Without the wgmma GEMM (see [`with_wgmma`](Self::with_wgmma)) and with an
    /// in-memory GEMV variant cache (see [`with_gemv_cache`](Self::with_gemv_cache)).
    pub fn with_cache(cache: DispatchCache, force: Option<Nf4Path>) -> Nf4Dispatcher {
        let gemv = GemvCache::in_memory(cache.gpu());
        Nf4Dispatcher {
            cache: Mutex::new(cache),
            gemv: Mutex::new(gemv),
            gemv_resolved: Mutex::new(HashMap::new()),
            force,
            wgmma: false,
        }
    }

    /// The GEMV variant choices kept in `cache`.
    pub fn with_gemv_cache(mut self, cache: GemvCache) -> Nf4Dispatcher {
        self.gemv = Mutex::new(cache);
        self.gemv_resolved = Mutex::new(HashMap::new());
        self
    }

    /// Whether the wgmma GEMM is a candidate (still only on a GPU that
    /// [`wgmma_supported`] accepts).
    pub fn with_wgmma(mut self, on: bool) -> Nf4Dispatcher {
        self.wgmma = on;
        self
    }

    pub fn wgmma_enabled(&self) -> bool {
        self.wgmma
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DispatchCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached choice for a key, if measured.
    pub fn cached(&self, key: &str) -> Option<DispatchEntry> {
        self.lock().get(key).cloned()
    }

    /// The cached GEMV variant choice for a key, if measured.
    pub fn cached_gemv(&self, key: &str) -> Option<TuneEntry<GemvPick>> {
        self.gemv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// The GEMV variant for `m` rows of `w` on this GPU: the one measured fastest (once
    /// per m and shape, each call after an L2 flush, then cached), or the default where
    /// events cannot be timed. Measuring writes the product into `out`.
    pub fn gemv_variant_for(
        &self,
        gpu: &Gpu,
        x: &DeviceBuffer<bf16>,
        m: usize,
        w: &Nf4Weight,
        out: &mut Out<'_>,
    ) -> Result<GemvVariant> {
        let default = default_gemv_variant(gpu.sm_count() as usize, w.shape[0]);
        if !gpu.can_time_events() {
            return Ok(default);
        }
        let shape = (m, w.shape, w.blocksize, w.is_double_quant(), out.is_f32());
        let resolved = || self.gemv_resolved.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = resolved().get(&shape) {
            return Ok(*v);
        }
        let key = gemv_key(m, w, out.is_f32());
        let names: Vec<&str> = GEMV_VARIANTS.iter().map(|v| v.name).collect();
        let cached = self.cached_gemv(&key).and_then(|e| {
            // An entry from before a variant existed is measured again.
            gemv_by_name(&e.choice.0).filter(|_| e.covers(&e.choice.0, &names))
        });
        let v = match cached {
            Some(v) => v,
            None => match measure_gemv(gpu, x, m, w, out)? {
                Some(entry) => {
                    let v = gemv_by_name(&entry.choice.0).unwrap_or(default);
                    let mut cache = self.gemv.lock().unwrap_or_else(|e| e.into_inner());
                    cache.insert(key, entry);
                    // Best effort, as the path cache.
                    let _ = cache.save();
                    v
                }
                // Events stopped timing: the default, kept for this process only.
                None => default,
            },
        };
        resolved().insert(shape, v);
        Ok(v)
    }

    /// Runs one path (no choice involved; the GEMV path runs its default variant).
    pub fn run_path(
        gpu: &Gpu,
        path: Nf4Path,
        op: Nf4Op,
        a: &DeviceBuffer<bf16>,
        m: usize,
        w: &Nf4Weight,
        out: Out<'_>,
    ) -> Result<()> {
        let v = default_gemv_variant(gpu.sm_count() as usize, w.shape[0]);
        Self::run_path_with(gpu, path, v, op, a, m, w, out)
    }

    /// [`run_path`](Self::run_path) with the GEMV variant `v` for the GEMV path.
    #[allow(clippy::too_many_arguments)]
    pub fn run_path_with(
        gpu: &Gpu,
        path: Nf4Path,
        v: GemvVariant,
        op: Nf4Op,
        a: &DeviceBuffer<bf16>,
        m: usize,
        w: &Nf4Weight,
        out: Out<'_>,
    ) -> Result<()> {
        match (path, out) {
            (Nf4Path::Gemv, out) if op == Nf4Op::Forward => gemv_variant(gpu, a, m, w, out, v),
            (Nf4Path::Fused, out) => gemm_fused(gpu, op, a, m, w, out),
            (Nf4Path::DequantCublas, Out::Bf16(o)) => gemm_dequant_cublas(gpu, op, a, m, w, o),
            (Nf4Path::Wgmma, out) => gemm_wgmma_op(gpu, WgmmaKernel::M128, op, a, m, w, out),
            (Nf4Path::WgmmaM256, out) => gemm_wgmma_op(gpu, WgmmaKernel::M256, op, a, m, w, out),
            (Nf4Path::WgmmaRs, out) => gemm_wgmma_op(gpu, WgmmaKernel::Rs, op, a, m, w, out),
            (p, out) => Err(bad(format!(
                "NF4 path {} cannot compute {} with {} output",
                p.name(),
                op.name(),
                if out.is_f32() { "f32" } else { "bf16" }
            ))),
        }
    }

    /// `op` for `m` rows of `a` into `out`, on the fastest path; returns the path used.
    /// The first call for a shape times every candidate (a few runs each, all writing
    /// the same product into `out`), remembers the winner and saves the cache file.
    pub fn matmul(
        &self,
        gpu: &Gpu,
        op: Nf4Op,
        a: &DeviceBuffer<bf16>,
        m: usize,
        w: &Nf4Weight,
        mut out: Out<'_>,
    ) -> Result<Nf4Path> {
        check_io(op, m, w.shape, a.len(), out.len())?;
        if m == 0 {
            return Ok(Nf4Path::Fused);
        }
        let wgmma = self.wgmma && wgmma_supported(gpu.compute_capability(), TARGETS);
        let cands = candidates_with(op, m, w.shape, out.is_f32(), wgmma);
        let Some(&first) = cands.first() else {
            return Err(bad(format!(
                "NF4 {}: no kernel supports weight {:?} with {} output",
                op.name(),
                w.shape,
                if out.is_f32() { "f32" } else { "bf16" }
            )));
        };
        // The GEMV variant is chosen (measured once) wherever the GEMV path may run, so
        // the path choice below times the GEMV at its best.
        let gemv_v = if cands.contains(&Nf4Path::Gemv)
            && self
                .force
                .is_none_or(|f| f == Nf4Path::Gemv || !cands.contains(&f))
        {
            self.gemv_variant_for(gpu, a, m, w, &mut out)?
        } else {
            default_gemv_variant(gpu.sm_count() as usize, w.shape[0])
        };
        let path = if let Some(f) = self.force.filter(|f| cands.contains(f)) {
            f
        } else if cands.len() == 1 || !gpu.can_time_events() {
            // Nothing to choose, or no way to time it: the first candidate, uncached.
            first
        } else {
            let key = dispatch_key(op, m, w.shape, out.is_f32());
            match self.cached(&key) {
                // An entry timed without one of today's candidates (the opt-in wgmma
                // GEMM) is measured again.
                Some(e) if entry_covers(&e, &cands) => e.choice,
                _ => match measure(gpu, &cands, gemv_v, op, a, m, w, &mut out)? {
                    Some(entry) => {
                        let choice = entry.choice;
                        let mut cache = self.lock();
                        cache.insert(key, entry);
                        // Best effort: a read-only cache folder costs a re-measure later.
                        let _ = cache.save();
                        choice
                    }
                    // No event timing on this driver: the fused kernels, uncached.
                    None => first,
                },
            }
        };
        Self::run_path_with(gpu, path, gemv_v, op, a, m, w, out)?;
        Ok(path)
    }
}

/// Whether a cached entry chose one of `cands` and timed all of them.
pub fn entry_covers(e: &DispatchEntry, cands: &[Nf4Path]) -> bool {
    let names: Vec<&str> = cands.iter().map(|c| c.name()).collect();
    e.covers(e.choice.name(), &names)
}

/// Milliseconds per call of each candidate (one warm-up, then 3 timed calls); None
/// when the driver cannot time events.
#[allow(clippy::too_many_arguments)]
fn measure(
    gpu: &Gpu,
    cands: &[Nf4Path],
    gemv_v: GemvVariant,
    op: Nf4Op,
    a: &DeviceBuffer<bf16>,
    m: usize,
    w: &Nf4Weight,
    out: &mut Out<'_>,
) -> Result<Option<DispatchEntry>> {
    const REPS: usize = 3;
    let mut ms = BTreeMap::new();
    let mut best: Option<(Nf4Path, f64)> = None;
    for &c in cands {
        Nf4Dispatcher::run_path_with(gpu, c, gemv_v, op, a, m, w, out.reborrow())?;
        let timer = gpu.timer()?;
        for _ in 0..REPS {
            Nf4Dispatcher::run_path_with(gpu, c, gemv_v, op, a, m, w, out.reborrow())?;
        }
        let t = match timer.elapsed_ms(gpu) {
            Ok(t) => t as f64 / REPS as f64,
            Err(_) => return Ok(None),
        };
        ms.insert(c.name().to_string(), t);
        if best.is_none_or(|(_, b)| t < b) {
            best = Some((c, t));
        }
    }
    Ok(best.map(|(choice, _)| DispatchEntry::new(choice, ms)))
}
