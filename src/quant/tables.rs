//! Code tables of bitsandbytes' NF4 format, and the two torch CPU reductions that
//! bitsandbytes' quantizer relies on (`linspace`, `mean`), reproduced bit for bit.

use std::sync::OnceLock;

/// The 16 NF4 code values, index = 4-bit code.
/// From bitsandbytes `functional.get_4bit_type("nf4")` (the same constants are the
/// `nf4_dequantization_lut` in csrc/kernels.cu and `nf4_lut` in csrc/cpu_ops.cpp);
/// the Python list is made of doubles that torch rounds to these f32 values. The digits
/// are bnb's, kept in full so they can be compared with its source.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Decision boundaries of the NF4 quantizer: `(code[i] + code[i+1]) / 2` in f32.
/// bitsandbytes 0.50 CPU (`backends/default/ops.py`, quantize_4bit) buckets a scaled
/// value x into the code `#{i : mid[i] < x}` (torch.bucketize, right=False), so a value
/// exactly on a midpoint takes the lower code.
pub fn nf4_midpoints() -> [f32; 15] {
    let mut m = [0.0f32; 15];
    for (i, v) in m.iter_mut().enumerate() {
        *v = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
    }
    m
}

/// torch.linspace(start, end, steps, dtype=float32) on the CPU.
/// torch's CPU kernel (RangeFactoriesKernel.cpp) computes `start + step*i` for the first
/// half and `end - step*(steps-1-i)` for the rest, all in f32; its AVX2/AVX512 builds
/// (the ones torch dispatches to on x86-64) contract both into one FMA, which is what
/// the values bitsandbytes gets depend on.
pub(crate) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' signed 8-bit dynamic map, `functional.create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`: for exponent i = 0..6, the 2^i midpoints of
/// `linspace(0.1, 1, 2^i + 1)` scaled by ±10^(i-6), plus 0 and 1, sorted (256 values).
/// It codes the double-quantized absmax. The Python multiplies an f32 tensor by the
/// Python float 10**(i-6), which torch first rounds to f32.
pub fn dynamic_map_signed() -> [f32; 256] {
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &scale) in SCALES.iter().enumerate() {
        let b = torch_linspace_f32(0.1f64 as f32, 1.0, (1 << i) + 1);
        let s = scale as f32;
        for j in 0..b.len() - 1 {
            let mean = (b[j] + b[j + 1]) / 2.0;
            data.push(s * mean);
            data.push((-s) * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// The dynamic map, computed once.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(dynamic_map_signed)
}

/// Size of bitsandbytes' CPU 8-bit quantization lookup table.
pub(crate) const LUT8_SIZE: usize = 65536;

/// bitsandbytes 0.50 CPU 8-bit blockwise quantizer (csrc/cpu_ops.cpp
/// `build_quantize_lut`): [-1, 1] is cut into 65536 points `2i/65535 - 1`, each mapped
/// to the first code whose upper midpoint `(c[k]+c[k+1])*0.5` is not below it. The
/// quantizer then looks values up in this table instead of searching the code exactly.
pub(crate) fn build_lut8(code: &[f32; 256]) -> Vec<u8> {
    let mut mids = [0.0f32; 255];
    for (k, m) in mids.iter_mut().enumerate() {
        *m = (code[k] + code[k + 1]) * 0.5;
    }
    let mut lut = vec![0u8; LUT8_SIZE];
    let mut k = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let fi = i as f32;
        let val = (fi + fi) / (LUT8_SIZE - 1) as f32 - 1.0;
        while k < 255 && mids[k] < val {
            k += 1;
        }
        *slot = k as u8;
    }
    lut
}

/// The lookup table of the dynamic map, built once.
pub(crate) fn dynamic_lut8() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| build_lut8(dynamic_map()))
}

/// Lanes of the vectors torch's f32 sum kernel accumulates in. 8 (256-bit) was measured
/// with torch 2.15 on an AVX512 machine (the one that made the fixtures): 16 lanes
/// disagree with torch.sum in the last bit for most inputs, 8 lanes never did.
const TORCH_LANES: usize = 8;

/// torch's `ceil_log2` from aten/src/ATen/native/cpu/utils.h.
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// Adds `src` lane by lane (one `Vectorized<float>` add).
fn add_lanes<const W: usize>(dst: &mut [f32; W], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `multi_row_sum` of aten/src/ATen/native/cpu/SumKernel.cpp with 4 rows: item j is
/// `x[j*W..(j+1)*W]` (a W-lane vector), row i holds items 4i..4i+3. Accumulates in a
/// 4-level cascade whose level width depends on the row count.
fn multi_row_sum<const W: usize>(x: &[f32], rows: usize) -> [[f32; W]; 4] {
    const LEVELS: usize = 4;
    let level_power = (ceil_log2(rows) / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; W]; 4]; LEVELS];
    let item = |j: usize| &x[j * W..(j + 1) * W];
    let mut i = 0usize;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add_lanes(a, item(i * 4 + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (src, dst) in lower[j - 1].iter_mut().zip(upper[0].iter_mut()) {
                add_lanes(dst, src);
                *src = [0.0; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add_lanes(a, item(i * 4 + k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let (lower, upper) = acc.split_at_mut(j);
        for (dst, src) in lower[0].iter_mut().zip(upper[0].iter()) {
            add_lanes(dst, src);
        }
    }
    acc[0]
}

/// `row_sum` of SumKernel.cpp over `items` W-lane items of x.
fn row_sum<const W: usize>(x: &[f32], items: usize) -> [f32; W] {
    let rows = items / 4;
    let [mut sum, p1, p2, p3] = multi_row_sum::<W>(x, rows);
    for j in rows * 4..items {
        add_lanes(&mut sum, &x[j * W..(j + 1) * W]);
    }
    for p in [p1, p2, p3] {
        add_lanes(&mut sum, &p);
    }
    sum
}

/// `torch.sum` of a contiguous f32 vector on the CPU, single-threaded (`cascade_sum`,
/// `vectorized_inner_sum`): 8-lane vectors through the cascade, then the scalar tail,
/// then the lanes, added to the zero-filled output. torch splits inputs of 32768 or
/// more elements across threads, so beyond that its result also depends on the
/// thread count; this follows the one-thread order.
pub(crate) fn torch_sum_f32(x: &[f32]) -> f32 {
    let n = x.len();
    let total = if n >= TORCH_LANES {
        let vecs = n / TORCH_LANES;
        let lanes = row_sum::<TORCH_LANES>(&x[..vecs * TORCH_LANES], vecs);
        let mut acc = 0.0f32;
        for &t in &x[vecs * TORCH_LANES..] {
            acc += t;
        }
        for l in lanes {
            acc += l;
        }
        acc
    } else {
        row_sum::<1>(x, n)[0]
    };
    0.0 + total
}

/// `torch.mean` of a contiguous f32 vector on the CPU: the sum above divided by n in
/// f32 (ReduceOps.cpp `mean_out` does `sum_out(...).div_(n)` on the CPU).
pub(crate) fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_code_is_sorted_and_symmetric_at_ends() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_CODE[0], -1.0);
        assert_eq!(NF4_CODE[7], 0.0);
        assert_eq!(NF4_CODE[15], 1.0);
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map_signed();
        assert!(m.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        assert_eq!(m[255], 1.0);
        assert_eq!(m[127], 0.0);
        // 127 negative values mirror the 127 positive ones below 1.
        for i in 0..127 {
            assert_eq!(m[i], -m[254 - i]);
        }
        // Largest mean of linspace(0.1, 1, 65) is (0.9859375 + 1) / 2.
        assert!((m[254] - 0.99296875).abs() < 1e-6);
    }

    #[test]
    fn linspace_end_points() {
        let v = torch_linspace_f32(0.1, 1.0, 9);
        assert_eq!(v.len(), 9);
        assert_eq!(v[0], 0.1);
        assert_eq!(v[8], 1.0);
    }

    #[test]
    fn lut8_maps_codes_to_themselves() {
        let code = dynamic_map();
        let lut = dynamic_lut8();
        // Points at -1, 0 and 1 land on the codes -0.99297, 0 and 1.
        assert_eq!(lut[0], 0);
        assert_eq!(lut[LUT8_SIZE - 1], 255);
        let zero = (LUT8_SIZE - 1) / 2; // 2*32767/65535 - 1 is just below 0
        assert!(code[lut[zero] as usize].abs() < 1e-4);
    }

    #[test]
    fn torch_sum_small_and_large() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(torch_sum_f32(&x), 499500.0);
        assert_eq!(torch_sum_f32(&x[..7]), 21.0);
        assert_eq!(torch_sum_f32(&[]), 0.0);
        // Cascade keeps the error of a long sum of 0.1 far below a naive running sum's.
        let y = vec![0.1f32; 1 << 20];
        let exact = 0.1f32 as f64 * (1u64 << 20) as f64;
        let naive: f32 = y.iter().sum();
        let cascade = torch_sum_f32(&y);
        assert!((cascade as f64 - exact).abs() < (naive as f64 - exact).abs());
        assert!((cascade as f64 - exact).abs() / exact < 1e-6);
    }
}
