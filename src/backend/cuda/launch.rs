//! Checks and grid sizes shared by the launchers: a kernel trusts the lengths and
//! integer widths it is given, so each launcher checks them here first.

use super::{DeviceBuffer, Gpu};
use crate::error::{bad, Result};

/// Threads per block of the flat (grid-stride, 8 elements per thread) kernels.
pub(crate) const FLAT_BLOCK: u32 = 256;

pub(crate) fn to_i32(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| bad(format!("{what} = {x} does not fit the kernel's i32")))
}

pub(crate) fn to_u32(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| bad(format!("{what} = {x} does not fit a launch grid")))
}

/// `buf` holds at least `n` elements.
pub(crate) fn need<T: bytemuck::Pod>(buf: &DeviceBuffer<T>, n: usize, what: &str) -> Result<()> {
    if buf.len() < n {
        return Err(bad(format!(
            "{what}: buffer holds {} elements, needs {n}",
            buf.len()
        )));
    }
    Ok(())
}

/// `rows·cols` elements, or an error when that overflows.
pub(crate) fn elems(rows: usize, cols: usize, what: &str) -> Result<usize> {
    rows.checked_mul(cols)
        .ok_or_else(|| bad(format!("{what}: {rows} rows of {cols} overflow")))
}

/// Rows of `cols` elements in a buffer of `len` elements.
pub(crate) fn rows_of(len: usize, cols: usize, what: &str) -> Result<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return Err(bad(format!(
            "{what}: {len} elements are not rows of {cols}"
        )));
    }
    Ok(len / cols)
}

/// Blocks for a flat kernel of [`FLAT_BLOCK`] threads: one step per thread, capped at
/// 16 per SM (the grid-stride loop covers the rest).
pub(crate) fn flat_grid(gpu: &Gpu, n: usize) -> u32 {
    let want = n.div_ceil(8 * FLAT_BLOCK as usize);
    want.min(gpu.sm_count() as usize * 16) as u32
}
