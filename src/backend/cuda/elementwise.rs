//! Launchers for kernels/elementwise.cu: residual adds, axpy, products, dropout and the
//! row gather / scatter-add / copy the model needs between the big ops.
//!
//! Every op is bf16 in and out with f32 math and one rounding at the store; the math is
//! written at the top of the .cu file. Like `ops`, each launcher checks the lengths the
//! kernel relies on and queues the launch on the device's stream. Row indices live on the
//! device, so they cannot be checked here: the kernels skip (or, for a gather, zero) rows
//! whose index is out of range instead of touching memory outside the buffers.

use cudarc::driver::DeviceRepr;
use half::bf16;

use super::launch::{elems, flat_grid, need, rows_of, to_i32, FLAT_BLOCK as BLOCK};
use super::params::*;
use super::{DeviceBuffer, Gpu};
use crate::error::{bad, Result};

// SAFETY: bindgen's #[repr(C)] translations of kernels/params.h, made of u64/i64/i32/f32
// fields without padding (bytemuck::Pod is derived, which checks that); each is the
// kernel's only argument, passed by value.
unsafe impl DeviceRepr for AddBf16Params {}
unsafe impl DeviceRepr for AxpyBf16Params {}
unsafe impl DeviceRepr for MulBf16Params {}
unsafe impl DeviceRepr for DropoutBf16Params {}
unsafe impl DeviceRepr for GatherRowsParams {}
unsafe impl DeviceRepr for ScatterAddRowsParams {}
unsafe impl DeviceRepr for CopyRowsParams {}

fn to_i64(x: usize) -> i64 {
    // A buffer's element count is below 2^63 (it is a byte count divided by >= 2).
    x as i64
}

/// (blocks, threads) for a row kernel: one row per block per step, the threads across
/// the row (8 wide when it vectorizes), so short rows do not idle 256 threads.
fn row_launch(gpu: &Gpu, n_rows: usize, cols: usize) -> (u32, u32) {
    let units = if cols.is_multiple_of(8) {
        cols / 8
    } else {
        cols
    };
    let threads = units.next_multiple_of(32).clamp(32, 256) as u32;
    let blocks = n_rows.min(gpu.sm_count() as usize * 32) as u32;
    (blocks, threads)
}

/// `y[i] = bf16(y[i] + x[i])` for `i < x.len()` (residual adds).
pub fn add_bf16(gpu: &Gpu, x: &DeviceBuffer<bf16>, y: &mut DeviceBuffer<bf16>) -> Result<()> {
    let n = x.len();
    need(y, n, "add y")?;
    let p = AddBf16Params {
        y: y.ptr(),
        x: x.ptr(),
        n: to_i64(n),
    };
    gpu.launch("add_bf16", flat_grid(gpu, n), BLOCK, &p)
}

/// `y[i] = bf16(y[i] + alpha·x[i])` for `i < x.len()`; the product is rounded to f32
/// before the add (no FMA), as the CPU's `*y += alpha * x`.
pub fn axpy_bf16(
    gpu: &Gpu,
    alpha: f32,
    x: &DeviceBuffer<bf16>,
    y: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let n = x.len();
    need(y, n, "axpy y")?;
    let p = AxpyBf16Params {
        y: y.ptr(),
        x: x.ptr(),
        n: to_i64(n),
        alpha,
        _pad: 0,
    };
    gpu.launch("axpy_bf16", flat_grid(gpu, n), BLOCK, &p)
}

/// `out[i] = bf16(a[i]·b[i])` for `i < a.len()`.
pub fn mul_bf16(
    gpu: &Gpu,
    a: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let n = a.len();
    need(b, n, "mul b")?;
    need(out, n, "mul out")?;
    let p = MulBf16Params {
        out: out.ptr(),
        a: a.ptr(),
        b: b.ptr(),
        n: to_i64(n),
    };
    gpu.launch("mul_bf16", flat_grid(gpu, n), BLOCK, &p)
}

/// Inverted dropout for `i < x.len()`: `out[i] = bf16(x[i]·scale)` when
/// `cpu::rng::dropout_keep(stream, i, p)`, else 0, with `scale = 1/(1−p)` in f32.
/// `stream` is `cpu::rng::dropout_stream(seed, step, call)`. The backward is the same
/// call on the output gradient with the same `stream` and `p`. `p` must be in [0, 1).
pub fn dropout_bf16(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    stream: u64,
    p: f32,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(bad(format!("dropout: p = {p} is not in [0, 1)")));
    }
    let n = x.len();
    need(out, n, "dropout out")?;
    let params = DropoutBf16Params {
        out: out.ptr(),
        x: x.ptr(),
        n: to_i64(n),
        stream,
        p,
        scale: 1.0 / (1.0 - p),
    };
    gpu.launch("dropout_bf16", flat_grid(gpu, n), BLOCK, &params)
}

/// `out[r, :] = x[rows[r], :]` for `r < rows.len()`; `x` is `[n_src, cols]`, `out` at
/// least `[rows.len(), cols]`. An index `>= n_src` gives a zero row.
pub fn gather_rows_bf16(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    cols: usize,
    rows: &DeviceBuffer<u32>,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let n_src = rows_of(x.len(), cols, "gather x")?;
    let n_rows = rows.len();
    need(out, elems(n_rows, cols, "gather out")?, "gather out")?;
    let p = GatherRowsParams {
        out: out.ptr(),
        x: x.ptr(),
        rows: rows.ptr(),
        n_rows: to_i32(n_rows, "gather rows")?,
        cols: to_i32(cols, "cols")?,
        n_src: to_i32(n_src, "gather source rows")?,
        _pad: 0,
    };
    let (blocks, threads) = row_launch(gpu, n_rows, cols);
    gpu.launch("gather_rows_bf16", blocks, threads, &p)
}

/// `dst[rows[r], :] = bf16(dst[rows[r], :] + src[r, :])` for `r < rows.len()`; `dst` is
/// `[n_dst, cols]`, `src` at least `[rows.len(), cols]` (the backward of a gather).
/// The indices must be distinct (no atomics: a repeated row would race); an index
/// `>= n_dst` is skipped.
pub fn scatter_add_rows_bf16(
    gpu: &Gpu,
    src: &DeviceBuffer<bf16>,
    cols: usize,
    rows: &DeviceBuffer<u32>,
    dst: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let n_dst = rows_of(dst.len(), cols, "scatter-add dst")?;
    let n_rows = rows.len();
    need(
        src,
        elems(n_rows, cols, "scatter-add src")?,
        "scatter-add src",
    )?;
    let p = ScatterAddRowsParams {
        dst: dst.ptr(),
        src: src.ptr(),
        rows: rows.ptr(),
        n_rows: to_i32(n_rows, "scatter-add rows")?,
        cols: to_i32(cols, "cols")?,
        n_dst: to_i32(n_dst, "scatter-add destination rows")?,
        _pad: 0,
    };
    let (blocks, threads) = row_launch(gpu, n_rows, cols);
    gpu.launch("scatter_add_rows_bf16", blocks, threads, &p)
}

/// `dst[dst_rows[r], :] = src[src_rows[r], :]` for `r < src_rows.len()` (KV-cache
/// writes); `src` is `[n_src, cols]`, `dst` `[n_dst, cols]`, the two index lists have
/// the same length. A pair with either index out of range is skipped. With repeated
/// destination rows the copy that lands is unspecified.
pub fn copy_rows_bf16(
    gpu: &Gpu,
    src: &DeviceBuffer<bf16>,
    src_rows: &DeviceBuffer<u32>,
    dst: &mut DeviceBuffer<bf16>,
    dst_rows: &DeviceBuffer<u32>,
    cols: usize,
) -> Result<()> {
    let n_src = rows_of(src.len(), cols, "copy-rows src")?;
    let n_dst = rows_of(dst.len(), cols, "copy-rows dst")?;
    let n_rows = src_rows.len();
    if dst_rows.len() != n_rows {
        return Err(bad(format!(
            "copy-rows: {n_rows} source rows but {} destination rows",
            dst_rows.len()
        )));
    }
    let p = CopyRowsParams {
        dst: dst.ptr(),
        src: src.ptr(),
        dst_rows: dst_rows.ptr(),
        src_rows: src_rows.ptr(),
        n_rows: to_i32(n_rows, "copy rows")?,
        cols: to_i32(cols, "cols")?,
        n_dst: to_i32(n_dst, "copy-rows destination rows")?,
        n_src: to_i32(n_src, "copy-rows source rows")?,
    };
    let (blocks, threads) = row_launch(gpu, n_rows, cols);
    gpu.launch("copy_rows_bf16", blocks, threads, &p)
}
