//! bf16 GEMM through cuBLAS (`cublasGemmEx`, bf16 in, bf16 or f32 out, f32 accumulation).
//!
//! Convention: every matrix is ROW-major, as everywhere in palign. cuBLAS is
//! column-major, and a row-major `[r, c]` matrix is the column-major `[c, r]` matrix
//! (its transpose), so the row-major `C = op(A)·op(B)` is computed as the column-major
//! `Cᵀ = op(B)ᵀ·op(A)ᵀ`: operands swapped, dimensions m and n swapped, and each
//! leading dimension is the stored row length. For `Y = X·Wᵀ` (nn.Linear, W `[n, k]`)
//! that is `cublasGemmEx(T, N, n, m, k, W, lda=k, X, ldb=k, Y, ldc=n)`.

use std::ffi::c_void;

use cudarc::cublas::{result as cublas, sys as cublas_sys};
use half::bf16;

use super::alloc::{Block, DeviceBuffer};
use super::device::Gpu;
use crate::error::{bad, Error, Result};

/// cuBLAS asks for 32 MiB of workspace on Hopper (cuBLAS docs, cublasSetWorkspace);
/// giving it one from the pool keeps cuBLAS from allocating on its own.
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLAS handle bound to the device's stream, with its workspace.
pub struct Blas {
    handle: cublas_sys::cublasHandle_t,
    _workspace: Block,
}

// SAFETY: the handle is only used under Gpu's mutex, one thread at a time.
unsafe impl Send for Blas {}

impl Blas {
    pub(crate) fn new(gpu: &Gpu) -> Result<Blas> {
        // SAFETY: only tries to dlopen libcublas and closes it again.
        if !unsafe { cublas_sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcublas could not be loaded (install the CUDA toolkit's cuBLAS, or put its \
                 lib folder on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let err =
            |what: &'static str| move |e: cublas::CublasError| Error::Cuda(format!("{what}: {e}"));
        gpu.context()
            .bind_to_thread()
            .map_err(|e| Error::Cuda(format!("bind context: {e}")))?;
        let handle = cublas::create_handle().map_err(err("cublasCreate"))?;
        let workspace = gpu.alloc::<u8>(WORKSPACE_BYTES)?;
        let blas = Blas {
            handle,
            _workspace: workspace.into_block(),
        };
        // SAFETY: valid handle and stream; the workspace lives as long as the handle.
        unsafe {
            cublas::set_stream(blas.handle, gpu.stream().cu_stream() as _)
                .map_err(err("cublasSetStream"))?;
            cublas_sys::cublasSetWorkspace_v2(
                blas.handle,
                blas._workspace.ptr() as *mut c_void,
                WORKSPACE_BYTES,
            )
            .result()
            .map_err(err("cublasSetWorkspace"))?;
        }
        Ok(blas)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { cublas::destroy_handle(self.handle) };
    }
}

/// Shapes of a row-major GEMM `C[m, n] = alpha·op(A)·op(B) + beta·C`, where `op(A)` is
/// `[m, k]` (A stored `[m, k]`, or `[k, m]` when `trans_a`) and `op(B)` is `[k, n]`
/// (B stored `[k, n]`, or `[n, k]` when `trans_b`).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// `Y[m, n] = X[m, k] · W[n, k]ᵀ`, the nn.Linear forward.
    pub fn linear(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            m,
            n,
            k,
            trans_a: false,
            trans_b: true,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

fn dim(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| bad(format!("gemm: {what} = {x} exceeds i32")))
}

/// Run `g` on bf16 row-major buffers (see the module docs for the convention).
pub fn gemm_bf16(
    gpu: &Gpu,
    g: Gemm,
    a: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    c: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    gemm_ex(gpu, g, a, b, c, cublas_sys::cudaDataType::CUDA_R_16BF)
}

/// Run `g` with bf16 `a`, `b` and an f32 `c` (same convention; f32 accumulation, no
/// rounding of C to bf16). With `beta = 1` it accumulates into `c`: the LoRA weight
/// gradients `dA += s·(dY·B)ᵀ·X` are summed over micro-batches this way, in f32.
pub fn gemm_bf16_f32out(
    gpu: &Gpu,
    g: Gemm,
    a: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    c: &mut DeviceBuffer<f32>,
) -> Result<()> {
    gemm_ex(gpu, g, a, b, c, cublas_sys::cudaDataType::CUDA_R_32F)
}

/// The shared body: shape and size checks, then the row-major → column-major swap of
/// the module docs. `c_type` must be the cuBLAS type of `C` (bf16 or f32).
fn gemm_ex<C: bytemuck::Pod>(
    gpu: &Gpu,
    g: Gemm,
    a: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    c: &mut DeviceBuffer<C>,
    c_type: cublas_sys::cudaDataType,
) -> Result<()> {
    let (m, n, k) = (dim(g.m, "m")?, dim(g.n, "n")?, dim(g.k, "k")?);
    // Each product fits: all three dims are below 2^31.
    if a.len() < g.m * g.k || b.len() < g.k * g.n || c.len() < g.m * g.n {
        return Err(bad(format!(
            "gemm: buffers too small for m={} n={} k={} (a {}, b {}, c {})",
            g.m,
            g.n,
            g.k,
            a.len(),
            b.len(),
            c.len()
        )));
    }
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    use cublas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    // Leading dimension = the stored row length of each row-major operand.
    let lda = if g.trans_b { k } else { n }; // B as cuBLAS's first operand
    let ldb = if g.trans_a { m } else { k }; // A as cuBLAS's second operand
    let bf = cublas_sys::cudaDataType::CUDA_R_16BF;
    gpu.with_blas(|blas| {
        gpu.context()
            .bind_to_thread()
            .map_err(|e| Error::Cuda(format!("bind context: {e}")))?;
        // SAFETY: the buffers hold at least the elements the shapes address (checked
        // above) and `c_type` is C's element type (the two callers pair them);
        // alpha/beta are host f32 as CUBLAS_COMPUTE_32F expects.
        unsafe {
            cublas::gemm_ex(
                blas.handle,
                op(g.trans_b),
                op(g.trans_a),
                n,
                m,
                k,
                &g.alpha as *const f32 as *const c_void,
                b.ptr() as *const c_void,
                bf,
                lda.max(1),
                a.ptr() as *const c_void,
                bf,
                ldb.max(1),
                &g.beta as *const f32 as *const c_void,
                c.ptr() as *mut c_void,
                c_type,
                n,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Cuda(format!("cublasGemmEx: {e}")))
    })
}
