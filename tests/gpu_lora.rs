//! LoRA projections on the device (src/backend/cuda/lora.rs, kernels/nf4.cu
//! `nf4_gemm_{fwd,bwd}_lora`) against an f64 reference on the same bf16 inputs.
//!
//! GPU tests are `#[ignore = "needs a CUDA device"]` (tools/gpu-check.sh runs them with
//! `--ignored`). Each prints `PARITY <case>: ...` lines, `worst` = the largest
//! err / (atol + rtol·|ref|), which must be ≤ 1. Tolerances:
//! - bf16 outputs Y and dX: atol = 2e-2·rms(ref), rtol = 2e-2. bf16 keeps 8 significant
//!   bits (rounding error ≤ 2^-8 = 0.4% of the value). The kernels multiply by bf16(W)
//!   where the reference has the f32 NF4 value (≤ 2^-8 per weight, random in sign:
//!   about 0.2%·rms(ref) on a sum), round the s-scaled factor X·Aᵀ or dY·B (the same on
//!   the adapter term), round the output (≤ 0.4%·|ref|) and, unfused, round the base
//!   product before the rank-r update (≤ 0.4% of |base|, which reaches ~4·rms(ref) in
//!   the tails: 1.6%·rms). The adapter term is kept at about half the base term (each
//!   case asserts it is at least 20% of rms(ref)), so a missing, doubled or misplaced
//!   slab moves outputs by O(rms(ref)) and fails.
//! - fused vs unfused (same bf16 factor and base kernel; they differ by the unfused
//!   rounding of the base term and the order of the adapter sum): the same 2e-2 bounds.
//! - the saved factors s·drop(X)·Aᵀ, s·dY·B (bf16, one rounding ≤ 0.4%): 1e-2·rms, 1e-2.
//! - f32 weight gradients dA, dB (cuBLAS, f32 sums of the bf16 factors, each off by
//!   ≤ 0.4%, random in sign: about 0.2%·rms(ref), 5σ = 1%): 2e-2·rms, 1e-2.
//!
//! The tests that always run check what needs no GPU: kernel names in the fatbin, the
//! fused limits (errors, not panics), and the reference against the CPU model's ops
//! (`ops::linear`, `ops::matmul_t`, ... as `proj_backward` in src/model/llama.rs uses
//! them).

mod common;

use common::{
    assert_kernels_registered, check_with, f32s, gpu, is_bad_input, ok, rms, rng, NonFinite,
};
use half::bf16;
use palign::backend::cuda::lora::{self, LoraBase, LoraDev, LoraPath};
use palign::backend::cuda::nf4::{self, Nf4Op, Nf4Weight, Out};
use palign::backend::cuda::{DeviceBuffer, Gpu};
use palign::ops::{self, LinearWeight};
use palign::quant::{quantize_nf4, Nf4Tensor};
use palign::tensor::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::Arc;

// ---------------------------------------------------------------- reference

/// The inputs of one projection, all exactly representable in bf16 (W: the f32 NF4
/// dequantization, whose bf16 rounding the kernels use).
struct Inputs {
    m: usize,
    out: usize,
    inp: usize,
    r: usize,
    s: f32,
    x: Vec<f32>,  // [m, in]
    xd: Vec<f32>, // drop(x), [m, in]
    w: Vec<f32>,  // [out, in]
    a: Vec<f32>,  // [r, in]
    b: Vec<f32>,  // [out, r]
    dy: Vec<f32>, // [m, out]
}

/// f64 sums, stored as f32. `*_adapter` is the adapter's part of Y and dX alone.
struct Reference {
    xa: Vec<f32>,  // drop(x)·Aᵀ (unscaled), [m, r]
    dyb: Vec<f32>, // dy·B (unscaled), [m, r]
    y: Vec<f32>,
    y_adapter: Vec<f32>,
    dx: Vec<f32>,
    dx_adapter: Vec<f32>,
    grad_a: Vec<f32>, // s·dybᵀ·drop(x), [r, in]
    grad_b: Vec<f32>, // s·dyᵀ·xa, [out, r]
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum()
}

/// `c[i, j] = Σ_k a[i, k]·b[j, k]` (both row-major with rows of `k`), f64 sums.
fn mul_t(a: &[f32], b: &[f32], rows: usize, cols: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0.0f64; rows * cols];
    c.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let ar = &a[i * k..(i + 1) * k];
            for (j, o) in row.iter_mut().enumerate() {
                *o = dot(ar, &b[j * k..(j + 1) * k]);
            }
        });
    c
}

/// The transpose of a row-major `[rows, cols]` matrix.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

fn reference(p: &Inputs) -> Reference {
    let (m, out, inp, r, s) = (p.m, p.out, p.inp, p.r, p.s as f64);
    let xa = mul_t(&p.xd, &p.a, m, r, inp);
    let xa32 = f32s(&xa);
    let base = mul_t(&p.x, &p.w, m, out, inp);
    let ad = mul_t(&xa32, &p.b, m, out, r); // xa rows · B rows
    let bt = transpose(&p.b, out, r); // [r, out]
    let dyb = mul_t(&p.dy, &bt, m, r, out);
    let wt = transpose(&p.w, out, inp); // [in, out]
    let dx_base = mul_t(&p.dy, &wt, m, inp, out);
    let at = transpose(&p.a, r, inp); // [in, r]
    let dyb32 = f32s(&dyb);
    let dx_ad = mul_t(&dyb32, &at, m, inp, r);
    // Gradients: transposes make both plain row-by-row sums over the m tokens.
    let dyt = transpose(&p.dy, m, out); // [out, m]
    let xat = transpose(&xa32, m, r); // [r, m]
    let gb = mul_t(&dyt, &xat, out, r, m);
    let dybt = transpose(&dyb32, m, r); // [r, m]
    let xdt = transpose(&p.xd, m, inp); // [in, m]
    let ga = mul_t(&dybt, &xdt, r, inp, m);
    let comb = |b: &[f64], a: &[f64]| -> Vec<f32> {
        b.iter().zip(a).map(|(&u, &v)| (u + s * v) as f32).collect()
    };
    let scaled = |v: &[f64]| -> Vec<f32> { v.iter().map(|&u| (s * u) as f32).collect() };
    Reference {
        y: comb(&base, &ad),
        y_adapter: scaled(&ad),
        dx: comb(&dx_base, &dx_ad),
        dx_adapter: scaled(&dx_ad),
        grad_a: scaled(&ga),
        grad_b: scaled(&gb),
        xa: xa32,
        dyb: dyb32,
    }
}

// ---------------------------------------------------------------- inputs

/// An NF4 weight as in tests/gpu_nf4.rs: per-row magnitudes 0.02 to 1.82, one zero
/// block and one outlier.
fn nf4_weight(seed: u64, shape: [usize; 2], dq: bool) -> Nf4Tensor {
    let mut r = rng(seed);
    let [n, k] = shape;
    let mut w: Vec<f32> = (0..n * k)
        .map(|i| r.random_range(-1.0f32..1.0) * (0.02 + (i / k % 7) as f32 * 0.3))
        .collect();
    w[64..128].fill(0.0);
    w[133] = 40.0;
    quantize_nf4(&w, shape, 64, dq).unwrap()
}

/// `n` values uniform in (-scale, scale), rounded to bf16.
fn rand_bf16(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0) * scale).to_f32())
        .collect()
}

/// Inputs for one case. B is scaled by 1/(s·√r) so that the adapter term is about half
/// the base term for any shape (see the module docs). With `dropout`, drop(x) zeroes a
/// quarter of x and scales the rest by 4/3 (then bf16), as the caller's mask would.
fn inputs(seed: u64, m: usize, w: &[f32], shape: [usize; 2], r: usize, dropout: bool) -> Inputs {
    let [out, inp] = shape;
    let s = 32.0 / r as f32;
    let mut g = rng(seed);
    let x = rand_bf16(&mut g, m * inp, 1.0);
    let xd = if dropout {
        x.iter()
            .map(|&v| {
                let keep = g.random::<f32>() >= 0.25;
                bf16::from_f32(if keep { v * (4.0 / 3.0) } else { 0.0 }).to_f32()
            })
            .collect()
    } else {
        x.clone()
    };
    let a = rand_bf16(&mut g, r * inp, 1.0);
    let b = rand_bf16(&mut g, out * r, 1.0 / (s * (r as f32).sqrt()));
    let dy = rand_bf16(&mut g, m * out, 1.0);
    Inputs {
        m,
        out,
        inp,
        r,
        s,
        x,
        xd,
        w: w.to_vec(),
        a,
        b,
        dy,
    }
}

/// Assert |got − want| <= atol + rtol·|want| everywhere (any NaN or infinity fails);
/// print the PARITY line (atol to 3 digits: it is a multiple of rms(ref)).
fn check(case: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    check_with(case, got, want, atol, rtol, NonFinite::Fail, Some(3));
}

/// bf16 outputs (Y, dX) against the reference: see the module docs.
fn check_out(case: &str, got: &[f32], want: &[f32]) {
    check(case, got, want, 2e-2 * rms(want), 2e-2);
}

/// One-rounding results (the saved factors).
fn check_close(case: &str, got: &[f32], want: &[f32]) {
    check(case, got, want, 1e-2 * rms(want), 1e-2);
}

// ---------------------------------------------------------------- always run

#[test]
fn lora_kernels_are_registered_and_in_the_fatbin() {
    assert_kernels_registered(lora::KERNELS);
}

#[test]
fn fused_limits_return_bad_input() {
    use Nf4Op::{Backward, Forward};
    for r in [16, 32, 64, 80, 128] {
        assert!(lora::check_fused_lora(Forward, [4096, 4096], 8192, r).is_ok());
        assert!(lora::check_fused_lora(Backward, [14336, 4096], 8192, r).is_ok());
    }
    for r in [0, 8, 24, 65] {
        assert!(
            is_bad_input(lora::check_fused_lora(Forward, [4096, 4096], 77, r)),
            "rank {r}"
        );
    }
    // The NF4 GEMM's own limits: K % 64 forward, N and K % 64 backward.
    assert!(lora::check_fused_lora(Forward, [1000, 4096], 77, 16).is_ok());
    assert!(is_bad_input(lora::check_fused_lora(
        Backward,
        [1000, 4096],
        77,
        16
    )));
    assert!(is_bad_input(lora::check_fused_lora(
        Forward,
        [1024, 4096 + 32],
        77,
        16
    )));
    assert!(lora::check_fused_lora(Backward, [1088, 1216], 300, 80).is_ok());
    // Rows beyond the launch grid (65535 blocks of 128).
    assert!(is_bad_input(lora::check_fused_lora(
        Forward,
        [1024, 4096],
        65535 * 128 + 1,
        16
    )));
}

/// The f64 reference against the CPU model's own ops on a small NF4 projection (the
/// products `proj` and `proj_backward` in src/model/llama.rs are made of).
#[test]
fn reference_matches_the_cpu_model_ops() {
    let (m, out, inp, r) = (5, 24, 128, 4);
    let t = nf4_weight(1, [out, inp], true);
    let p = inputs(2, m, &t.dequantize(), [out, inp], r, true);
    let want = reference(&p);
    let s = p.s;

    let w = LinearWeight::Nf4(Arc::new(t));
    let tx = Tensor::from_vec(p.x.clone(), &[m, inp]);
    let txd = Tensor::from_vec(p.xd.clone(), &[m, inp]);
    let ta = Tensor::from_vec(p.a.clone(), &[r, inp]);
    let tb = Tensor::from_vec(p.b.clone(), &[out, r]);
    let tdy = Tensor::from_vec(p.dy.clone(), &[m, out]);

    // The model's own composition (Model::proj / proj_backward without dropout).
    let xa = ops::matmul_t(&txd, &ta).unwrap();
    let mut y = ops::linear(&tx, &w).unwrap();
    ops::matmul_t_acc_(&mut y, &xa, &tb, s).unwrap();
    let dyb = ops::matmul(&tdy, &tb).unwrap();
    let mut dx = ops::linear_backward(&tdy, &w).unwrap();
    ops::matmul_acc_(&mut dx, &dyb, &ta, s).unwrap();
    let mut ga = Tensor::zeros(&[r, inp]);
    let mut gb = Tensor::zeros(&[out, r]);
    ops::add_at_b_(&mut gb, &tdy, &xa, s).unwrap();
    ops::add_at_b_(&mut ga, &dyb, &txd, s).unwrap();

    // f32 (CPU) against f64 sums of at most 128 terms.
    let close =
        |case: &str, got: &[f32], want: &[f32]| check(case, got, want, 1e-5 * rms(want), 1e-5);
    close("cpu xa", xa.cpu(), &want.xa);
    close("cpu y", y.cpu(), &want.y);
    close("cpu dyb", dyb.cpu(), &want.dyb);
    close("cpu dx", dx.cpu(), &want.dx);
    close("cpu grad_a", ga.cpu(), &want.grad_a);
    close("cpu grad_b", gb.cpu(), &want.grad_b);
    assert!(rms(&want.y_adapter) > 0.2 * rms(&want.y));
    assert!(rms(&want.dx_adapter) > 0.2 * rms(&want.dx));
}

// ---------------------------------------------------------------- GPU helpers

fn up(g: &Gpu, v: &[f32]) -> DeviceBuffer<bf16> {
    let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    ok(g.upload(&h))
}

fn down(g: &Gpu, b: &DeviceBuffer<bf16>, n: usize) -> Vec<f32> {
    ok(g.download(b))[..n].iter().map(|x| x.to_f32()).collect()
}

fn scaled(v: &[f32], s: f32) -> Vec<f32> {
    v.iter().map(|&x| x * s).collect()
}

#[derive(Clone, Copy)]
enum Kind {
    Nf4 { dq: bool },
    Dense,
}

/// (kind, m, out, in, rank, dropout in the forward, expected fwd path, expected bwd path)
type Case = (Kind, usize, usize, usize, usize, bool, LoraPath, LoraPath);

/// m = 77 and 300 leave partial 128-row tiles; out = 1088 / in = 1216 leave partial
/// 128-column tiles forward / backward; rank 80 takes two slab passes (64 + 16);
/// out = 1000 is accepted forward only, rank 8 by no fused kernel (both fall back).
fn cases() -> Vec<Case> {
    use Kind::{Dense, Nf4};
    use LoraPath::{Fused, Unfused};
    vec![
        (Nf4 { dq: true }, 77, 1024, 4096, 16, false, Fused, Fused),
        (Nf4 { dq: true }, 77, 1024, 4096, 64, true, Fused, Fused),
        (Nf4 { dq: true }, 1, 1024, 4096, 32, false, Fused, Fused),
        (Nf4 { dq: false }, 300, 1088, 1216, 80, true, Fused, Fused),
        (Nf4 { dq: true }, 77, 1000, 4096, 16, false, Fused, Unfused),
        (Nf4 { dq: true }, 77, 1024, 1024, 8, false, Unfused, Unfused),
        (Dense, 77, 1024, 4096, 16, false, Unfused, Unfused),
        (Dense, 77, 1024, 4096, 64, true, Unfused, Unfused),
        (Dense, 45, 1000, 1000, 8, false, Unfused, Unfused),
    ]
}

/// A case on the device: the base, the adapter, the inputs and the reference.
struct DevCase {
    name: String,
    p: Inputs,
    want: Reference,
    nf4: Option<Nf4Weight>,
    dense: Option<DeviceBuffer<bf16>>,
    a: DeviceBuffer<bf16>,
    b: DeviceBuffer<bf16>,
    x: DeviceBuffer<bf16>,
    xd: Option<DeviceBuffer<bf16>>,
    dy: DeviceBuffer<bf16>,
}

impl DevCase {
    fn new(g: &Gpu, i: usize, c: &Case) -> DevCase {
        let &(kind, m, out, inp, r, dropout, _, _) = c;
        let (w, nf4, dense, label) = match kind {
            Kind::Nf4 { dq } => {
                let t = nf4_weight(100 + i as u64, [out, inp], dq);
                let w = ok(Nf4Weight::upload(g, &t));
                (t.dequantize(), Some(w), None, format!("nf4 dq={dq}"))
            }
            Kind::Dense => {
                let w = rand_bf16(&mut rng(100 + i as u64), out * inp, 0.6);
                let d = up(g, &w);
                (w, None, Some(d), "dense".to_string())
            }
        };
        let p = inputs(200 + i as u64, m, &w, [out, inp], r, dropout);
        let want = reference(&p);
        assert!(
            rms(&want.y_adapter) > 0.2 * rms(&want.y)
                && rms(&want.dx_adapter) > 0.2 * rms(&want.dx),
            "test inputs: the adapter term must be a sizeable part of the output"
        );
        DevCase {
            name: format!("{label} m={m} out={out} in={inp} r={r} drop={dropout}"),
            a: up(g, &p.a),
            b: up(g, &p.b),
            x: up(g, &p.x),
            xd: dropout.then(|| up(g, &p.xd)),
            dy: up(g, &p.dy),
            p,
            want,
            nf4,
            dense,
        }
    }

    fn base(&self) -> LoraBase<'_> {
        match (&self.nf4, &self.dense) {
            (Some(w), _) => LoraBase::Nf4(w),
            (None, Some(w)) => LoraBase::Dense {
                w,
                out: self.p.out,
                inp: self.p.inp,
            },
            (None, None) => unreachable!(),
        }
    }

    fn lora(&self) -> LoraDev<'_> {
        LoraDev {
            a: &self.a,
            b: &self.b,
            rank: self.p.r,
            scale: self.p.s,
        }
    }

    /// Forward: (path, xa_out, y).
    fn forward(&self, g: &Gpu, fused: bool) -> (LoraPath, Vec<f32>, Vec<f32>) {
        let (m, r, out) = (self.p.m, self.p.r, self.p.out);
        let mut xa = ok(g.alloc::<bf16>(m * r));
        let mut y = ok(g.alloc::<bf16>(m * out));
        let path = ok(lora::lora_forward(
            g,
            self.base(),
            &self.x,
            self.xd.as_ref(),
            m,
            self.lora(),
            &mut xa,
            &mut y,
            fused,
        ));
        (path, down(g, &xa, m * r), down(g, &y, m * out))
    }

    /// Input gradient: (path, dyb_out, dx).
    fn backward(&self, g: &Gpu, fused: bool) -> (LoraPath, Vec<f32>, Vec<f32>) {
        let (m, r, inp) = (self.p.m, self.p.r, self.p.inp);
        let mut dyb = ok(g.alloc::<bf16>(m * r));
        let mut dx = ok(g.alloc::<bf16>(m * inp));
        let path = ok(lora::lora_backward_input(
            g,
            self.base(),
            &self.dy,
            m,
            self.lora(),
            &mut dyb,
            &mut dx,
            fused,
        ));
        (path, down(g, &dyb, m * r), down(g, &dx, m * inp))
    }
}

// ---------------------------------------------------------------- GPU

#[test]
#[ignore = "needs a CUDA device"]
fn forward_matches_cpu_and_unfused() {
    let g = gpu();
    for (i, c) in cases().iter().enumerate() {
        let d = DevCase::new(&g, i, c);
        let s = d.p.s;
        let (path, xa, y) = d.forward(&g, true);
        assert_eq!(path, c.6, "{}: forward path", d.name);
        let (upath, uxa, uy) = d.forward(&g, false);
        assert_eq!(upath, LoraPath::Unfused);
        let n = &d.name;
        check_close(&format!("lora fwd xa {n}"), &xa, &scaled(&d.want.xa, s));
        check_out(&format!("lora fwd {path:?} {n}"), &y, &d.want.y);
        check_out(&format!("lora fwd Unfused {n}"), &uy, &d.want.y);
        check_close(
            &format!("lora fwd xa Unfused {n}"),
            &uxa,
            &scaled(&d.want.xa, s),
        );
        if path == LoraPath::Fused {
            check_out(&format!("lora fwd fused_vs_unfused {n}"), &y, &uy);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_input_matches_cpu_and_unfused() {
    let g = gpu();
    for (i, c) in cases().iter().enumerate() {
        let d = DevCase::new(&g, i, c);
        let s = d.p.s;
        let (path, dyb, dx) = d.backward(&g, true);
        assert_eq!(path, c.7, "{}: backward path", d.name);
        let (upath, udyb, udx) = d.backward(&g, false);
        assert_eq!(upath, LoraPath::Unfused);
        let n = &d.name;
        check_close(&format!("lora bwd dyb {n}"), &dyb, &scaled(&d.want.dyb, s));
        check_out(&format!("lora bwd dx {path:?} {n}"), &dx, &d.want.dx);
        check_out(&format!("lora bwd dx Unfused {n}"), &udx, &d.want.dx);
        check_close(
            &format!("lora bwd dyb Unfused {n}"),
            &udyb,
            &scaled(&d.want.dyb, s),
        );
        if path == LoraPath::Fused {
            check_out(&format!("lora bwd fused_vs_unfused {n}"), &dx, &udx);
        }
    }
}

/// The dropout form of the input gradient: dY·W and s·(dY·B)·A apart.
#[test]
#[ignore = "needs a CUDA device"]
fn backward_parts_match_cpu() {
    let g = gpu();
    for (i, c) in cases().iter().enumerate().filter(|(_, c)| c.5) {
        let d = DevCase::new(&g, i, c);
        let (m, r, inp) = (d.p.m, d.p.r, d.p.inp);
        let mut dyb = ok(g.alloc::<bf16>(m * r));
        let mut dxb = ok(g.alloc::<bf16>(m * inp));
        let mut dxa = ok(g.alloc::<bf16>(m * inp));
        ok(lora::lora_backward_input_parts(
            &g,
            d.base(),
            &d.dy,
            m,
            d.lora(),
            &mut dyb,
            &mut dxb,
            &mut dxa,
        ));
        let base_want: Vec<f32> = d
            .want
            .dx
            .iter()
            .zip(&d.want.dx_adapter)
            .map(|(&t, &a)| t - a)
            .collect();
        let n = &d.name;
        check_out(
            &format!("lora bwd parts base {n}"),
            &down(&g, &dxb, m * inp),
            &base_want,
        );
        check_out(
            &format!("lora bwd parts adapter {n}"),
            &down(&g, &dxa, m * inp),
            &d.want.dx_adapter,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn weight_grads_accumulate_and_match_cpu() {
    let g = gpu();
    for (i, c) in cases().iter().enumerate() {
        let d = DevCase::new(&g, i, c);
        let (m, r, out, inp) = (d.p.m, d.p.r, d.p.out, d.p.inp);
        // The saved factors, as the forward and backward write them.
        let mut xa = ok(g.alloc::<bf16>(m * r));
        let mut y = ok(g.alloc::<bf16>(m * out));
        ok(lora::lora_forward(
            &g,
            d.base(),
            &d.x,
            d.xd.as_ref(),
            m,
            d.lora(),
            &mut xa,
            &mut y,
            true,
        ));
        let mut dyb = ok(g.alloc::<bf16>(m * r));
        let mut dx = ok(g.alloc::<bf16>(m * inp));
        ok(lora::lora_backward_input(
            &g,
            d.base(),
            &d.dy,
            m,
            d.lora(),
            &mut dyb,
            &mut dx,
            true,
        ));
        // Non-zero starting gradients: the call must add to them (beta = 1).
        let mut gr = rng(300 + i as u64);
        let (rms_a, rms_b) = (rms(&d.want.grad_a), rms(&d.want.grad_b));
        let ga0: Vec<f32> = (0..r * inp)
            .map(|_| gr.random_range(-1.0f32..1.0) * rms_a)
            .collect();
        let gb0: Vec<f32> = (0..out * r)
            .map(|_| gr.random_range(-1.0f32..1.0) * rms_b)
            .collect();
        let mut ga = ok(g.upload(&ga0));
        let mut gb = ok(g.upload(&gb0));
        let xd = d.xd.as_ref().unwrap_or(&d.x);
        ok(lora::lora_weight_grads(
            &g,
            &d.dy,
            xd,
            &xa,
            &dyb,
            m,
            [out, inp],
            d.lora(),
            &mut ga,
            &mut gb,
        ));
        let add =
            |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(p, q)| p + q).collect() };
        let got_a = ok(g.download(&ga));
        let got_b = ok(g.download(&gb));
        let n = &d.name;
        let tol = |w: &[f32]| 2e-2 * rms(w);
        check(
            &format!("lora grad_a {n}"),
            &got_a,
            &add(&ga0, &d.want.grad_a),
            tol(&d.want.grad_a),
            1e-2,
        );
        check(
            &format!("lora grad_b {n}"),
            &got_b,
            &add(&gb0, &d.want.grad_b),
            tol(&d.want.grad_b),
            1e-2,
        );
    }
}

/// The fused kernel alone with an f32 output (no final bf16 rounding) on the largest
/// rank, and bad inputs rejected before any launch.
#[test]
#[ignore = "needs a CUDA device"]
fn fused_kernel_f32_out_and_bad_inputs() {
    let g = gpu();
    let c: Case = (
        Kind::Nf4 { dq: true },
        130,
        1024,
        4096,
        128,
        false,
        LoraPath::Fused,
        LoraPath::Fused,
    );
    let d = DevCase::new(&g, 42, &c);
    let (m, r, out) = (d.p.m, d.p.r, d.p.out);
    let w = d.nf4.as_ref().unwrap();
    let xa = up(&g, &scaled(&d.want.xa, d.p.s));
    let mut y = ok(g.alloc::<f32>(m * out));
    ok(lora::gemm_fused_lora(
        &g,
        Nf4Op::Forward,
        &d.x,
        m,
        w,
        &xa,
        &d.b,
        r,
        Out::F32(&mut y),
    ));
    check_out(
        &format!("lora gemm_fused_lora f32 {}", d.name),
        &ok(g.download(&y)),
        &d.want.y,
    );

    // Rank 8 is no fused kernel's; short buffers are errors, not launches.
    let res = lora::gemm_fused_lora(
        &g,
        Nf4Op::Forward,
        &d.x,
        m,
        w,
        &xa,
        &d.b,
        8,
        Out::F32(&mut y),
    );
    assert!(is_bad_input(res), "rank 8");
    let short = ok(g.alloc::<bf16>(m * r - 1));
    let res = lora::gemm_fused_lora(
        &g,
        Nf4Op::Forward,
        &d.x,
        m,
        w,
        &short,
        &d.b,
        r,
        Out::F32(&mut y),
    );
    assert!(is_bad_input(res), "short left factor");
    let mut xa_out = ok(g.alloc::<bf16>(m * r));
    let mut y16 = ok(g.alloc::<bf16>(m * out - 1));
    let res = lora::lora_forward(
        &g,
        d.base(),
        &d.x,
        None,
        m,
        d.lora(),
        &mut xa_out,
        &mut y16,
        true,
    );
    assert!(is_bad_input(res), "short output");
    let bad = LoraDev {
        rank: 0,
        ..d.lora()
    };
    let mut y16 = ok(g.alloc::<bf16>(m * out));
    let res = lora::lora_forward(
        &g,
        d.base(),
        &d.x,
        None,
        m,
        bad,
        &mut xa_out,
        &mut y16,
        true,
    );
    assert!(is_bad_input(res), "rank 0");
    ok(g.synchronize());
    // The plain NF4 kernel is untouched by the LoRA entry points.
    let mut base = ok(g.alloc::<bf16>(m * out));
    ok(nf4::gemm_fused(
        &g,
        Nf4Op::Forward,
        &d.x,
        m,
        w,
        Out::Bf16(&mut base),
    ));
    let base_want: Vec<f32> = d
        .want
        .y
        .iter()
        .zip(&d.want.y_adapter)
        .map(|(&t, &a)| t - a)
        .collect();
    check_out(
        "nf4 gemm_fused base only",
        &down(&g, &base, m * out),
        &base_want,
    );
}
