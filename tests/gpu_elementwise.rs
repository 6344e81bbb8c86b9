//! GPU-vs-CPU parity for kernels/elementwise.cu (backend::cuda::elementwise) and for
//! `blas::gemm_bf16_f32out`.
//!
//! The GPU tests are `#[ignore = "needs a CUDA device"]`; tools/gpu-check.sh runs them
//! with `--ignored`. Each prints `PARITY <case>: ...` lines like tests/gpu_small_kernels.rs.
//!
//! The references are naive loops here, on the same bf16-rounded inputs the device gets.
//! Tolerances: the elementwise and row ops do the same f32 operations as the reference
//! and one round-to-nearest-even to bf16, so they must be bit-identical (axpy too: the
//! kernel forbids FMA contraction, as the reference `y + alpha * x` has none). Dropout's
//! mask must be `cpu::rng::dropout_keep` bit for bit and its values exact. The f32-output
//! GEMM is compared with an f64 reference at atol 1e-3 + rtol 1e-3.
//!
//! The test that always runs checks the kernel names: in KERNEL_NAMES, and in the
//! embedded fatbin when the kernels were compiled.

mod common;

use common::{assert_kernels_registered, check_with, gpu, is_bad_input, rng, NonFinite};
use half::bf16;
use palign::backend::cpu::rng;
use palign::backend::cuda::{blas, elementwise as ew, DeviceBuffer, Gpu};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const KERNELS: &[&str] = &[
    "add_bf16",
    "axpy_bf16",
    "mul_bf16",
    "dropout_bf16",
    "gather_rows_bf16",
    "scatter_add_rows_bf16",
    "copy_rows_bf16",
];

// ---------------------------------------------------------------- always run

#[test]
fn elementwise_kernels_are_registered_and_in_the_fatbin() {
    assert_kernels_registered(KERNELS);
}

#[test]
fn device_splitmix64_has_the_cpu_constants() {
    // The device mixer cannot run here, so read its constants and shifts out of the
    // source and run that recipe against cpu::rng::splitmix64 (catches a typo'd digit).
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/elementwise.cu");
    let text = std::fs::read_to_string(path).unwrap();
    let body = |head: &str| -> String {
        let start = text
            .find(head)
            .unwrap_or_else(|| panic!("{head} not found"));
        let rest = &text[start..];
        rest[..rest.find("\n}").unwrap()].to_string()
    };
    let mix = body("uint64_t splitmix64(uint64_t z) {");
    let consts: Vec<u64> = mix
        .split("0x")
        .skip(1)
        .map(|t| u64::from_str_radix(t.split("ull").next().unwrap(), 16).unwrap())
        .collect();
    let shifts: Vec<u32> = mix
        .split(">> ")
        .skip(1)
        .map(|t| t.split(')').next().unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!((consts.len(), shifts.len()), (3, 3), "{mix}");
    let device = |z: u64| {
        let z = z.wrapping_add(consts[0]);
        let z = (z ^ (z >> shifts[0])).wrapping_mul(consts[1]);
        let z = (z ^ (z >> shifts[1])).wrapping_mul(consts[2]);
        z ^ (z >> shifts[2])
    };
    let mut r = rng(0);
    for _ in 0..1000 {
        let z: u64 = r.random();
        assert_eq!(device(z), rng::splitmix64(z), "z = {z:#x}");
    }
    // The uniform: top 24 bits times 2^-24, kept when u >= p (as cpu::rng::uniform).
    let keep = body("bool dropout_keep(");
    for part in [
        "(stream + i) >> 40",
        "(1.0f / 16777216.0f)",
        "return u >= p;",
    ] {
        assert!(keep.contains(part), "dropout_keep lacks {part:?}:\n{keep}");
    }
}

// ---------------------------------------------------------------- helpers

/// n values uniform in [-scale, scale], rounded to bf16.
fn rand_bf16(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<bf16> {
    common::rand_bf16(r, n, scale).0
}

/// Assert the bf16 outputs are bit-identical; print the PARITY line.
fn same_bits(case: &str, got: &[bf16], want: &[bf16]) {
    assert_eq!(got.len(), want.len(), "{case}: lengths");
    let mut max_abs = 0.0f32;
    let mut first_bad = None;
    let mut n_bad = 0usize;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() != w.to_bits() {
            n_bad += 1;
            first_bad.get_or_insert(i);
            max_abs = max_abs.max((g.to_f32() - w.to_f32()).abs());
        }
    }
    println!(
        "PARITY {case}: max_abs_err={max_abs:.3e} mismatches={n_bad} (bit-exact, n={})",
        got.len()
    );
    if let Some(i) = first_bad {
        panic!(
            "{case}: {n_bad} mismatches, first at {i}: got {} want {}",
            got[i], want[i]
        );
    }
}

/// Assert |got − want| <= atol + rtol·|want| everywhere (any NaN or infinity fails);
/// print the PARITY line.
fn check(case: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    check_with(case, got, want, atol, rtol, NonFinite::Fail, None);
}

fn up<T: bytemuck::Pod>(g: &Gpu, v: &[T]) -> DeviceBuffer<T> {
    g.upload(v).unwrap()
}

fn down<T: bytemuck::Pod>(g: &Gpu, b: &DeviceBuffer<T>) -> Vec<T> {
    g.download(b).unwrap()
}

/// Lengths that hit the scalar tail (not a multiple of 8), the vector path, and (the
/// last) more elements than one grid-stride pass covers (16 blocks per SM are launched).
fn flat_sizes(g: &Gpu) -> Vec<usize> {
    let one_pass = g.sm_count() as usize * 16 * 256 * 8;
    vec![1, 7, 8, 1001, 4096, 2 * one_pass + 13]
}

// ---------------------------------------------------------------- flat ops

#[test]
#[ignore = "needs a CUDA device"]
fn add_axpy_mul_are_bit_exact() {
    let g = gpu();
    let mut r = rng(1);
    for n in flat_sizes(&g) {
        let x = rand_bf16(&mut r, n, 2.0);
        let y = rand_bf16(&mut r, n, 2.0);
        let f = |v: &bf16| v.to_f32();

        let want: Vec<bf16> = y
            .iter()
            .zip(&x)
            .map(|(a, b)| bf16::from_f32(f(a) + f(b)))
            .collect();
        let (xd, mut yd) = (up(&g, &x), up(&g, &y));
        ew::add_bf16(&g, &xd, &mut yd).unwrap();
        same_bits(&format!("add n={n}"), &down(&g, &yd), &want);

        // An alpha whose products are not exact in bf16, so the f32 rounding matters.
        let alpha = -0.3721f32;
        let want: Vec<bf16> = y
            .iter()
            .zip(&x)
            .map(|(a, b)| bf16::from_f32(f(a) + alpha * f(b)))
            .collect();
        let mut yd = up(&g, &y);
        ew::axpy_bf16(&g, alpha, &xd, &mut yd).unwrap();
        same_bits(&format!("axpy n={n}"), &down(&g, &yd), &want);

        let want: Vec<bf16> = y
            .iter()
            .zip(&x)
            .map(|(a, b)| bf16::from_f32(f(a) * f(b)))
            .collect();
        let yd = up(&g, &y);
        let mut out = g.alloc::<bf16>(n).unwrap();
        ew::mul_bf16(&g, &yd, &xd, &mut out).unwrap();
        same_bits(&format!("mul n={n}"), &down(&g, &out), &want);
    }

    // Too-short outputs are refused before any launch.
    let (x, b) = (
        up(&g, &rand_bf16(&mut r, 10, 1.0)),
        up(&g, &[bf16::ZERO; 9]),
    );
    let mut short = g.alloc::<bf16>(9).unwrap();
    assert!(is_bad_input(ew::add_bf16(&g, &x, &mut short)));
    assert!(is_bad_input(ew::axpy_bf16(&g, 2.0, &x, &mut short)));
    let mut out = g.alloc::<bf16>(10).unwrap();
    assert!(is_bad_input(ew::mul_bf16(&g, &x, &b, &mut out)));
    assert!(is_bad_input(ew::mul_bf16(&g, &x, &x, &mut short)));
}

#[test]
#[ignore = "needs a CUDA device"]
fn dropout_mask_is_the_cpu_mask() {
    let g = gpu();
    let mut r = rng(2);
    // Inputs away from 0, so a zero output means "dropped".
    let away = |r: &mut ChaCha8Rng, n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| {
                let v: f32 = r.random_range(0.25..2.0);
                bf16::from_f32(if r.random::<bool>() { v } else { -v })
            })
            .collect()
    };
    // The last stream wraps around 2^64 inside the tensor (stream + i overflows).
    let streams = [
        rng::dropout_stream(42, 0, 0),
        rng::dropout_stream(7, 123, 5),
        u64::MAX - 3000,
    ];
    for n in flat_sizes(&g) {
        for (si, &stream) in streams.iter().enumerate() {
            for p in [0.0f32, 0.05, 0.1, 0.5, 0.9] {
                let x = away(&mut r, n);
                let scale = 1.0f32 / (1.0 - p);
                let keep: Vec<bool> = (0..n as u64)
                    .map(|i| rng::dropout_keep(stream, i, p))
                    .collect();
                let want: Vec<bf16> = x
                    .iter()
                    .zip(&keep)
                    .map(|(v, &k)| {
                        if k {
                            bf16::from_f32(v.to_f32() * scale)
                        } else {
                            bf16::ZERO
                        }
                    })
                    .collect();
                let xd = up(&g, &x);
                let mut out = g.alloc::<bf16>(n).unwrap();
                ew::dropout_bf16(&g, &xd, stream, p, &mut out).unwrap();
                let got = down(&g, &out);
                let got_keep: Vec<bool> = got.iter().map(|v| v.to_f32() != 0.0).collect();
                let n_diff = got_keep.iter().zip(&keep).filter(|(a, b)| a != b).count();
                println!("PARITY dropout mask n={n} stream#{si} p={p}: mismatches={n_diff}");
                assert_eq!(n_diff, 0, "dropout mask n={n} stream#{si} p={p}");
                same_bits(&format!("dropout n={n} stream#{si} p={p}"), &got, &want);
            }
        }
    }

    let x = up(&g, &away(&mut r, 16));
    let mut out = g.alloc::<bf16>(16).unwrap();
    for p in [1.0f32, -0.1, f32::NAN] {
        assert!(
            is_bad_input(ew::dropout_bf16(&g, &x, 1, p, &mut out)),
            "p {p}"
        );
    }
    let mut short = g.alloc::<bf16>(15).unwrap();
    assert!(is_bad_input(ew::dropout_bf16(&g, &x, 1, 0.1, &mut short)));
}

// ---------------------------------------------------------------- row ops

/// Row lengths: vectorized (multiple of 8, short and long rows) and scalar.
const COLS: &[usize] = &[8, 64, 37, 1000, 4096];

#[test]
#[ignore = "needs a CUDA device"]
fn gather_rows_is_exact() {
    let g = gpu();
    let mut r = rng(3);
    for &cols in COLS {
        // More rows than the row kernels' grid (32 blocks per SM) when rows are short.
        let n_rows = if cols <= 8 { 10_000 } else { 300 };
        let n_src = 50;
        let x = rand_bf16(&mut r, n_src * cols, 3.0);
        // Repeats are fine for a gather; the last index is out of range (a zero row).
        let mut rows: Vec<u32> = (0..n_rows)
            .map(|_| r.random_range(0..n_src as u32))
            .collect();
        rows[n_rows - 1] = n_src as u32 + 7;
        let mut want = Vec::with_capacity(n_rows * cols);
        for &s in &rows {
            let s = s as usize;
            if s < n_src {
                want.extend_from_slice(&x[s * cols..(s + 1) * cols]);
            } else {
                want.extend(std::iter::repeat_n(bf16::ZERO, cols));
            }
        }
        let (xd, rd) = (up(&g, &x), up(&g, &rows));
        // Non-zero garbage first, so the zero row must be written.
        let mut out = up(&g, &vec![bf16::from_f32(9.0); n_rows * cols]);
        ew::gather_rows_bf16(&g, &xd, cols, &rd, &mut out).unwrap();
        same_bits(
            &format!("gather rows={n_rows} cols={cols}"),
            &down(&g, &out),
            &want,
        );
    }

    let x = up(&g, &rand_bf16(&mut r, 40, 1.0));
    let rows = up(&g, &[0u32, 1, 2]);
    let mut out = g.alloc::<bf16>(3 * 8).unwrap();
    assert!(is_bad_input(ew::gather_rows_bf16(
        &g, &x, 0, &rows, &mut out
    )));
    assert!(is_bad_input(ew::gather_rows_bf16(
        &g, &x, 7, &rows, &mut out
    )));
    let mut short = g.alloc::<bf16>(3 * 8 - 1).unwrap();
    assert!(is_bad_input(ew::gather_rows_bf16(
        &g, &x, 8, &rows, &mut short
    )));
}

#[test]
#[ignore = "needs a CUDA device"]
fn scatter_add_rows_is_exact() {
    let g = gpu();
    let mut r = rng(4);
    for &cols in COLS {
        let n_dst = if cols <= 8 { 12_000 } else { 120 };
        let n_rows = n_dst / 2;
        let dst = rand_bf16(&mut r, n_dst * cols, 2.0);
        let src = rand_bf16(&mut r, n_rows * cols, 2.0);
        // Distinct destination rows, as the launcher requires; one out of range (skipped).
        let mut perm: Vec<u32> = (0..n_dst as u32).collect();
        perm.shuffle(&mut r);
        let mut rows = perm[..n_rows].to_vec();
        rows[0] = n_dst as u32;
        let mut want = dst.clone();
        for (i, &d) in rows.iter().enumerate() {
            let d = d as usize;
            if d >= n_dst {
                continue;
            }
            for j in 0..cols {
                let w = &mut want[d * cols + j];
                *w = bf16::from_f32(w.to_f32() + src[i * cols + j].to_f32());
            }
        }
        let (sd, rd) = (up(&g, &src), up(&g, &rows));
        let mut dd = up(&g, &dst);
        ew::scatter_add_rows_bf16(&g, &sd, cols, &rd, &mut dd).unwrap();
        same_bits(
            &format!("scatter-add rows={n_rows} dst={n_dst} cols={cols}"),
            &down(&g, &dd),
            &want,
        );
    }

    let src = up(&g, &rand_bf16(&mut r, 2 * 8, 1.0));
    let rows = up(&g, &[0u32, 3]);
    let mut dst = g.zeros::<bf16>(4 * 8).unwrap();
    assert!(is_bad_input(ew::scatter_add_rows_bf16(
        &g, &src, 0, &rows, &mut dst
    )));
    assert!(is_bad_input(ew::scatter_add_rows_bf16(
        &g, &src, 5, &rows, &mut dst
    )));
    let three = up(&g, &[0u32, 1, 2]);
    assert!(is_bad_input(ew::scatter_add_rows_bf16(
        &g, &src, 8, &three, &mut dst
    )));
}

/// `ops::scatter_add_rows` with a destination row named several times (a shared prompt
/// row predicting the first token of both DPO completions): the device adds the
/// occurrences in passes, in order, each rounded to bf16 like the kernel's single add.
#[test]
#[ignore = "needs a CUDA device"]
fn scatter_add_with_repeated_rows_adds_every_occurrence() {
    let _g = gpu();
    let mut r = rng(9);
    let (n_dst, cols) = (10usize, 24usize);
    let rows = [4usize, 1, 4, 7, 4, 1, 0];
    let dst = rand_bf16(&mut r, n_dst * cols, 2.0);
    let src = rand_bf16(&mut r, rows.len() * cols, 2.0);
    let mut want = dst.clone();
    for (i, &d) in rows.iter().enumerate() {
        for j in 0..cols {
            let w = &mut want[d * cols + j];
            *w = bf16::from_f32(w.to_f32() + src[i * cols + j].to_f32());
        }
    }
    let t = |v: &[bf16], n: usize| {
        let f: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
        palign::tensor::Tensor::from_vec(f, &[n, cols])
            .to_cuda_bf16()
            .unwrap()
    };
    let mut dd = t(&dst, n_dst);
    palign::ops::scatter_add_rows(&mut dd, &rows, &t(&src, rows.len())).unwrap();
    let got: Vec<bf16> = palign::ops::to_host(&dd)
        .unwrap()
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    same_bits("scatter-add repeated rows", &got, &want);
}

#[test]
#[ignore = "needs a CUDA device"]
fn copy_rows_is_exact() {
    let g = gpu();
    let mut r = rng(5);
    for &cols in COLS {
        let (n_src, n_dst) = if cols <= 8 { (9_000, 11_000) } else { (40, 70) };
        let n_rows = n_src.min(n_dst) - 3;
        let src = rand_bf16(&mut r, n_src * cols, 4.0);
        let dst = rand_bf16(&mut r, n_dst * cols, 4.0);
        let mut perm: Vec<u32> = (0..n_dst as u32).collect();
        perm.shuffle(&mut r);
        let mut dst_rows = perm[..n_rows].to_vec();
        let mut src_rows: Vec<u32> = (0..n_rows)
            .map(|_| r.random_range(0..n_src as u32))
            .collect();
        // Either index out of range: the pair is skipped.
        src_rows[1] = n_src as u32;
        dst_rows[2] = u32::MAX;
        let mut want = dst.clone();
        for (&d, &s) in dst_rows.iter().zip(&src_rows) {
            let (d, s) = (d as usize, s as usize);
            if d < n_dst && s < n_src {
                want[d * cols..(d + 1) * cols].copy_from_slice(&src[s * cols..(s + 1) * cols]);
            }
        }
        let (sd, sr, dr) = (up(&g, &src), up(&g, &src_rows), up(&g, &dst_rows));
        let mut dd = up(&g, &dst);
        ew::copy_rows_bf16(&g, &sd, &sr, &mut dd, &dr, cols).unwrap();
        same_bits(
            &format!("copy rows={n_rows} src={n_src} dst={n_dst} cols={cols}"),
            &down(&g, &dd),
            &want,
        );
    }

    let src = up(&g, &rand_bf16(&mut r, 2 * 8, 1.0));
    let mut dst = g.zeros::<bf16>(4 * 8).unwrap();
    let (two, three) = (up(&g, &[0u32, 1]), up(&g, &[0u32, 1, 2]));
    assert!(is_bad_input(ew::copy_rows_bf16(
        &g, &src, &two, &mut dst, &three, 8
    )));
    assert!(is_bad_input(ew::copy_rows_bf16(
        &g, &src, &two, &mut dst, &two, 0
    )));
    assert!(is_bad_input(ew::copy_rows_bf16(
        &g, &src, &two, &mut dst, &two, 3
    )));
}

// ---------------------------------------------------------------- gemm, f32 out

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_bf16_f32out_matches_f64_reference() {
    let g = gpu();
    let mut r = rng(6);
    // The LoRA dA accumulation shape first: op(A) = (dY·B)ᵀ stored [k, m], beta = 1.
    let cases = [
        (37, 16, 200, true, false, 0.5f32, 1.0f32),
        (37, 16, 200, false, true, 1.0, 0.0),
        (37, 16, 200, false, false, -0.75, 1.0),
        (37, 16, 200, true, true, 2.0, 0.5),
        (16, 4099, 33, true, false, 0.125, 1.0),
    ];
    for (m, n, k, trans_a, trans_b, alpha, beta) in cases {
        let a = rand_bf16(&mut r, m * k, 1.0);
        let b = rand_bf16(&mut r, k * n, 1.0);
        let c0: Vec<f32> = (0..m * n).map(|_| r.random_range(-3.0..3.0)).collect();
        let (af, bf): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|v| v.to_f32()).collect(),
            b.iter().map(|v| v.to_f32()).collect(),
        );
        let prod = common::gemm_ref_f64(&af, &bf, m, n, k, trans_a, trans_b);
        let spec = blas::Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha,
            beta,
        };
        let (ad, bd) = (up(&g, &a), up(&g, &b));
        let mut cd = up(&g, &c0);
        blas::gemm_bf16_f32out(&g, spec, &ad, &bd, &mut cd).unwrap();
        let want: Vec<f32> = (0..m * n)
            .map(|i| (alpha as f64 * prod[i] + beta as f64 * c0[i] as f64) as f32)
            .collect();
        let case = format!("gemm f32out {m}x{n}x{k} ta={trans_a} tb={trans_b} b={beta}");
        check(&case, &down(&g, &cd), &want, 1e-3, 1e-3);

        // A second call with beta = 1 accumulates on top (micro-batch gradient sums).
        let acc = blas::Gemm { beta: 1.0, ..spec };
        blas::gemm_bf16_f32out(&g, acc, &ad, &bd, &mut cd).unwrap();
        let want: Vec<f32> = (0..m * n)
            .map(|i| (2.0 * alpha as f64 * prod[i] + beta as f64 * c0[i] as f64) as f32)
            .collect();
        check(&format!("{case} +acc"), &down(&g, &cd), &want, 1e-3, 1e-3);
    }

    let (a, b) = (
        up(&g, &rand_bf16(&mut r, 6, 1.0)),
        up(&g, &rand_bf16(&mut r, 6, 1.0)),
    );
    let mut c = g.zeros::<f32>(3).unwrap();
    let spec = blas::Gemm::linear(2, 2, 3); // needs c of 4
    assert!(is_bad_input(blas::gemm_bf16_f32out(
        &g, spec, &a, &b, &mut c
    )));
}
