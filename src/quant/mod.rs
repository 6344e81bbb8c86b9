//! NF4 quantization in the bitsandbytes format.
//!
//! A weight [out, in] is flattened row-major and cut into blocks of `blocksize`
//! (64 by default). Each block keeps its absolute maximum; each element becomes the
//! 4-bit index of the nearest NF4 code to `x / absmax`, two per byte, element 2j in the
//! high nibble. With double quantization the absmax vector is itself quantized:
//! `offset = mean(absmax)`, then `absmax - offset` in blocks of 256 with bitsandbytes'
//! signed 8-bit dynamic map, each 256-block keeping an f32 absmax of its own.
//!
//! Quantization follows bitsandbytes 0.50.2 on the CPU bit for bit
//! (tests/nf4_bnb.rs checks it against fixtures from tools/make_nf4_fixtures.py).
//! Dequantization is `NF4[q] * absmax` in f32, the formula of every bnb kernel.

mod bnb;
pub mod tables;

pub use bnb::BnbEntry;
pub use tables::{dynamic_map, NF4_CODE};

use crate::error::{bad, Result};
use rayon::prelude::*;

/// Default NF4 block size (bitsandbytes' default for `quantize_4bit`).
pub const DEFAULT_BLOCKSIZE: usize = 64;
/// Block size of the double-quantized absmax (bitsandbytes' `quantize_4bit` passes 256).
pub const NESTED_BLOCKSIZE: usize = 256;

/// The dtype the weight had before quantization; bitsandbytes records it in the
/// quant-state JSON ("dtype") and dequantizes back to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDtype {
    F32,
    BF16,
    F16,
}

impl SourceDtype {
    /// The name bitsandbytes writes: `str(torch.dtype).strip("torch.")`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceDtype::F32 => "float32",
            SourceDtype::BF16 => "bfloat16",
            SourceDtype::F16 => "float16",
        }
    }

    pub fn parse(name: &str) -> Option<SourceDtype> {
        match name {
            "float32" => Some(SourceDtype::F32),
            "bfloat16" => Some(SourceDtype::BF16),
            "float16" => Some(SourceDtype::F16),
            _ => None,
        }
    }
}

/// Double-quantized absmax: `absmax[i] = code2[q[i]] * absmax2[i / blocksize2] + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    pub q: Vec<u8>,
    /// 256 entries; bitsandbytes' dynamic map when palign quantized it.
    pub code2: Vec<f32>,
    pub absmax2: Vec<f32>,
    pub offset: f32,
    pub blocksize2: usize,
}

/// Per-block scales of an NF4 tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(DoubleQuant),
}

/// A 2-D weight in bitsandbytes' NF4 format.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    /// [out, in] as the original weight.
    pub shape: [usize; 2],
    pub blocksize: usize,
    /// (numel + 1) / 2 bytes; element 2j in the high nibble of byte j.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub dtype: SourceDtype,
}

/// Checks a block size the way bitsandbytes does (`quantize_4bit` accepts 32..4096,
/// powers of two).
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if (32..=4096).contains(&blocksize) && blocksize.is_power_of_two() {
        Ok(())
    } else {
        Err(bad(format!(
            "invalid NF4 blocksize {blocksize}: must be a power of two from 32 to 4096"
        )))
    }
}

/// Quantizes an f32 weight [out, in] to NF4. See [`quantize_nf4_from`].
pub fn quantize_nf4(
    w: &[f32],
    shape: [usize; 2],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    quantize_nf4_from(w, SourceDtype::F32, shape, blocksize, double_quant)
}

/// Quantizes a weight [out, in] whose values came from `dtype` (bf16/f16 widened to
/// f32 exactly, as bitsandbytes does with `.float()`); `dtype` is only recorded.
pub fn quantize_nf4_from(
    w: &[f32],
    dtype: SourceDtype,
    shape: [usize; 2],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    check_blocksize(blocksize)?;
    let n = shape[0]
        .checked_mul(shape[1])
        .ok_or_else(|| bad(format!("NF4 shape {shape:?} overflows")))?;
    if n == 0 {
        return Err(bad(format!(
            "cannot quantize an empty weight of shape {shape:?}"
        )));
    }
    if w.len() != n {
        return Err(bad(format!(
            "NF4 quantize: {} values for shape {shape:?} ({n} expected)",
            w.len()
        )));
    }
    let nblocks = n.div_ceil(blocksize);
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0.0f32; nblocks];
    let mids = tables::nf4_midpoints();
    packed
        .par_chunks_mut(blocksize / 2)
        .zip(absmax.par_iter_mut())
        .enumerate()
        .with_min_len(64)
        .for_each(|(b, (bytes, am))| {
            let start = b * blocksize;
            let end = (start + blocksize).min(n);
            *am = quantize_block(&w[start..end], end - start == blocksize, &mids, bytes);
        });
    let absmax = if double_quant {
        Absmax::Double(double_quantize(&absmax))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Nf4Tensor {
        shape,
        blocksize,
        packed,
        absmax,
        dtype,
    })
}

/// Quantizes one block into `bytes` and returns the absmax bitsandbytes stores for it.
/// bnb 0.50.2 CPU (`backends/default/ops.py`): a full block is scaled by
/// `x * (1 / max(absmax, 1e-38))` and stores the raw absmax; the trailing partial block
/// is scaled by `x / max(absmax, 1e-38)` and stores the clamped absmax. An odd element
/// count is padded with 0.0 (code 7) in the last low nibble.
fn quantize_block(x: &[f32], full: bool, mids: &[f32; 15], bytes: &mut [u8]) -> f32 {
    let tiny = 1e-38f64 as f32; // torch's clamp(min=1e-38) rounds the Python float to f32
                                // Max in 8 independent lanes (max is exact, so the order does not matter).
    let mut lanes = [0.0f32; 8];
    for c in x.chunks(8) {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = l.max(v.abs());
        }
    }
    let am = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
    let clamped = am.max(tiny);
    let recip = 1.0 / clamped;
    // 32 values at a time: scale, count the midpoints below each value one midpoint at
    // a time (straight loops the compiler vectorizes), then pack.
    const CHUNK: usize = 32;
    for (xs, out) in x.chunks(CHUNK).zip(bytes.chunks_mut(CHUNK / 2)) {
        let mut scaled = [0.0f32; CHUNK]; // an odd tail keeps the 0.0 padding
        if full {
            for (s, &v) in scaled.iter_mut().zip(xs) {
                *s = (v * recip).clamp(-1.0, 1.0);
            }
        } else {
            for (s, &v) in scaled.iter_mut().zip(xs) {
                *s = (v / clamped).clamp(-1.0, 1.0);
            }
        }
        let mut codes = [0u8; CHUNK];
        for &m in mids {
            for (c, &s) in codes.iter_mut().zip(&scaled) {
                *c += (m < s) as u8;
            }
        }
        for (byte, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
    }
    if full {
        am
    } else {
        clamped
    }
}

/// Double quantization of the absmax vector, as bitsandbytes 0.50.2 does it on the
/// CPU: `offset = absmax.mean()` (torch's f32 reduction order), then
/// `quantize_blockwise(absmax - offset, blocksize=256)` with the dynamic map, which on
/// the CPU is csrc/cpu_ops.cpp `quantize_cpu_impl`: per 256-block absmax `am` (0 for
/// an all-zero block, whose codes are then all 0), `v = clamp(x * (1/am), -1, 1)`,
/// code = `lut[trunc(fma((v + 1) * 0.5, 65535, 0.5))]` (the compiled library fuses the
/// last multiply-add).
fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let offset = tables::torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let lut = tables::dynamic_lut8();
    let nb2 = centered.len().div_ceil(NESTED_BLOCKSIZE);
    let mut q = vec![0u8; centered.len()];
    let mut absmax2 = vec![0.0f32; nb2];
    for ((chunk, qs), am2) in centered
        .chunks(NESTED_BLOCKSIZE)
        .zip(q.chunks_mut(NESTED_BLOCKSIZE))
        .zip(absmax2.iter_mut())
    {
        // std::max-style fold from -inf skips NaN; the final max with 0 is vmaxss(0, m).
        let m = chunk.iter().fold(
            f32::NEG_INFINITY,
            |m, v| if v.abs() > m { v.abs() } else { m },
        );
        let am = if 0.0 > m { 0.0 } else { m };
        *am2 = am;
        if am == 0.0 {
            continue;
        }
        let inv = 1.0 / am;
        for (&x, qv) in chunk.iter().zip(qs.iter_mut()) {
            let v = (x * inv).clamp(-1.0, 1.0);
            let t = ((v + 1.0) * 0.5).mul_add((tables::LUT8_SIZE - 1) as f32, 0.5);
            // cvttss2si then a 16-bit zero-extend; NaN gives index 0 either way.
            *qv = lut[(t as i32) as u16 as usize];
        }
    }
    DoubleQuant {
        q,
        code2: dynamic_map().to_vec(),
        absmax2,
        offset,
        blocksize2: NESTED_BLOCKSIZE,
    }
}

impl Nf4Tensor {
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    pub fn nblocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Bytes of the tensors bitsandbytes saves for this weight (packed codes, absmax,
    /// quant_map, and with double quantization nested absmax and nested quant_map),
    /// leaving out the small JSON blob.
    pub fn nbytes(&self) -> usize {
        let scales = match &self.absmax {
            Absmax::Plain(a) => 4 * a.len(),
            Absmax::Double(d) => d.q.len() + 4 * d.absmax2.len() + 4 * d.code2.len(),
        };
        self.packed.len() + scales + 4 * NF4_CODE.len()
    }

    /// Storage per parameter: about 4.127 with double quantization at blocksize 64,
    /// 4.5 without.
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.nbytes() as f64 / self.numel() as f64
    }

    /// Scale of block b in f32: the stored absmax, or with double quantization
    /// `code2[q] * absmax2 + offset`, rounded after each step like bitsandbytes'
    /// `dequantize_blockwise` followed by `absmax += offset`.
    #[inline]
    pub fn block_scale(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::Plain(a) => a[b],
            Absmax::Double(d) => {
                let v = d.code2[d.q[b] as usize] * d.absmax2[b / d.blocksize2];
                v + d.offset
            }
        }
    }

    /// All block scales in f32.
    pub fn scales(&self) -> Vec<f32> {
        (0..self.nblocks()).map(|b| self.block_scale(b)).collect()
    }

    /// Dequantizes the whole weight into `out` (numel values, row-major), in parallel.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.numel() {
            return Err(bad(format!(
                "NF4 dequantize: output has {} values, weight {:?} has {}",
                out.len(),
                self.shape,
                self.numel()
            )));
        }
        self.dequant_par(out);
        Ok(())
    }

    /// Dequantizes rows `row_start..row_end` into `out` ((row_end-row_start)*in values).
    pub fn dequantize_rows(&self, row_start: usize, row_end: usize, out: &mut [f32]) -> Result<()> {
        let [rows, cols] = self.shape;
        if row_start > row_end || row_end > rows {
            return Err(bad(format!(
                "NF4 dequantize: rows {row_start}..{row_end} outside 0..{rows}"
            )));
        }
        if out.len() != (row_end - row_start) * cols {
            return Err(bad(format!(
                "NF4 dequantize: output has {} values, rows {row_start}..{row_end} need {}",
                out.len(),
                (row_end - row_start) * cols
            )));
        }
        self.dequant_span(row_start * cols, out);
        Ok(())
    }

    /// Dequantizes elements `start..start + out.len()` (any range inside the tensor).
    fn dequant_span(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        let mut e = start;
        let mut o = 0;
        while e < end {
            let b = e / self.blocksize;
            let block_end = ((b + 1) * self.blocksize).min(end);
            let s = self.block_scale(b);
            if e % 2 == 1 {
                out[o] = NF4_CODE[(self.packed[e / 2] & 15) as usize] * s;
                e += 1;
                o += 1;
            }
            // Blocks have even size, so inside one the bytes are whole.
            let pairs = (block_end - e) / 2;
            let bytes = &self.packed[e / 2..e / 2 + pairs];
            for (byte, dst) in bytes.iter().zip(out[o..o + 2 * pairs].chunks_exact_mut(2)) {
                dst[0] = NF4_CODE[(byte >> 4) as usize] * s;
                dst[1] = NF4_CODE[(byte & 15) as usize] * s;
            }
            e += 2 * pairs;
            o += 2 * pairs;
            if e < block_end {
                out[o] = NF4_CODE[(self.packed[e / 2] >> 4) as usize] * s;
                e += 1;
                o += 1;
            }
        }
    }

    /// Dequantizes into a new vector.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.numel()];
        self.dequant_par(&mut out);
        out
    }

    /// Parallel dequantization over chunks of whole blocks (out holds numel values).
    fn dequant_par(&self, out: &mut [f32]) {
        let chunk = self.blocksize * (16384 / self.blocksize).max(1);
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, dst)| self.dequant_span(c * chunk, dst));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-normal values (sum of uniforms), no RNG crate needed.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                let mut acc = 0.0f32;
                for _ in 0..4 {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                }
                acc * 0.05
            })
            .collect()
    }

    #[test]
    fn blocksize_validation() {
        let w = vec![0.5f32; 64 * 64];
        for bs in [0, 16, 48, 100, 8192, 65] {
            let e = quantize_nf4(&w, [64, 64], bs, false).unwrap_err();
            assert!(e.is_bad_input(), "{bs}");
        }
        for bs in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            assert!(quantize_nf4(&w, [64, 64], bs, true).is_ok(), "{bs}");
        }
        assert!(quantize_nf4(&w, [64, 63], 64, false)
            .unwrap_err()
            .is_bad_input());
        assert!(quantize_nf4(&[], [0, 5], 64, false)
            .unwrap_err()
            .is_bad_input());
    }

    #[test]
    fn packing_order_high_nibble_first() {
        // Block of 64: element 0 = -absmax (code 0), element 1 = +absmax (code 15),
        // element 2 = 0 (code 7), element 3 = -absmax.
        let mut w = vec![0.0f32; 64];
        w[0] = -2.0;
        w[1] = 2.0;
        w[3] = -2.0;
        let t = quantize_nf4(&w, [1, 64], 64, false).unwrap();
        assert_eq!(t.packed[0], 0x0F);
        assert_eq!(t.packed[1], 0x70);
        assert_eq!(t.packed[2], 0x77);
        assert_eq!(t.absmax, Absmax::Plain(vec![2.0]));
        let d = t.dequantize();
        assert_eq!(&d[..4], &[-2.0, 2.0, 0.0, -2.0]);
    }

    #[test]
    fn odd_sizes_pad_with_code_seven() {
        let w = weights(7 * 9, 3);
        let t = quantize_nf4(&w, [7, 9], 64, false).unwrap();
        assert_eq!(t.packed.len(), 32);
        assert_eq!(t.packed[31] & 15, 7);
        assert_eq!(t.nblocks(), 1);
        let w = weights(13 * 11, 4); // 143 = 2 full blocks + 15
        let t = quantize_nf4(&w, [13, 11], 64, true).unwrap();
        assert_eq!(t.packed.len(), 72);
        assert_eq!(t.nblocks(), 3);
        let d = t.dequantize();
        for (a, b) in w.iter().zip(&d) {
            assert!((a - b).abs() <= 0.2 * t.scales().iter().cloned().fold(0.0, f32::max));
        }
    }

    #[test]
    fn round_trip_error_bounds() {
        let (rows, cols) = (96, 200); // 19200 values: 300 blocks, 2 nested blocks
        let w = weights(rows * cols, 7);
        for dq in [false, true] {
            let t = quantize_nf4(&w, [rows, cols], 64, dq).unwrap();
            let d = t.dequantize();
            // Largest gap between neighbouring NF4 codes is -0.6962 - (-1) = 0.3038, so a
            // value is at most half of it (times the block scale) from its code.
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                let am = w[i / 64 * 64..((i / 64 + 1) * 64).min(w.len())]
                    .iter()
                    .fold(0.0f32, |m, v| m.max(v.abs()));
                let tol = if dq {
                    0.17 * am + 1e-6
                } else {
                    0.1520 * am + 1e-7
                };
                assert!((a - b).abs() <= tol, "dq={dq} i={i} {a} vs {b}");
            }
            let rel = (w.iter().zip(&d).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
                / w.iter().map(|a| a * a).sum::<f32>())
            .sqrt();
            assert!(rel < 0.12, "relative rms error {rel}");
            if dq {
                let Absmax::Double(dd) = &t.absmax else {
                    panic!()
                };
                assert_eq!(dd.q.len(), 300);
                assert_eq!(dd.absmax2.len(), 2);
                // Scales recovered from the 8-bit code stay close to the true absmax.
                for (b, s) in t.scales().iter().enumerate() {
                    let am = w[b * 64..(b + 1) * 64]
                        .iter()
                        .fold(0.0f32, |m, v| m.max(v.abs()));
                    assert!((s - am).abs() < 0.02 * am, "block {b}: {s} vs {am}");
                }
            }
        }
    }

    #[test]
    fn absmax_element_is_exact_and_zero_block_is_zero() {
        let mut w = weights(256, 9);
        w[..64].iter_mut().for_each(|v| *v = 0.0);
        w[100] = 3.0;
        let t = quantize_nf4(&w, [2, 128], 64, false).unwrap();
        let d = t.dequantize();
        assert!(
            d[..64].iter().all(|v| v.to_bits() == 0),
            "zero block gives +0.0"
        );
        assert_eq!(d[100], 3.0);
    }

    #[test]
    fn dequantize_rows_matches_full() {
        let (rows, cols) = (33, 77); // odd row length: rows start on odd elements
        let w = weights(rows * cols, 11);
        for dq in [false, true] {
            let t = quantize_nf4(&w, [rows, cols], 128, dq).unwrap();
            let full = t.dequantize();
            let mut into = vec![0.0; rows * cols];
            t.dequantize_into(&mut into).unwrap();
            assert_eq!(full, into);
            for (a, b) in [(0, 1), (1, 2), (5, 19), (0, rows), (32, 33), (7, 7)] {
                let mut out = vec![0.0; (b - a) * cols];
                t.dequantize_rows(a, b, &mut out).unwrap();
                assert_eq!(out, &full[a * cols..b * cols], "rows {a}..{b}");
            }
            let mut small = vec![0.0; 3];
            assert!(t
                .dequantize_rows(0, 1, &mut small)
                .unwrap_err()
                .is_bad_input());
            assert!(t.dequantize_rows(3, 2, &mut []).is_err());
            assert!(t.dequantize_rows(0, rows + 1, &mut []).is_err());
            assert!(t.dequantize_into(&mut small).is_err());
        }
    }

    #[test]
    fn sizes_and_bits() {
        let w = weights(4096 * 64, 1);
        let t = quantize_nf4(&w, [4096, 64], 64, true).unwrap();
        // packed 131072 + q 4096 + absmax2 16*4 + code2 1024 + quant_map 64
        let nbytes = 131072 + 4096 + 64 + 1024 + 64;
        assert_eq!(t.nbytes(), nbytes);
        assert_eq!(t.bits_per_param(), 8.0 * nbytes as f64 / (4096.0 * 64.0));
        // packed + f32 absmax 4096*4 + quant_map 64: 4.5 bits plus the code table.
        let t = quantize_nf4(&w, [4096, 64], 64, false).unwrap();
        assert_eq!(t.nbytes(), 131072 + 16384 + 64);
        assert!((t.bits_per_param() - 4.5).abs() < 0.01);
    }

    #[test]
    fn parallel_quantize_is_deterministic() {
        let w = weights(1000 * 70, 5);
        let a = quantize_nf4(&w, [1000, 70], 64, true).unwrap();
        let b = quantize_nf4(&w, [1000, 70], 64, true).unwrap();
        assert_eq!(a, b);
    }
}
