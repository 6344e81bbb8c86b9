//! NF4 kernels (kernels/nf4.cu) against the CPU reference (src/quant).
//!
//! GPU tests are `#[ignore = "needs a CUDA device"]` (tools/gpu-check.sh runs them with
//! `--ignored`). Each prints `PARITY <case>: ...` lines:
//! - dequantization: f32 bit-exact against `Nf4Tensor::dequantize`, bf16 equal to
//!   round-to-nearest-even of it (`mismatches` must be 0);
//! - products: against an f64 reference on the f32-dequantized weight and the bf16 X,
//!   with `|got − ref| <= atol + rtol·|ref|`, rtol = 1e-2 and atol = 1e-2·rms(ref). The
//!   kernels multiply by bf16(W) (a relative 2^-9 rounding per weight, random in sign)
//!   and accumulate in f32, so the error of a sum of K terms is about 2^-9·rms(ref),
//!   a 5x margin; a wrong fragment, tile or chunk moves outputs by O(rms(ref)).
//!   `worst` is the largest err / (atol + rtol·|ref|): a case passes when it is ≤ 1.
//! - fused GEMM against dequant + cuBLAS (the same bf16 weight, only the summation
//!   order differs): atol = 1e-3·rms(ref), rtol = 1e-2 (one bf16 output rounding).
//! - the wgmma GEMM (sm_90 only; elsewhere it must refuse with BadInput): one-hot rows
//!   of X make Y = Wbᵀ exactly (every decoded weight, swizzle and fragment position
//!   checked bit for bit), then products against the CPU (all rows, or for the large
//!   shapes 48 sampled rows) and against the fused GEMM on every element.
//!
//! The tests that always run check what needs no GPU: kernel names in the fatbin, the
//! shape checks (errors, not panics), and the dispatcher's cache file.

mod common;

use common::{
    assert_kernels_registered, check_with, gpu, is_bad_input, ok, rand_bf16, rms, rng, NonFinite,
};
use half::bf16;
use palign::backend::cuda::nf4::{
    self, DispatchCache, DispatchEntry, Nf4Op, Nf4Path, Nf4Weight, Out,
};
use palign::backend::cuda::{DeviceBuffer, Gpu};
use palign::quant::{quantize_nf4, Absmax, Nf4Tensor};
use rand::Rng;
use rayon::prelude::*;
use std::collections::BTreeMap;

// ---------------------------------------------------------------- always run

#[test]
fn nf4_kernels_are_registered_and_in_the_fatbin() {
    assert_kernels_registered(nf4::KERNELS);
}

#[test]
fn shape_checks_return_bad_input() {
    use Nf4Op::{Backward, Forward};
    assert!(
        nf4::check_fused(Forward, [1000, 4096]).is_ok(),
        "any N forward"
    );
    assert!(nf4::check_fused(Forward, [1024, 14336]).is_ok());
    assert!(is_bad_input(nf4::check_fused(Forward, [1024, 100])));
    assert!(is_bad_input(nf4::check_fused(Forward, [1024, 4096 + 32])));
    assert!(nf4::check_fused(Backward, [1024, 4160]).is_ok());
    assert!(is_bad_input(nf4::check_fused(Backward, [1000, 4096])));
    assert!(is_bad_input(nf4::check_fused(Backward, [1024, 4096 + 32])));
    assert!(is_bad_input(nf4::check_fused(Forward, [0, 64])));
    assert!(is_bad_input(nf4::check_fused(Forward, [1 << 31, 64])));

    assert!(nf4::check_gemv(1, [10, 64]).is_ok());
    assert!(nf4::check_gemv(16, [10, 32]).is_ok());
    assert!(is_bad_input(nf4::check_gemv(0, [10, 64])));
    assert!(is_bad_input(nf4::check_gemv(17, [10, 64])));
    assert!(is_bad_input(nf4::check_gemv(1, [10, 48])));
}

#[test]
fn uploads_reject_inconsistent_tensors() {
    let w: Vec<f32> = (0..8 * 128).map(|i| (i as f32 * 0.37).sin()).collect();
    let good = quantize_nf4(&w, [8, 128], 64, true).unwrap();
    assert!(nf4::check_tensor(&good).is_ok());
    let plain = quantize_nf4(&w, [8, 128], 64, false).unwrap();
    assert!(nf4::check_tensor(&plain).is_ok());

    let mut t = good.clone();
    t.packed.pop();
    assert!(is_bad_input(nf4::check_tensor(&t)));
    let mut t = good.clone();
    t.blocksize = 48;
    assert!(is_bad_input(nf4::check_tensor(&t)));
    let mut t = good.clone();
    if let Absmax::Double(d) = &mut t.absmax {
        d.code2.truncate(255);
    }
    assert!(is_bad_input(nf4::check_tensor(&t)));
    let mut t = good.clone();
    if let Absmax::Double(d) = &mut t.absmax {
        d.absmax2.push(1.0);
    }
    assert!(is_bad_input(nf4::check_tensor(&t)));
    let mut t = plain.clone();
    if let Absmax::Plain(a) = &mut t.absmax {
        a.pop();
    }
    assert!(is_bad_input(nf4::check_tensor(&t)));
}

#[test]
fn candidates_follow_the_kernel_limits() {
    use Nf4Path::{DequantCublas, Fused, Gemv};
    let fwd = Nf4Op::Forward;
    let bwd = Nf4Op::Backward;
    assert_eq!(
        nf4::candidates(fwd, 1, [1024, 4096], false),
        [Gemv, Fused, DequantCublas]
    );
    assert_eq!(nf4::candidates(fwd, 16, [1024, 4096], true), [Gemv, Fused]);
    assert_eq!(
        nf4::candidates(fwd, 17, [1024, 4096], false),
        [Fused, DequantCublas]
    );
    assert_eq!(
        nf4::candidates(bwd, 1, [1024, 4096], false),
        [Fused, DequantCublas]
    );
    assert_eq!(nf4::candidates(fwd, 8, [1024, 100], false), [DequantCublas]);
    assert!(nf4::candidates(fwd, 8, [1024, 100], true).is_empty());
    // An odd output width: the fused GEMM's paired stores would cross into the next row.
    assert_eq!(
        nf4::candidates(fwd, 17, [1001, 4096], false),
        [DequantCublas]
    );
    assert_eq!(
        nf4::candidates(fwd, 4, [1001, 4096], false),
        [Gemv, DequantCublas]
    );
    assert!(is_bad_input(nf4::check_fused(fwd, [1001, 4096])));
}

#[test]
fn wgmma_limits_and_gating() {
    use Nf4Path::{DequantCublas, Fused, Gemv, Wgmma, WgmmaM256, WgmmaRs};
    // Shapes: K % 64 == 0 and N % 8 == 0.
    assert!(nf4::check_wgmma([4096, 4096]).is_ok());
    assert!(nf4::check_wgmma([1000, 14336]).is_ok());
    assert!(nf4::check_wgmma([8, 64]).is_ok());
    assert!(is_bad_input(nf4::check_wgmma([1004, 4096])));
    assert!(is_bad_input(nf4::check_wgmma([1024, 4096 + 32])));
    assert!(is_bad_input(nf4::check_wgmma([0, 64])));
    assert!(is_bad_input(nf4::check_wgmma([1 << 31, 64])));

    // Only compute capability 9.0 with sm_90a SASS in the fatbin.
    let all = "sm_80 sm_86 sm_89 sm_90a compute_80";
    assert!(nf4::wgmma_supported((9, 0), all));
    assert!(nf4::wgmma_supported((9, 0), "sm_90a"));
    assert!(!nf4::wgmma_supported((9, 0), "sm_80 sm_90 compute_80"));
    assert!(!nf4::wgmma_supported((9, 0), "sm_80 compute_80"));
    assert!(!nf4::wgmma_supported((9, 0), "sm_90ab"));
    assert!(!nf4::wgmma_supported((8, 0), all));
    assert!(!nf4::wgmma_supported((8, 9), all));
    assert!(!nf4::wgmma_supported((10, 0), all));
    assert!(!nf4::wgmma_supported((12, 0), all));

    // The dispatcher's gate: PALIGN_NF4_WGMMA on (1, on, true), and a supported GPU; a
    // value that is neither on nor off is an error, not off.
    assert_eq!(nf4::WGMMA_ENV, "PALIGN_NF4_WGMMA");
    for on in ["1", "on", "true"] {
        assert!(nf4::wgmma_gate(Some(on), (9, 0), all).unwrap(), "{on}");
    }
    for off in [None, Some(""), Some("0"), Some("off"), Some("false")] {
        assert!(!nf4::wgmma_gate(off, (9, 0), all).unwrap(), "{off:?}");
    }
    for bad in ["yes", " 1", "ON"] {
        assert!(
            nf4::wgmma_gate(Some(bad), (9, 0), all)
                .unwrap_err()
                .is_bad_input(),
            "{bad}"
        );
    }
    assert!(!nf4::wgmma_gate(Some("1"), (8, 0), all).unwrap());
    assert!(!nf4::wgmma_gate(Some("1"), (9, 0), "sm_80 compute_80").unwrap());

    // Candidates: the gate off gives today's list exactly; on, the two wgmma GEMMs come
    // last, forward only, where their shape limits hold.
    let (fwd, bwd) = (Nf4Op::Forward, Nf4Op::Backward);
    for &(op, m, shape, f32_out) in &[
        (fwd, 1, [1024, 4096], false),
        (fwd, 16, [1024, 4096], true),
        (fwd, 8192, [4096, 4096], false),
        (fwd, 8, [1024, 100], false),
        (bwd, 8192, [4096, 4096], false),
    ] {
        assert_eq!(
            nf4::candidates_with(op, m, shape, f32_out, false),
            nf4::candidates(op, m, shape, f32_out)
        );
    }
    assert_eq!(
        nf4::candidates_with(fwd, 8192, [4096, 4096], false, true),
        [Fused, DequantCublas, Wgmma, WgmmaM256, WgmmaRs]
    );
    assert_eq!(
        nf4::candidates_with(fwd, 1, [1024, 4096], true, true),
        [Gemv, Fused, Wgmma, WgmmaM256, WgmmaRs]
    );
    assert_eq!(
        nf4::candidates_with(bwd, 8192, [4096, 4096], false, true),
        [Fused, DequantCublas, Wgmma, WgmmaM256, WgmmaRs]
    );
    // The register-A backward needs K % 16 as well.
    assert_eq!(
        nf4::candidates_with(bwd, 8192, [64, 1000], true, true),
        [Wgmma, WgmmaM256]
    );
    assert!(is_bad_input(nf4::WgmmaKernel::Rs.check(bwd, [64, 1000])));
    assert!(nf4::WgmmaKernel::M128.check(bwd, [64, 1000]).is_ok());
    // Backward needs N % 64 and K % 8: [1000, 4096] has no whole n-tiles for it.
    assert_eq!(
        nf4::candidates_with(bwd, 8192, [1000, 4096], false, true),
        nf4::candidates(bwd, 8192, [1000, 4096], false)
    );
    assert!(nf4::check_wgmma_op(bwd, [1024, 4096]).is_ok());
    assert!(nf4::check_wgmma_op(bwd, [64, 1000]).is_ok());
    assert!(is_bad_input(nf4::check_wgmma_op(bwd, [1000, 4096])));
    assert!(is_bad_input(nf4::check_wgmma_op(bwd, [1024, 1004])));
    assert!(is_bad_input(nf4::check_wgmma_op(fwd, [64, 1000])));
    assert_eq!(
        nf4::candidates_with(fwd, 8192, [1004, 4096], false, true),
        [Fused, DequantCublas]
    );
    assert_eq!(
        nf4::candidates_with(fwd, 8, [1024, 100], false, true),
        [DequantCublas]
    );
}

#[test]
fn wgmma_path_names_are_stable_and_old_entries_are_remeasured() {
    use Nf4Path::{DequantCublas, Fused, Gemv, Wgmma, WgmmaM256, WgmmaRs};
    for (p, name) in [
        (Gemv, "gemv"),
        (Fused, "fused"),
        (DequantCublas, "dequant_cublas"),
        (Wgmma, "wgmma"),
        (WgmmaM256, "wgmma_m256"),
        (WgmmaRs, "wgmma_rs"),
    ] {
        assert_eq!(p.name(), name);
        assert_eq!(Nf4Path::parse(name), Some(p));
        assert_eq!(serde_json::to_value(p).unwrap(), name);
        let back: Nf4Path = serde_json::from_value(serde_json::json!(name)).unwrap();
        assert_eq!(back, p);
    }
    assert_eq!(Nf4Path::parse("auto"), None);

    // A cache file written before the wgmma path existed still loads.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.json");
    let old = r#"{"format": "palign-nf4-dispatch", "version": 1, "gpu": "G",
        "entries": {"fwd m<=8192 n=4096 k=4096 bf16":
            {"choice": "dequant_cublas", "ms": {"dequant_cublas": 1.0, "fused": 2.0}}}}"#;
    std::fs::write(&path, old).unwrap();
    let c = DispatchCache::load(&path, "G");
    let e = c
        .get("fwd m<=8192 n=4096 k=4096 bf16")
        .expect("old entry")
        .clone();
    assert_eq!(e.choice, DequantCublas);
    // It answers while the candidates are today's; with wgmma enabled it is re-timed.
    assert!(nf4::entry_covers(&e, &[Fused, DequantCublas]));
    assert!(!nf4::entry_covers(&e, &[Fused, DequantCublas, Wgmma]));
    // An entry timed before the 256-row wgmma GEMM existed is re-timed with it.
    let w1 = entry(
        Wgmma,
        &[("fused", 2.0), ("dequant_cublas", 1.0), ("wgmma", 0.5)],
    );
    assert!(!nf4::entry_covers(
        &w1,
        &[Fused, DequantCublas, Wgmma, WgmmaM256, WgmmaRs]
    ));
    // An entry that chose wgmma is not used once wgmma is off again.
    let w = entry(
        Wgmma,
        &[("fused", 2.0), ("dequant_cublas", 1.0), ("wgmma", 0.5)],
    );
    assert!(nf4::entry_covers(&w, &[Fused, DequantCublas, Wgmma]));
    assert!(!nf4::entry_covers(&w, &[Fused, DequantCublas]));

    // A dispatcher built without the env var never has wgmma on.
    let d = nf4::Nf4Dispatcher::with_cache(DispatchCache::in_memory("G"), None);
    assert!(!d.wgmma_enabled());
    assert!(d.with_wgmma(true).wgmma_enabled());
}

#[test]
fn dispatch_keys_bucket_rows_above_the_gemv_range() {
    let key = |m| nf4::dispatch_key(Nf4Op::Forward, m, [4096, 4096], false);
    for m in 1..=16 {
        assert_eq!(key(m), format!("fwd m<={m} n=4096 k=4096 bf16"));
    }
    assert_eq!(key(17), key(32));
    assert_ne!(key(32), key(33));
    assert_eq!(key(8192), "fwd m<=8192 n=4096 k=4096 bf16");
    assert_eq!(key(8193), key(16384));
    assert_ne!(
        nf4::dispatch_key(Nf4Op::Backward, 8192, [4096, 4096], false),
        key(8192)
    );
    assert_ne!(
        nf4::dispatch_key(Nf4Op::Forward, 8192, [4096, 4096], true),
        key(8192)
    );
    assert_ne!(
        nf4::dispatch_key(Nf4Op::Forward, 8192, [4096, 1024], false),
        key(8192)
    );
}

fn entry(choice: Nf4Path, times: &[(&str, f64)]) -> DispatchEntry {
    DispatchEntry::new(
        choice,
        times.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
    )
}

#[test]
fn dispatch_cache_round_trips_through_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("nf4-dispatch-test-gpu.json");
    let gpu = "Test GPU 80GB";

    let mut c = DispatchCache::load(&path, gpu);
    assert!(c.is_empty(), "a missing file is an empty cache");
    let k1 = nf4::dispatch_key(Nf4Op::Forward, 8192, [4096, 4096], false);
    let k2 = nf4::dispatch_key(Nf4Op::Backward, 1000, [14336, 4096], true);
    let e1 = entry(Nf4Path::Fused, &[("fused", 1.25), ("dequant_cublas", 1.5)]);
    let e2 = entry(
        Nf4Path::DequantCublas,
        &[("fused", 0.75), ("dequant_cublas", 0.5)],
    );
    c.insert(k1.clone(), e1.clone());
    c.insert(k2.clone(), e2.clone());
    c.save().unwrap();

    let back = DispatchCache::load(&path, gpu);
    assert_eq!(back.len(), 2);
    assert_eq!(back.get(&k1), Some(&e1));
    assert_eq!(back.get(&k2), Some(&e2));
    assert_eq!(back.gpu(), gpu);

    // Plain JSON that names its format and GPU.
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], "palign-nf4-dispatch");
    assert_eq!(v["version"], 1);
    assert_eq!(v["gpu"], gpu);
    assert_eq!(v["entries"][&k1]["choice"], "fused");
    assert_eq!(v["entries"][&k2]["ms"]["dequant_cublas"], 0.5);

    // Atomic write: only the file itself is left in the folder.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");

    // Another GPU's measurements are not used.
    assert!(DispatchCache::load(&path, "Other GPU").is_empty());

    // Overwrite with one entry changed.
    let mut c = back;
    c.insert(k1.clone(), e2.clone());
    c.save().unwrap();
    assert_eq!(DispatchCache::load(&path, gpu).get(&k1), Some(&e2));

    // A damaged or foreign file is an empty cache, and saving replaces it.
    for junk in ["{\"format\": \"palign-nf4-dispatch\", \"vers", "[1, 2]", ""] {
        std::fs::write(&path, junk).unwrap();
        let mut c = DispatchCache::load(&path, gpu);
        assert!(c.is_empty(), "{junk:?}");
        c.insert(k1.clone(), e1.clone());
        c.save().unwrap();
        assert_eq!(DispatchCache::load(&path, gpu).get(&k1), Some(&e1));
    }

    // In memory only: save does nothing.
    let mut m = DispatchCache::in_memory(gpu);
    m.insert(k1, e1);
    assert!(m.save().is_ok() && m.path().is_none());
}

#[test]
fn default_cache_path_names_the_gpu() {
    if std::env::var_os("PALIGN_NF4_DISPATCH_CACHE").is_some() {
        return; // the override is the user's choice; nothing to check
    }
    if let Some(p) = DispatchCache::default_path("NVIDIA H100 80GB HBM3") {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, "nf4-dispatch-nvidia-h100-80gb-hbm3.json");
        assert!(p.parent().unwrap().ends_with("palign"), "{}", p.display());
    }
}

// ---------------------------------------------------------------- helpers

/// A weight with per-row magnitudes from 0.02 to 2, one all-zero block and one
/// block with a large outlier, quantized on the CPU.
fn weight(seed: u64, shape: [usize; 2], blocksize: usize, dq: bool) -> Nf4Tensor {
    let mut r = rng(seed);
    let [n, k] = shape;
    let mut w: Vec<f32> = (0..n * k)
        .map(|i| r.random_range(-1.0f32..1.0) * (0.02 + (i / k % 7) as f32 * 0.3))
        .collect();
    if w.len() > 3 * blocksize {
        w[blocksize..2 * blocksize].fill(0.0);
        w[2 * blocksize + 5] = 40.0;
    }
    quantize_nf4(&w, shape, blocksize, dq).unwrap()
}

/// f64 reference: forward `x[m, k] · w[n, k]ᵀ`, backward `x[m, n] · w[n, k]`.
fn reference(op: Nf4Op, x: &[f32], m: usize, w: &[f32], shape: [usize; 2]) -> Vec<f32> {
    let k = shape[1];
    let (inner, outc) = op.dims(shape);
    let mut out = vec![0.0f32; m * outc];
    out.par_chunks_mut(outc).enumerate().for_each(|(i, row)| {
        let xr = &x[i * inner..(i + 1) * inner];
        match op {
            Nf4Op::Forward => {
                for (j, o) in row.iter_mut().enumerate() {
                    let wr = &w[j * k..(j + 1) * k];
                    *o = xr
                        .iter()
                        .zip(wr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>() as f32;
                }
            }
            Nf4Op::Backward => {
                let mut acc = vec![0.0f64; k];
                for (r, &a) in xr.iter().enumerate() {
                    for (s, &b) in acc.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                        *s += a as f64 * b as f64;
                    }
                }
                for (o, s) in row.iter_mut().zip(acc) {
                    *o = s as f32;
                }
            }
        }
    });
    out
}

/// The forward reference for rows `rows` of x ([m, k]) only: [rows.len(), n].
fn reference_rows(x: &[f32], rows: &[usize], w: &[f32], shape: [usize; 2]) -> Vec<f32> {
    let k = shape[1];
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&r| x[r * k..(r + 1) * k].iter().copied())
        .collect();
    reference(Nf4Op::Forward, &xs, rows.len(), w, shape)
}

/// A weight of random codes and random scales (fast to build at 14336 x 4096, unlike
/// quantizing): double-quantized with bitsandbytes' map, or plain absmax.
fn random_nf4(seed: u64, shape: [usize; 2], dq: bool) -> Nf4Tensor {
    let mut r = rng(seed);
    let numel = shape[0] * shape[1];
    let nblocks = numel.div_ceil(64);
    let mut packed = vec![0u8; numel.div_ceil(2)];
    r.fill(&mut packed[..]);
    let absmax = if dq {
        let mut q = vec![0u8; nblocks];
        r.fill(&mut q[..]);
        Absmax::Double(palign::quant::DoubleQuant {
            q,
            code2: palign::quant::dynamic_map().to_vec(),
            absmax2: (0..nblocks.div_ceil(256))
                .map(|_| r.random_range(0.005f32..0.02))
                .collect(),
            offset: 0.02,
            blocksize2: 256,
        })
    } else {
        Absmax::Plain(
            (0..nblocks)
                .map(|_| r.random_range(0.01f32..0.05))
                .collect(),
        )
    };
    Nf4Tensor {
        shape,
        blocksize: 64,
        packed,
        absmax,
        dtype: palign::quant::SourceDtype::BF16,
    }
}

/// Assert |got − want| <= atol + rtol·|want| everywhere (any NaN or infinity fails);
/// print the PARITY line (atol to 3 digits: it is a multiple of rms(ref)).
/// Every tensor-core path multiplies Wb = bf16(W), as bitsandbytes' dequantize-then-
/// matmul does, so the references use Wb too. Against f32 W, rounding the 4096–14336
/// weights of a dot product adds an error of a few 1e-3·rms(y) per element (the first
/// GPU run saw up to 1.1e-2·rms over 10^6 outputs, for cuBLAS and the fused kernel
/// alike), which would swamp the GEMMs' own error. What remains is f32 summation order
/// and the bf16 output rounding (rtol 1e-2 > 2^-8).
const BF16_W_ATOL: f32 = 2e-3;

fn bf16_round(w: &[f32]) -> Vec<f32> {
    w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

fn check(case: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    check_with(case, got, want, atol, rtol, NonFinite::Fail, Some(3));
}

fn download_f32(g: &Gpu, out: &DeviceBuffer<f32>) -> Vec<f32> {
    ok(g.download(out))
}

fn download_bf16(g: &Gpu, out: &DeviceBuffer<bf16>) -> Vec<f32> {
    ok(g.download(out)).iter().map(|x| x.to_f32()).collect()
}

/// Runs `f` into a fresh f32 or bf16 output of `len` and returns it as f32.
fn run_out(
    g: &Gpu,
    len: usize,
    f32_out: bool,
    f: impl FnOnce(Out<'_>) -> palign::Result<()>,
) -> Vec<f32> {
    if f32_out {
        let mut o = ok(g.alloc::<f32>(len));
        ok(f(Out::F32(&mut o)));
        download_f32(g, &o)
    } else {
        let mut o = ok(g.alloc::<bf16>(len));
        ok(f(Out::Bf16(&mut o)));
        download_bf16(g, &o)
    }
}

// ---------------------------------------------------------------- GPU

#[test]
#[ignore = "needs a CUDA device"]
fn dequantize_is_bit_exact() {
    let g = gpu();
    // numel: below one 16-element group, odd, not a multiple of 64·256, large.
    let cases: &[([usize; 2], usize, bool)] = &[
        ([1, 30], 32, true),
        ([7, 101], 64, false),
        ([7, 101], 64, true),
        ([33, 1000], 128, true),
        ([257, 320], 64, true),
        ([5, 4096], 4096, false),
        ([1200, 1000], 64, true),
        ([1024, 4096], 64, true),
    ];
    for (i, &(shape, bs, dq)) in cases.iter().enumerate() {
        let t = weight(100 + i as u64, shape, bs, dq);
        let want = t.dequantize();
        let n = want.len();
        let uploads: Vec<(&str, Nf4Weight)> = if dq {
            vec![
                ("dq", ok(Nf4Weight::upload(&g, &t))),
                ("dq-decoded", ok(Nf4Weight::upload_decoded(&g, &t))),
            ]
        } else {
            vec![("plain", ok(Nf4Weight::upload(&g, &t)))]
        };
        for (how, w) in &uploads {
            // Outputs one element longer than needed, pre-filled: the kernel must not
            // write past numel.
            let mut o32 = ok(g.upload(&vec![7.0f32; n + 1]));
            ok(nf4::dequantize(&g, w, Out::F32(&mut o32)));
            let got = download_f32(&g, &o32);
            let bad32 = got[..n]
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            let mut o16 = ok(g.upload(&vec![bf16::from_f32(7.0); n + 1]));
            ok(nf4::dequantize(&g, w, Out::Bf16(&mut o16)));
            let got16 = ok(g.download(&o16));
            let bad16 = got16[..n]
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != bf16::from_f32(**b).to_bits())
                .count();
            println!(
                "PARITY dequant {shape:?} bs={bs} {how}: f32_mismatches={bad32} bf16_mismatches={bad16} n={n}"
            );
            assert_eq!(bad32, 0, "f32 dequant {shape:?} {how}");
            assert_eq!(bad16, 0, "bf16 dequant {shape:?} {how}");
            assert_eq!(got[n], 7.0, "wrote past the end");
            assert_eq!(got16[n].to_f32(), 7.0, "wrote past the end");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_matches_cpu() {
    let g = gpu();
    // (m, n, k, double quant, f32 out): odd N (partial tiles), K % 128 != 0 (partial
    // chunk), K = 14336, and M across the m16 tile.
    let cases: &[(usize, usize, usize, bool, bool)] = &[
        (1, 1024, 4096, true, false),
        (1, 4096, 4096, true, true),
        (3, 1000, 14336, true, true),
        (8, 1024, 4096, false, false),
        (9, 333, 1056, true, false),
        (16, 1024, 1056, false, true),
        (16, 4096, 4096, true, false),
        (16, 24, 64, true, true),
        // Wide enough for 4 column tiles per block on a 132-SM GPU (n / 32 >= 2 * SMs),
        // with a partly filled last 8-column tile and 9 chunks (the prefetch's partial
        // group).
        (2, 8965, 1056, true, false),
        // Two column tiles per block on a 132-SM GPU (n / 16 >= 2 * SMs > n / 32), both
        // token halves of the mma (m > 8), a partial last tile.
        (12, 6001, 1056, true, true),
    ];
    for (i, &(m, n, k, dq, f32_out)) in cases.iter().enumerate() {
        let t = weight(200 + i as u64, [n, k], 64, dq);
        let wf = t.dequantize();
        let (xb, xf) = rand_bf16(&mut rng(300 + i as u64), m * k, 1.0);
        // The tensor-core GEMV multiplies bf16(W); the naive one keeps W in f32.
        let want = reference(Nf4Op::Forward, &xf, m, &bf16_round(&wf), [n, k]);
        let want_f32w = reference(Nf4Op::Forward, &xf, m, &wf, [n, k]);
        let atol = BF16_W_ATOL * rms(&want);
        let w = ok(Nf4Weight::upload(&g, &t));
        let x = ok(g.upload(&xb));
        let out = if f32_out { "f32" } else { "bf16" };
        let got = run_out(&g, m * n, f32_out, |o| nf4::gemv(&g, &x, m, &w, o));
        check(
            &format!("gemv m={m} n={n} k={k} dq={dq} {out}"),
            &got,
            &want,
            atol,
            1e-2,
        );
        // Every variant sums the 8 warps' parts in the same order as the default, and
        // the decode is the same: the same bits.
        for v in nf4::GEMV_VARIANTS {
            let got_v = run_out(&g, m * n, f32_out, |o| {
                nf4::gemv_variant(&g, &x, m, &w, o, *v)
            });
            check(
                &format!("gemv {} m={m} n={n} k={k} dq={dq} {out}", v.name),
                &got_v,
                &want,
                atol,
                1e-2,
            );
            let same = got
                .iter()
                .zip(&got_v)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "gemv {} differs from the default's bits (m={m} n={n} k={k})",
                v.name
            );
        }
        let got = run_out(&g, m * n, f32_out, |o| nf4::gemv_naive(&g, &x, m, &w, o));
        check(
            &format!("gemv_naive m={m} n={n} k={k} dq={dq} {out}"),
            &got,
            &want_f32w,
            atol,
            1e-2,
        );
    }
}

fn gemm_cases(op: Nf4Op) {
    let g = gpu();
    // (m, n, k, double quant, f32 out). Forward: N = 1000 leaves a partial output
    // tile. Backward: K = 4160 leaves a partial output tile; N = 14336 is the long
    // reduction. M = 130 and 1000 are not multiples of the 128-row tile.
    let cases: &[(usize, usize, usize, bool, bool)] = match op {
        Nf4Op::Forward => &[
            (1, 1024, 4096, true, false),
            (3, 1024, 4096, false, true),
            (16, 1024, 4096, true, false),
            (130, 1000, 4096, true, true),
            (1000, 1024, 4096, true, false),
            (130, 1024, 14336, true, false),
        ],
        Nf4Op::Backward => &[
            (1, 1024, 4096, true, false),
            (3, 1024, 4096, false, true),
            (16, 1024, 4096, true, false),
            (130, 1024, 4160, true, true),
            (1000, 1024, 4096, true, false),
            (130, 14336, 1024, true, false),
        ],
    };
    for (i, &(m, n, k, dq, f32_out)) in cases.iter().enumerate() {
        let t = weight(400 + i as u64, [n, k], 64, dq);
        let wf = bf16_round(&t.dequantize());
        let (inner, outc) = op.dims([n, k]);
        let (xb, xf) = rand_bf16(&mut rng(500 + i as u64), m * inner, 1.0);
        let want = reference(op, &xf, m, &wf, [n, k]);
        let w = ok(Nf4Weight::upload(&g, &t));
        let x = ok(g.upload(&xb));
        let out = if f32_out { "f32" } else { "bf16" };
        let name = op.name();
        let got = run_out(&g, m * outc, f32_out, |o| {
            nf4::gemm_fused(&g, op, &x, m, &w, o)
        });
        check(
            &format!("gemm_fused {name} m={m} n={n} k={k} dq={dq} {out}"),
            &got,
            &want,
            BF16_W_ATOL * rms(&want),
            1e-2,
        );
        // The same bf16 weight through dequant + cuBLAS: only the summation order differs.
        let base = run_out(&g, m * outc, false, |o| match o {
            Out::Bf16(o) => nf4::gemm_dequant_cublas(&g, op, &x, m, &w, o),
            Out::F32(_) => unreachable!(),
        });
        check(
            &format!("dequant_cublas {name} m={m} n={n} k={k} dq={dq} bf16"),
            &base,
            &want,
            BF16_W_ATOL * rms(&want),
            1e-2,
        );
        // beta = 1 accumulates onto what the output holds (summed input gradients).
        let mut acc = ok(g.upload(&base.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()));
        ok(nf4::gemm_dequant_cublas_beta(
            &g, op, &x, m, &w, &mut acc, 1.0,
        ));
        let want2: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        check(
            &format!("dequant_cublas beta=1 {name} m={m} n={n} k={k} dq={dq}"),
            &download_bf16(&g, &acc),
            &want2,
            2.0 * BF16_W_ATOL * rms(&want),
            1e-2,
        );
        let fused32 = run_out(&g, m * outc, true, |o| {
            nf4::gemm_fused(&g, op, &x, m, &w, o)
        });
        check(
            &format!("gemm_fused_vs_cublas {name} m={m} n={n} k={k}"),
            &fused32,
            &base,
            1e-3 * rms(&want),
            1e-2,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_gemm_forward_matches_cpu() {
    gemm_cases(Nf4Op::Forward);
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_gemm_backward_matches_cpu() {
    gemm_cases(Nf4Op::Backward);
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_gemm_rejects_bad_shapes_without_launching() {
    let g = gpu();
    let t = weight(9, [64, 96], 32, false);
    let w = ok(Nf4Weight::upload(&g, &t));
    let x = ok(g.upload(&vec![bf16::ZERO; 4 * 96]));
    let mut o = ok(g.alloc::<f32>(4 * 96));
    let r = nf4::gemm_fused(&g, Nf4Op::Forward, &x, 4, &w, Out::F32(&mut o));
    assert!(is_bad_input(r), "K = 96 is not a multiple of 64");
    let small = ok(g.upload(&[bf16::ZERO; 10]));
    let r = nf4::gemv(&g, &small, 4, &w, Out::F32(&mut o));
    assert!(is_bad_input(r), "input too short");
    ok(g.synchronize());
}

#[test]
#[ignore = "needs a CUDA device"]
fn dispatcher_measures_once_and_caches_on_disk() {
    let g = gpu();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nf4-dispatch.json");
    let (m, n, k) = (256, 1024, 4096);
    let t = weight(11, [n, k], 64, true);
    let (xb, xf) = rand_bf16(&mut rng(12), m * k, 1.0);
    let want = reference(Nf4Op::Forward, &xf, m, &bf16_round(&t.dequantize()), [n, k]);
    let w = ok(Nf4Weight::upload(&g, &t));
    let x = ok(g.upload(&xb));
    let key = nf4::dispatch_key(Nf4Op::Forward, m, [n, k], false);

    let d = nf4::Nf4Dispatcher::with_cache(DispatchCache::load(&path, g.name()), None);
    let mut used = None;
    let got = run_out(&g, m * n, false, |o| {
        used = Some(d.matmul(&g, Nf4Op::Forward, &x, m, &w, o)?);
        Ok(())
    });
    check(
        "dispatch fwd m=256 n=1024 k=4096",
        &got,
        &want,
        BF16_W_ATOL * rms(&want),
        1e-2,
    );
    let e = d.cached(&key).expect("measured entry");
    assert_eq!(Some(e.choice), used);
    let timed: BTreeMap<_, _> = e.ms.clone();
    assert!(
        timed.contains_key("fused") && timed.contains_key("dequant_cublas"),
        "{timed:?}"
    );
    println!(
        "PARITY dispatch choice for {key}: {} {timed:?}",
        e.choice.name()
    );

    // A second dispatcher reads the file and does not measure again.
    let from_disk = DispatchCache::load(&path, g.name());
    assert_eq!(from_disk.get(&key), Some(&e));
    let d2 = nf4::Nf4Dispatcher::with_cache(from_disk, None);
    let got = run_out(&g, m * n, false, |o| {
        assert_eq!(Some(d2.matmul(&g, Nf4Op::Forward, &x, m, &w, o)?), used);
        Ok(())
    });
    check(
        "dispatch (cached) fwd m=256",
        &got,
        &want,
        1e-2 * rms(&want),
        1e-2,
    );

    // A forced path is used where it applies.
    let d3 =
        nf4::Nf4Dispatcher::with_cache(DispatchCache::in_memory(g.name()), Some(Nf4Path::Gemv));
    let mut o = ok(g.alloc::<bf16>(m * n));
    let p = ok(d3.matmul(&g, Nf4Op::Forward, &x, m, &w, Out::Bf16(&mut o)));
    assert_ne!(p, Nf4Path::Gemv, "the GEMV does not apply to 256 rows");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_tuner_times_every_variant_once_and_keeps_the_bits() {
    let g = gpu();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nf4-gemv.json");
    let (m, n, k) = (3, 2000, 4096);
    let t = weight(21, [n, k], 64, true);
    let (xb, _) = rand_bf16(&mut rng(22), m * k, 1.0);
    let w = ok(Nf4Weight::upload(&g, &t));
    let x = ok(g.upload(&xb));
    let want = run_out(&g, m * n, false, |o| nf4::gemv(&g, &x, m, &w, o));
    let key = nf4::gemv_key(m, &w, false);

    let d = nf4::Nf4Dispatcher::with_cache(DispatchCache::in_memory(g.name()), Some(Nf4Path::Gemv))
        .with_gemv_cache(nf4::GemvCache::load(&path, g.name()));
    let got = run_out(&g, m * n, false, |o| {
        assert_eq!(d.matmul(&g, Nf4Op::Forward, &x, m, &w, o)?, Nf4Path::Gemv);
        Ok(())
    });
    // Whichever variant won, the product is the default's, bit for bit.
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    if !g.can_time_events() {
        assert!(
            d.cached_gemv(&key).is_none(),
            "nothing measured without event timing"
        );
        return;
    }
    let e = d.cached_gemv(&key).expect("a measured entry");
    let names: Vec<&str> = nf4::GEMV_VARIANTS.iter().map(|v| v.name).collect();
    assert!(e.covers(&e.choice.0, &names), "{e:?}");
    assert!(e.ms.values().all(|t| t.is_finite() && *t > 0.0), "{e:?}");
    // The choice is a fastest one (ties go to the first in GEMV_VARIANTS' order).
    let fastest = e.ms.values().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(e.ms[&e.choice.0], fastest, "{e:?}");
    println!(
        "PARITY gemv tuner choice for {key}: {} {:?}",
        e.choice.0, e.ms
    );

    // A second dispatcher reads the file and keeps the choice without measuring again.
    let from_disk = nf4::GemvCache::load(&path, g.name());
    assert_eq!(from_disk.get(&key), Some(&e));
    let d2 = nf4::Nf4Dispatcher::with_cache(DispatchCache::in_memory(g.name()), None)
        .with_gemv_cache(from_disk);
    let mut o = Out::Bf16(&mut ok(g.alloc::<bf16>(m * n)));
    let v = ok(d2.gemv_variant_for(&g, &x, m, &w, &mut o));
    assert_eq!(v.name, e.choice.0);
    assert_eq!(d2.cached_gemv(&key), Some(e));
}

/// The device and whether it runs the wgmma GEMM; elsewhere the launcher must refuse
/// with BadInput (checked here) and the wgmma tests stop.
fn wgmma_gpu() -> Option<std::sync::Arc<Gpu>> {
    let g = gpu();
    if nf4::wgmma_supported(g.compute_capability(), palign::backend::cuda::TARGETS) {
        return Some(g);
    }
    let w = ok(Nf4Weight::upload(&g, &weight(1, [128, 128], 64, true)));
    let x = ok(g.upload(&vec![bf16::ZERO; 128 * 128]));
    let mut o = ok(g.alloc::<f32>(128 * 128));
    assert!(is_bad_input(nf4::gemm_wgmma(
        &g,
        &x,
        128,
        &w,
        Out::F32(&mut o)
    )));
    println!(
        "PARITY wgmma: not run on {} (compute capability {:?}, kernels {}): BadInput as expected",
        g.name(),
        g.compute_capability(),
        palign::backend::cuda::TARGETS
    );
    None
}

#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_gemm_reproduces_the_bf16_weight() {
    let Some(g) = wgmma_gpu() else { return };
    // X = [I_K ; 0]: row i < K is one-hot at k = i, so Y[i, n] = Wb[n, i] with a single
    // nonzero product (exact in f32, and a bf16 value survives the bf16 output). Rows
    // K.. are zero (the M tail); N = 264 and 1000 leave partial output tiles.
    // (shape, blocksize, double quant, f32 out); blocksize 32: a scale per 16-byte word.
    let cases: &[([usize; 2], usize, bool, bool)] = &[
        ([264, 256], 64, true, true),
        ([264, 256], 64, false, false),
        ([136, 128], 32, true, false),
        ([8, 64], 64, true, true),
        ([1000, 4096], 64, true, true),
        ([1024, 4096], 64, false, false),
    ];
    for (i, &(shape, bs, dq, f32_out)) in cases.iter().enumerate() {
        let [n, k] = shape;
        let m = k + 3;
        if common::on_emulator(&g) && m * n * k > common::EMULATOR_MACS {
            println!("PARITY wgmma one-hot {shape:?}: skipped on the emulator (too large)");
            continue;
        }
        let t = weight(600 + i as u64, shape, bs, dq);
        let wb = bf16_round(&t.dequantize());
        let mut xb = vec![bf16::ZERO; m * k];
        for r in 0..k {
            xb[r * k + r] = bf16::ONE;
        }
        let w = ok(Nf4Weight::upload(&g, &t));
        let x = ok(g.upload(&xb));
        for kernel in WGMMA_KERNELS {
            let got = run_out(&g, m * n, f32_out, |o| {
                nf4::gemm_wgmma_op(&g, kernel, Nf4Op::Forward, &x, m, &w, o)
            });
            let mut bad = 0usize;
            let mut first = None;
            for r in 0..m {
                for c in 0..n {
                    let want = if r < k { wb[c * k + r] } else { 0.0 };
                    // == (not bits): a -0.0 weight sums to +0.0.
                    if got[r * n + c] != want {
                        bad += 1;
                        first.get_or_insert((r, c, got[r * n + c], want));
                    }
                }
            }
            let out = if f32_out { "f32" } else { "bf16" };
            println!(
                "PARITY wgmma {kernel:?} one-hot {shape:?} bs={bs} dq={dq} {out}: mismatches={bad} n={}",
                m * n
            );
            assert_eq!(bad, 0, "{kernel:?} first (row, col, got, want): {first:?}");
        }
    }
}

/// Every wgmma GEMM.
const WGMMA_KERNELS: [nf4::WgmmaKernel; 3] = [
    nf4::WgmmaKernel::M128,
    nf4::WgmmaKernel::M256,
    nf4::WgmmaKernel::Rs,
];

#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_gemm_matches_cpu_and_fused() {
    let Some(g) = wgmma_gpu() else { return };
    // (m, n, k, double quant, f32 out). K = 64, 128, 192: one to three k-tiles (the
    // pipeline's prologue and tail); M = 1, 5, 77, 130, 300, 1000: partial row tiles;
    // N = 136, 264, 1000: partial column tiles; then the Mistral-7B shapes at M = 8192.
    let cases: &[(usize, usize, usize, bool, bool)] = &[
        (5, 256, 64, true, true),
        (130, 136, 128, false, false),
        (77, 264, 192, true, true),
        (300, 136, 128, true, false),
        (1, 1024, 4096, true, false),
        (1, 4096, 4096, false, true),
        (130, 1024, 4096, true, true),
        (130, 1000, 4096, true, false),
        (1000, 4096, 4096, true, false),
        (1000, 14336, 4096, true, true),
        (8192, 1024, 4096, true, true),
        (8192, 4096, 4096, true, false),
        (8192, 14336, 4096, true, false),
        (8192, 4096, 14336, true, true),
    ];
    for (i, &(m, n, k, dq, f32_out)) in cases.iter().enumerate() {
        if common::on_emulator(&g) && m * n * k > common::EMULATOR_MACS {
            println!("PARITY gemm_wgmma m={m} n={n} k={k}: skipped on the emulator (too large)");
            continue;
        }
        let t = if n * k <= 1 << 22 {
            weight(700 + i as u64, [n, k], 64, dq)
        } else {
            random_nf4(700 + i as u64, [n, k], dq)
        };
        let wf = bf16_round(&t.dequantize());
        let (xb, xf) = rand_bf16(&mut rng(800 + i as u64), m * k, 1.0);
        let w = ok(Nf4Weight::upload(&g, &t));
        let x = ok(g.upload(&xb));
        let out = if f32_out { "f32" } else { "bf16" };
        let got = run_out(&g, m * n, f32_out, |o| nf4::gemm_wgmma(&g, &x, m, &w, o));
        // The 256-row kernel runs the same wgmmas on the same operands in the same k
        // order, so it must give the same bits.
        let got256 = run_out(&g, m * n, f32_out, |o| {
            nf4::gemm_wgmma_op(&g, nf4::WgmmaKernel::M256, Nf4Op::Forward, &x, m, &w, o)
        });
        let differ = got
            .iter()
            .zip(&got256)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        println!("PARITY gemm_wgmma M256 vs M128 m={m} n={n} k={k} {out}: differ={differ}");
        assert_eq!(differ, 0, "the two wgmma GEMMs disagree");
        // The transposed kernel forms the same products in the same k16 steps with the
        // operands' roles swapped: held to the fused kernel's bound below, and its bits
        // against M128's are reported (equal on kemu; the tensor cores' internal order
        // within a k16 step is not documented).
        let got_rs = run_out(&g, m * n, f32_out, |o| {
            nf4::gemm_wgmma_op(&g, nf4::WgmmaKernel::Rs, Nf4Op::Forward, &x, m, &w, o)
        });
        let differ_rs = got
            .iter()
            .zip(&got_rs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        println!("PARITY gemm_wgmma Rs vs M128 m={m} n={n} k={k} {out}: differ={differ_rs}");
        // All rows against the CPU when that is cheap; else 64 rows: both ends, both
        // sides of a 128- and of a 256-row tile boundary, and random ones.
        let rows: Vec<usize> = if m * n * k <= 1 << 31 {
            (0..m).collect()
        } else {
            let mut r = rng(900 + i as u64);
            let mut v: Vec<usize> = (0..8)
                .chain(m - 8..m)
                .chain(120..136)
                .chain(248..264)
                .collect();
            v.extend((0..16).map(|_| r.random_range(0..m)));
            v
        };
        let want = reference_rows(&xf, &rows, &wf, [n, k]);
        let got_rows: Vec<f32> = rows
            .iter()
            .flat_map(|&r| got[r * n..(r + 1) * n].iter().copied())
            .collect();
        check(
            &format!(
                "gemm_wgmma m={m} n={n} k={k} dq={dq} {out} rows={}",
                rows.len()
            ),
            &got_rows,
            &want,
            BF16_W_ATOL * rms(&want),
            1e-2,
        );
        // Every element against the fused kernel (same weight bits, f32 out both): only
        // the summation order and the output rounding differ.
        let fused = run_out(&g, m * n, true, |o| {
            nf4::gemm_fused(&g, Nf4Op::Forward, &x, m, &w, o)
        });
        for (tag, got) in [("", &got), ("_rs", &got_rs)] {
            check(
                &format!("gemm_wgmma{tag}_vs_fused m={m} n={n} k={k} {out}"),
                got,
                &fused,
                1e-3 * rms(&want),
                1e-2,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_bwd_reproduces_the_bf16_weight() {
    let Some(g) = wgmma_gpu() else { return };
    // dY = [I_N ; 0]: row i < N is one-hot at n = i, so dX[i, k] = Wb[i, k], one nonzero
    // product (exact in f32, and a bf16 value survives the bf16 output): every weight
    // must land at its place through the kernel's transposing store (§5) or register
    // gather (§7). K = 136, 144, 400, 1000 leave partial output tiles; blocksize 32 gives
    // each 8-code word's row its own scale. The register-A kernel runs where K % 16 == 0.
    let cases: &[([usize; 2], usize, bool, bool)] = &[
        ([256, 264], 64, true, true),
        ([128, 136], 64, false, false),
        ([128, 128], 32, true, false),
        ([128, 144], 64, true, true),
        ([192, 400], 64, false, false),
        ([64, 8], 64, true, true),
        ([4096, 1000], 64, true, true),
    ];
    for (i, &(shape, bs, dq, f32_out)) in cases.iter().enumerate() {
        let [n, k] = shape;
        let m = n + 3;
        if common::on_emulator(&g) && m * n * k > common::EMULATOR_MACS {
            println!("PARITY wgmma bwd one-hot {shape:?}: skipped on the emulator (too large)");
            continue;
        }
        let t = weight(650 + i as u64, shape, bs, dq);
        let wb = bf16_round(&t.dequantize());
        let mut yb = vec![bf16::ZERO; m * n];
        for r in 0..n {
            yb[r * n + r] = bf16::ONE;
        }
        let w = ok(Nf4Weight::upload(&g, &t));
        let y = ok(g.upload(&yb));
        for kernel in WGMMA_KERNELS {
            if kernel.check(Nf4Op::Backward, shape).is_err() {
                continue; // the register-A backward at K = 1000 (its limits are tested above)
            }
            let got = run_out(&g, m * k, f32_out, |o| {
                nf4::gemm_wgmma_op(&g, kernel, Nf4Op::Backward, &y, m, &w, o)
            });
            let mut bad = 0usize;
            let mut first = None;
            for r in 0..m {
                for c in 0..k {
                    let want = if r < n { wb[r * k + c] } else { 0.0 };
                    if got[r * k + c] != want {
                        bad += 1;
                        first.get_or_insert((r, c, got[r * k + c], want));
                    }
                }
            }
            let out = if f32_out { "f32" } else { "bf16" };
            println!(
                "PARITY wgmma bwd {kernel:?} one-hot {shape:?} bs={bs} dq={dq} {out}: mismatches={bad} n={}",
                m * k
            );
            assert_eq!(bad, 0, "{kernel:?} first (row, col, got, want): {first:?}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_bwd_matches_cpu_and_fused() {
    let Some(g) = wgmma_gpu() else { return };
    // (m, n, k, double quant, f32 out): dX[m, k] = dY[m, n]·W. N = 64, 128, 192: one to
    // three reduction tiles; M = 1, 77, 300: partial row tiles (128 and 256); K = 136,
    // 1000: partial output tiles; then the Mistral-7B shapes at M = 8192.
    let cases: &[(usize, usize, usize, bool, bool)] = &[
        (5, 64, 256, true, true),
        (130, 128, 136, false, false),
        (300, 192, 264, true, true),
        (300, 128, 400, true, false),
        (1, 1024, 4096, true, false),
        (77, 4096, 1000, true, true),
        (8192, 4096, 4096, true, false),
        (8192, 14336, 4096, true, true),
        (8192, 4096, 14336, true, false),
        (8192, 1024, 4096, true, false),
    ];
    for (i, &(m, n, k, dq, f32_out)) in cases.iter().enumerate() {
        if common::on_emulator(&g) && m * n * k > common::EMULATOR_MACS {
            println!(
                "PARITY gemm_wgmma bwd m={m} n={n} k={k}: skipped on the emulator (too large)"
            );
            continue;
        }
        let t = if n * k <= 1 << 22 {
            weight(750 + i as u64, [n, k], 64, dq)
        } else {
            random_nf4(750 + i as u64, [n, k], dq)
        };
        let wf = bf16_round(&t.dequantize());
        let (yb, yf) = rand_bf16(&mut rng(850 + i as u64), m * n, 1.0);
        let w = ok(Nf4Weight::upload(&g, &t));
        let y = ok(g.upload(&yb));
        let out = if f32_out { "f32" } else { "bf16" };
        let got = run_out(&g, m * k, f32_out, |o| {
            nf4::gemm_wgmma_op(&g, nf4::WgmmaKernel::M128, Nf4Op::Backward, &y, m, &w, o)
        });
        let got256 = run_out(&g, m * k, f32_out, |o| {
            nf4::gemm_wgmma_op(&g, nf4::WgmmaKernel::M256, Nf4Op::Backward, &y, m, &w, o)
        });
        let differ = got
            .iter()
            .zip(&got256)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        println!("PARITY gemm_wgmma bwd M256 vs M128 m={m} n={n} k={k} {out}: differ={differ}");
        assert_eq!(differ, 0, "the two backward wgmma GEMMs disagree");
        // The register-A backward (K % 16 == 0 cases): against the CPU below, its bits
        // against M128 reported.
        let got_rs = (k % 16 == 0).then(|| {
            run_out(&g, m * k, f32_out, |o| {
                nf4::gemm_wgmma_op(&g, nf4::WgmmaKernel::Rs, Nf4Op::Backward, &y, m, &w, o)
            })
        });
        if let Some(rs) = &got_rs {
            let d = got
                .iter()
                .zip(rs)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            println!("PARITY gemm_wgmma bwd Rs vs M128 m={m} n={n} k={k} {out}: differ={d}");
        }
        // The CPU on every row when cheap, else 64 rows (both ends, both sides of the
        // 128- and 256-row tile boundaries, random ones).
        let rows: Vec<usize> = if m * n * k <= 1 << 31 {
            (0..m).collect()
        } else {
            let mut r = rng(950 + i as u64);
            let mut v: Vec<usize> = (0..8)
                .chain(m - 8..m)
                .chain(120..136)
                .chain(248..264)
                .collect();
            v.extend((0..16).map(|_| r.random_range(0..m)));
            v
        };
        let sub: Vec<f32> = rows
            .iter()
            .flat_map(|&r| yf[r * n..(r + 1) * n].iter().copied())
            .collect();
        let want = reference(Nf4Op::Backward, &sub, rows.len(), &wf, [n, k]);
        for (tag, g_all) in [("", Some(&got)), ("_rs", got_rs.as_ref())] {
            let Some(g_all) = g_all else { continue };
            let got_rows: Vec<f32> = rows
                .iter()
                .flat_map(|&r| g_all[r * k..(r + 1) * k].iter().copied())
                .collect();
            check(
                &format!(
                    "gemm_wgmma{tag} bwd m={m} n={n} k={k} dq={dq} {out} rows={}",
                    rows.len()
                ),
                &got_rows,
                &want,
                BF16_W_ATOL * rms(&want),
                1e-2,
            );
        }
        // Every element against the fused kernel where it runs (it needs K % 64 == 0).
        if nf4::check_fused(Nf4Op::Backward, [n, k]).is_ok() {
            let fused = run_out(&g, m * k, true, |o| {
                nf4::gemm_fused(&g, Nf4Op::Backward, &y, m, &w, o)
            });
            check(
                &format!("gemm_wgmma_bwd_vs_fused m={m} n={n} k={k} {out}"),
                &got,
                &fused,
                1e-3 * rms(&want),
                1e-2,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_gemm_rejects_bad_shapes_without_launching() {
    let g = gpu();
    let x = ok(g.upload(&vec![bf16::ZERO; 4 * 4096]));
    let mut o = ok(g.alloc::<f32>(4 * 4096));
    for kernel in WGMMA_KERNELS {
        let w = ok(Nf4Weight::upload(&g, &weight(13, [1004, 4096], 64, true)));
        let r = nf4::gemm_wgmma_op(&g, kernel, Nf4Op::Forward, &x, 4, &w, Out::F32(&mut o));
        assert!(
            is_bad_input(r),
            "{kernel:?}: N = 1004 is not a multiple of 8"
        );
        let w = ok(Nf4Weight::upload(&g, &weight(14, [64, 96], 32, false)));
        let r = nf4::gemm_wgmma_op(&g, kernel, Nf4Op::Forward, &x, 4, &w, Out::F32(&mut o));
        assert!(
            is_bad_input(r),
            "{kernel:?}: K = 96 is not a multiple of 64"
        );
        let w = ok(Nf4Weight::upload(&g, &weight(15, [128, 4096], 64, true)));
        let mut small = ok(g.alloc::<f32>(10));
        let r = nf4::gemm_wgmma_op(&g, kernel, Nf4Op::Forward, &x, 4, &w, Out::F32(&mut small));
        assert!(is_bad_input(r), "{kernel:?}: output too short");
        // Backward: N = 1000 is not a multiple of 64.
        let w = ok(Nf4Weight::upload(&g, &weight(16, [1000, 64], 64, true)));
        let r = nf4::gemm_wgmma_op(&g, kernel, Nf4Op::Backward, &x, 4, &w, Out::F32(&mut o));
        assert!(is_bad_input(r), "{kernel:?}: backward N = 1000");
    }
    let w = ok(Nf4Weight::upload(&g, &weight(17, [64, 1000], 64, true)));
    let r = nf4::gemm_wgmma_op(
        &g,
        nf4::WgmmaKernel::Rs,
        Nf4Op::Backward,
        &x,
        4,
        &w,
        Out::F32(&mut o),
    );
    assert!(is_bad_input(r), "the register-A backward needs K % 16 == 0");
    ok(g.synchronize());
}

// Named wgmma_*: tests run in name order, and this one launches the sm_90a kernels, so
// it runs after every mma.sync test (a fault or hang on their first GPU run then takes
// no other result with it).
#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_dispatcher_times_it_only_when_enabled() {
    let g = gpu();
    let (m, n, k) = (512, 1024, 4096);
    let t = weight(16, [n, k], 64, true);
    let (xb, xf) = rand_bf16(&mut rng(17), m * k, 1.0);
    let want = reference(Nf4Op::Forward, &xf, m, &bf16_round(&t.dequantize()), [n, k]);
    let w = ok(Nf4Weight::upload(&g, &t));
    let x = ok(g.upload(&xb));
    let key = nf4::dispatch_key(Nf4Op::Forward, m, [n, k], false);
    let cache = |d: &nf4::Nf4Dispatcher| d.cached(&key).expect("measured entry");

    // Off (the default): never timed, never chosen.
    let d = nf4::Nf4Dispatcher::with_cache(DispatchCache::in_memory(g.name()), None);
    let got = run_out(&g, m * n, false, |o| {
        assert_ne!(d.matmul(&g, Nf4Op::Forward, &x, m, &w, o)?, Nf4Path::Wgmma);
        Ok(())
    });
    check(
        "dispatch wgmma-off fwd m=512",
        &got,
        &want,
        BF16_W_ATOL * rms(&want),
        1e-2,
    );
    let e = cache(&d);
    assert!(!e.ms.contains_key("wgmma"), "{:?}", e.ms);

    // On: timed too on sm_90 (the earlier entry lacks it, so it is measured again);
    // ignored on any other GPU.
    let mut c = DispatchCache::in_memory(g.name());
    c.insert(key.clone(), e);
    let d = nf4::Nf4Dispatcher::with_cache(c, None).with_wgmma(true);
    let got = run_out(&g, m * n, false, |o| {
        d.matmul(&g, Nf4Op::Forward, &x, m, &w, o)?;
        Ok(())
    });
    check(
        "dispatch wgmma-on fwd m=512",
        &got,
        &want,
        BF16_W_ATOL * rms(&want),
        1e-2,
    );
    let e = cache(&d);
    let sm90 = nf4::wgmma_supported(g.compute_capability(), palign::backend::cuda::TARGETS);
    assert_eq!(e.ms.contains_key("wgmma"), sm90, "{:?}", e.ms);
    assert_eq!(e.ms.contains_key("wgmma_m256"), sm90, "{:?}", e.ms);
    assert_eq!(e.ms.contains_key("wgmma_rs"), sm90, "{:?}", e.ms);
    println!(
        "PARITY dispatch wgmma-on choice for {key}: {} {:?}",
        e.choice.name(),
        e.ms
    );
}
