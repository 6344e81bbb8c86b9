//! GPU-vs-CPU parity for the small kernels (kernels/*.cu against backend::cpu).
//!
//! The GPU tests are `#[ignore = "needs a CUDA device"]`: CI reports them as ignored,
//! and tools/gpu-check.sh runs them on a GPU machine with `--ignored`. Each prints one
//! `PARITY <case>: max_abs_err=.. worst=..` line per compared output (worst is the
//! largest err / (atol + rtol·|ref|); a case passes when worst <= 1).
//!
//! Inputs are random with fixed seeds, with odd sizes to hit the kernels' scalar tails.
//! bf16 inputs are rounded first and the CPU reference gets the same rounded values,
//! so the tolerances only cover the kernels' own roundings (one bf16 rounding of the
//! output is a relative 2^-9 ≈ 2e-3; HF's extra intermediate roundings double that).
//!
//! The tests that always run check what can be checked here: the embedded fatbin holds
//! every kernel, and `available()` reports a missing driver as an error.

mod common;

use common::{check_with, gpu, rand_bf16, rng, to_f32, NonFinite};
use half::bf16;
use palign::backend::cpu::{ops as cpu, optim};
use palign::backend::cuda::{self, blas, ops, DeviceBuffer};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------- always run

#[test]
fn fatbin_holds_every_kernel_of_the_sources() {
    // Every extern "C" __global__ in kernels/*.cu must be in KERNEL_NAMES, so that
    // Gpu::get looks it up (and fails early when it is missing from the module).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut in_sources = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cu") {
            let text = std::fs::read_to_string(&path).unwrap();
            for part in text.split("extern \"C\" __global__ void ").skip(1) {
                let part = part
                    .strip_prefix("__launch_bounds__")
                    .map_or(part, |r| r.split_once(") ").map_or(r, |(_, name)| name));
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                in_sources.push(name);
            }
        }
    }
    in_sources.sort();
    let mut listed: Vec<String> = cuda::KERNEL_NAMES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(
        in_sources, listed,
        "KERNEL_NAMES vs the kernels in kernels/*.cu"
    );

    if cuda::kernels_compiled() {
        assert!(
            !cuda::FATBIN.is_empty(),
            "kernels compiled but the fatbin is empty"
        );
        for name in cuda::KERNEL_NAMES {
            let found = cuda::FATBIN
                .windows(name.len())
                .any(|w| w == name.as_bytes());
            assert!(
                found,
                "kernel {name} not in the embedded fatbin ({})",
                cuda::TARGETS
            );
        }
        for t in cuda::TARGETS.split_whitespace() {
            assert!(
                t.starts_with("sm_") || t.starts_with("compute_"),
                "target {t}"
            );
        }
    } else {
        assert!(cuda::FATBIN.is_empty());
        assert!(!cuda::BUILD_NOTE.is_empty(), "a CPU-only build says why");
        eprintln!("kernels not compiled: {}", cuda::BUILD_NOTE);
    }
}

#[test]
fn available_is_an_error_not_a_panic_without_a_driver() {
    // SAFETY: only tries to dlopen libcuda.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    match cuda::available() {
        Ok(()) => assert!(driver && cuda::kernels_compiled()),
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, palign::Error::Cuda(_)), "{msg}");
            if !driver {
                assert!(msg.contains("no CUDA driver found"), "{msg}");
            }
            // A second call must give the same answer, not panic.
            assert!(cuda::available().is_err());
        }
    }
}

// ---------------------------------------------------------------- helpers

fn rand_f32(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// Assert |got − want| <= atol + rtol·|want| everywhere (equal values, infinities
/// included, pass; any NaN fails); print the PARITY line.
fn check(case: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    check_with(case, got, want, atol, rtol, NonFinite::EqualPasses, None);
}

// ---------------------------------------------------------------- kernels

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_gather_is_exact() {
    let g = gpu();
    let mut r = rng(1);
    for (vocab, hidden, tokens) in [(1000, 4096, 67), (301, 131, 45)] {
        let (tb, tf) = rand_bf16(&mut r, vocab * hidden, 1.0);
        let mut ids: Vec<u32> = (0..tokens)
            .map(|_| r.random_range(0..vocab as u32))
            .collect();
        ids[0] = vocab as u32 - 1;
        let mut want = vec![0.0f32; tokens * hidden];
        cpu::embedding(&tf, hidden, &ids, &mut want);

        let table = g.upload(&tb).unwrap();
        let dids = g.upload(&ids).unwrap();
        let mut out = g.alloc::<bf16>(tokens * hidden).unwrap();
        ops::embedding_forward(&g, &table, hidden, &dids, &mut out).unwrap();
        check(
            &format!("embedding {vocab}x{hidden}"),
            &to_f32(&g.download(&out).unwrap()),
            &want,
            0.0,
            0.0,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn rmsnorm_forward_matches_cpu() {
    let g = gpu();
    let mut r = rng(2);
    for (rows, cols) in [(37, 4096), (5, 1000), (9, 129)] {
        let (xb, xf) = rand_bf16(&mut r, rows * cols, 2.0);
        let wf: Vec<f32> = rand_f32(&mut r, cols, 0.5, 1.5);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let wf = to_f32(&wb);
        let eps = 1e-5;
        let (mut want, mut want_rstd) = (vec![0.0; rows * cols], vec![0.0; rows]);
        cpu::rmsnorm_forward(&xf, &wf, eps, &mut want, &mut want_rstd);

        let (x, w) = (g.upload(&xb).unwrap(), g.upload(&wb).unwrap());
        let mut y = g.alloc::<bf16>(rows * cols).unwrap();
        let mut rstd = g.alloc::<f32>(rows).unwrap();
        ops::rmsnorm_forward(&g, &x, &w, eps, &mut y, Some(&mut rstd)).unwrap();
        // Two bf16 roundings (xhat, then w·xhat): relative 2·2^-9.
        check(
            &format!("rmsnorm fwd y {rows}x{cols}"),
            &to_f32(&g.download(&y).unwrap()),
            &want,
            1e-3,
            8e-3,
        );
        check(
            &format!("rmsnorm fwd rstd {rows}x{cols}"),
            &g.download(&rstd).unwrap(),
            &want_rstd,
            0.0,
            1e-5,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn rmsnorm_backward_matches_cpu() {
    let g = gpu();
    let mut r = rng(3);
    for (rows, cols) in [(37, 4096), (9, 129)] {
        let (xb, xf) = rand_bf16(&mut r, rows * cols, 2.0);
        let (dyb, dyf) = rand_bf16(&mut r, rows * cols, 1.0);
        let (wb, wf) = rand_bf16(&mut r, cols, 1.5);
        let (dx0b, dx0f) = rand_bf16(&mut r, rows * cols, 1.0);
        let eps = 1e-6;
        let (mut y, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows]);
        cpu::rmsnorm_forward(&xf, &wf, eps, &mut y, &mut rstd);
        let mut want = vec![0.0; rows * cols];
        cpu::rmsnorm_backward(&dyf, &xf, &wf, &rstd, &mut want);

        let (x, w, dy) = (
            g.upload(&xb).unwrap(),
            g.upload(&wb).unwrap(),
            g.upload(&dyb).unwrap(),
        );
        let drstd = g.upload(&rstd).unwrap();
        let mut dx = g.alloc::<bf16>(rows * cols).unwrap();
        ops::rmsnorm_backward(&g, &dy, &x, &w, &drstd, &mut dx, false).unwrap();
        check(
            &format!("rmsnorm bwd dx {rows}x{cols}"),
            &to_f32(&g.download(&dx).unwrap()),
            &want,
            1e-3,
            8e-3,
        );

        // accumulate: dx = dx0 + result (one more bf16 rounding of the sum).
        let mut acc = g.upload(&dx0b).unwrap();
        ops::rmsnorm_backward(&g, &dy, &x, &w, &drstd, &mut acc, true).unwrap();
        let want_acc: Vec<f32> = want.iter().zip(&dx0f).map(|(a, b)| a + b).collect();
        check(
            &format!("rmsnorm bwd dx+= {rows}x{cols}"),
            &to_f32(&g.download(&acc).unwrap()),
            &want_acc,
            2e-3,
            8e-3,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn rope_forward_and_backward_match_cpu() {
    let g = gpu();
    let mut r = rng(4);
    // (tokens, q heads, kv heads, head_dim, theta): LLaMA-7B-like GQA, Mistral theta, odd.
    for (tokens, hq, hkv, d, theta) in [
        (67, 32, 8, 128, 10000.0),
        (13, 5, 1, 64, 1e6),
        (7, 3, 3, 6, 500.0),
    ] {
        let max_pos = 4096;
        let positions: Vec<u32> = (0..tokens)
            .map(|_| r.random_range(0..max_pos as u32))
            .collect();
        let (cos, sin) = cpu::rope_tables(d, theta, max_pos);
        let tables = ops::RopeTables::new(&g, d, theta, max_pos).unwrap();
        let dpos = g.upload(&positions).unwrap();
        let (qb, qf) = rand_bf16(&mut r, tokens * hq * d, 2.0);
        let (kb, kf) = rand_bf16(&mut r, tokens * hkv * d, 2.0);
        for backward in [false, true] {
            let (mut wq, mut wk) = (qf.clone(), kf.clone());
            if backward {
                cpu::rope_backward(&mut wq, hq, d, &positions, &cos, &sin);
                cpu::rope_backward(&mut wk, hkv, d, &positions, &cos, &sin);
            } else {
                cpu::rope_forward(&mut wq, hq, d, &positions, &cos, &sin);
                cpu::rope_forward(&mut wk, hkv, d, &positions, &cos, &sin);
            }
            let (mut q, mut k) = (g.upload(&qb).unwrap(), g.upload(&kb).unwrap());
            let args = ops::RopeArgs {
                q: &mut q,
                k: &mut k,
                n_q_heads: hq,
                n_kv_heads: hkv,
                positions: &dpos,
            };
            if backward {
                ops::rope_backward(&g, args, &tables).unwrap();
            } else {
                ops::rope_forward(&g, args, &tables).unwrap();
            }
            let dir = if backward { "bwd" } else { "fwd" };
            let case = format!("rope {dir} t{tokens} h{hq}/{hkv} d{d}");
            // One rounding of a sum of two products of |x| <= 2: atol covers cancellation.
            check(
                &format!("{case} q"),
                &to_f32(&g.download(&q).unwrap()),
                &wq,
                4e-3,
                8e-3,
            );
            check(
                &format!("{case} k"),
                &to_f32(&g.download(&k).unwrap()),
                &wk,
                4e-3,
                8e-3,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn swiglu_forward_and_backward_match_cpu() {
    let g = gpu();
    let mut r = rng(5);
    for n in [4096 * 11, 1_000_003, 5] {
        let (gb, gf) = rand_bf16(&mut r, n, 6.0);
        let (ub, uf) = rand_bf16(&mut r, n, 2.0);
        let (db, df) = rand_bf16(&mut r, n, 1.0);
        let mut want = vec![0.0; n];
        cpu::swiglu_forward(&gf, &uf, &mut want);
        let (mut want_dg, mut want_du) = (vec![0.0; n], vec![0.0; n]);
        cpu::swiglu_backward(&df, &gf, &uf, &mut want_dg, &mut want_du);

        let (gate, up, dout) = (
            g.upload(&gb).unwrap(),
            g.upload(&ub).unwrap(),
            g.upload(&db).unwrap(),
        );
        let mut out = g.alloc::<bf16>(n).unwrap();
        ops::swiglu_forward(&g, &gate, &up, &mut out).unwrap();
        let (mut dg, mut du) = (g.alloc::<bf16>(n).unwrap(), g.alloc::<bf16>(n).unwrap());
        ops::swiglu_backward(&g, &dout, &gate, &up, &mut dg, &mut du).unwrap();
        // HF order rounds twice (silu, then the product) where the CPU reference rounds
        // never: 2·2^-9 relative, plus atol for results near zero.
        check(
            &format!("swiglu fwd n{n}"),
            &to_f32(&g.download(&out).unwrap()),
            &want,
            1e-3,
            8e-3,
        );
        check(
            &format!("swiglu bwd dup n{n}"),
            &to_f32(&g.download(&du).unwrap()),
            &want_du,
            1e-3,
            8e-3,
        );
        check(
            &format!("swiglu bwd dgate n{n}"),
            &to_f32(&g.download(&dg).unwrap()),
            &want_dg,
            1e-3,
            8e-3,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn casts_round_like_half() {
    let g = gpu();
    let mut r = rng(6);
    let mut f = rand_f32(&mut r, 100_001, -1e4, 1e4);
    // Ties, tiny, huge, signed zero, infinities: RNE must agree with half::bf16::from_f32.
    f.extend([
        f32::from_bits(0x3f80_8000), // 1 + 2^-8: a tie, rounds to even (1.0)
        f32::from_bits(0x3f81_8000), // tie that rounds up
        1e-40,
        -1e-45,
        3.3e38,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ]);
    let want: Vec<bf16> = f.iter().map(|&v| bf16::from_f32(v)).collect();
    let src = g.upload(&f).unwrap();
    let mut out = g.alloc::<bf16>(f.len()).unwrap();
    ops::cast_f32_to_bf16(&g, &src, &mut out).unwrap();
    let got = g.download(&out).unwrap();
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&got),
        bits(&want),
        "f32 -> bf16 must match half's RNE bit for bit"
    );
    println!(
        "PARITY cast f32->bf16 n{}: max_abs_err=0 (bitwise)",
        f.len()
    );

    let mut back = g.alloc::<f32>(f.len()).unwrap();
    ops::cast_bf16_to_f32(&g, &out, &mut back).unwrap();
    let back = g.download(&back).unwrap();
    let want_back: Vec<u32> = want.iter().map(|x| x.to_f32().to_bits()).collect();
    assert_eq!(
        back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want_back
    );
    println!(
        "PARITY cast bf16->f32 n{}: max_abs_err=0 (bitwise)",
        f.len()
    );

    // NaN stays NaN.
    let nan = g.upload(&[f32::NAN, 1.0, 2.0]).unwrap();
    let mut nb = g.alloc::<bf16>(3).unwrap();
    ops::cast_f32_to_bf16(&g, &nan, &mut nb).unwrap();
    assert!(g.download(&nb).unwrap()[0].is_nan());
}

/// Sizes of a few adapter-like tensors: LoRA A/B shapes and odd leftovers.
const ADAPTER_SIZES: [usize; 6] = [16 * 4096, 4096 * 16 + 3, 1, 777, 40_000, 16384];

fn rand_tensors(r: &mut ChaCha8Rng, lo: f32, hi: f32) -> Vec<Vec<f32>> {
    ADAPTER_SIZES
        .iter()
        .map(|&n| rand_f32(r, n, lo, hi))
        .collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn adamw_matches_cpu_over_steps() {
    let g = gpu();
    let mut r = rng(7);
    let mut p = rand_tensors(&mut r, -1.0, 1.0);
    let (mut m, mut v) = (
        rand_tensors(&mut r, -0.1, 0.1),
        rand_tensors(&mut r, 0.0, 0.01),
    );
    let mut dp: Vec<DeviceBuffer<f32>> = p.iter().map(|t| g.upload(t).unwrap()).collect();
    let mut dm: Vec<DeviceBuffer<f32>> = m.iter().map(|t| g.upload(t).unwrap()).collect();
    let mut dv: Vec<DeviceBuffer<f32>> = v.iter().map(|t| g.upload(t).unwrap()).collect();
    let mut adamw = ops::FusedAdamW::new();
    let (lr, b1, b2, eps, wd) = (2e-4, 0.9, 0.999, 1e-8, 0.01);
    for step in 1..=3u64 {
        let grads = rand_tensors(&mut r, -0.5, 0.5);
        for i in 0..p.len() {
            optim::adamw_step(
                &mut p[i], &grads[i], &mut m[i], &mut v[i], step, lr, b1, b2, eps, wd,
            )
            .unwrap();
        }
        let dg: Vec<DeviceBuffer<f32>> = grads.iter().map(|t| g.upload(t).unwrap()).collect();
        let s = optim::AdamWScalars::new(step, lr, b1, b2, eps, wd).unwrap();
        let mut ts: Vec<ops::AdamWTensor> = dp
            .iter_mut()
            .zip(&dg)
            .zip(dm.iter_mut().zip(dv.iter_mut()))
            .map(|((param, grad), (m, v))| ops::AdamWTensor { param, grad, m, v })
            .collect();
        adamw.step(&g, &mut ts, &s, None).unwrap();
    }
    // Same operations in the same order without FMA contraction: equal up to ulps.
    let flat = |v: &[Vec<f32>]| v.concat();
    let down = |v: &[DeviceBuffer<f32>]| {
        v.iter()
            .flat_map(|b| g.download(b).unwrap())
            .collect::<Vec<_>>()
    };
    check("adamw 3 steps param", &down(&dp), &flat(&p), 0.0, 1e-6);
    check("adamw 3 steps m", &down(&dm), &flat(&m), 0.0, 1e-6);
    check("adamw 3 steps v", &down(&dv), &flat(&v), 0.0, 1e-6);
}

#[test]
#[ignore = "needs a CUDA device"]
fn grad_norm_and_clip_match_cpu() {
    let g = gpu();
    let mut r = rng(8);
    let grads = rand_tensors(&mut r, -0.05, 0.05);
    let mut gn = ops::GradNorm::new(&g).unwrap();
    for (max_norm, label) in [(1.0f32, "clipping"), (1e6, "no clip")] {
        let mut want = grads.clone();
        let mut refs: Vec<&mut [f32]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
        let want_total = optim::clip_grad_norm(&mut refs, max_norm);

        let mut dg: Vec<DeviceBuffer<f32>> = grads.iter().map(|t| g.upload(t).unwrap()).collect();
        let mut drefs: Vec<&mut DeviceBuffer<f32>> = dg.iter_mut().collect();
        gn.compute(&g, &mut drefs, max_norm, true).unwrap();
        let (total, coef) = gn.read(&g).unwrap();
        check(
            &format!("grad norm total ({label})"),
            &[total],
            &[want_total],
            0.0,
            1e-5,
        );
        let want_coef = (max_norm / (want_total + 1e-6)).min(1.0);
        check(
            &format!("grad clip coef ({label})"),
            &[coef],
            &[want_coef],
            0.0,
            1e-5,
        );
        let got: Vec<f32> = dg.iter().flat_map(|b| g.download(b).unwrap()).collect();
        check(
            &format!("grad clip grads ({label})"),
            &got,
            &want.concat(),
            0.0,
            1e-5,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn adamw_with_device_clip_matches_clip_then_step() {
    let g = gpu();
    let mut r = rng(9);
    let mut p = rand_tensors(&mut r, -1.0, 1.0);
    let (mut m, mut v) = (
        rand_tensors(&mut r, -0.1, 0.1),
        rand_tensors(&mut r, 0.0, 0.01),
    );
    let mut grads = rand_tensors(&mut r, -0.05, 0.05);
    let mut dp: Vec<DeviceBuffer<f32>> = p.iter().map(|t| g.upload(t).unwrap()).collect();
    let mut dm: Vec<DeviceBuffer<f32>> = m.iter().map(|t| g.upload(t).unwrap()).collect();
    let mut dv: Vec<DeviceBuffer<f32>> = v.iter().map(|t| g.upload(t).unwrap()).collect();
    let mut dg: Vec<DeviceBuffer<f32>> = grads.iter().map(|t| g.upload(t).unwrap()).collect();
    let (lr, b1, b2, eps, wd) = (1e-3, 0.9, 0.95, 1e-6, 0.1);

    let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(|v| v.as_mut_slice()).collect();
    optim::clip_grad_norm(&mut refs, 0.5);
    for i in 0..p.len() {
        optim::adamw_step(
            &mut p[i], &grads[i], &mut m[i], &mut v[i], 1, lr, b1, b2, eps, wd,
        )
        .unwrap();
    }

    let mut gn = ops::GradNorm::new(&g).unwrap();
    let mut drefs: Vec<&mut DeviceBuffer<f32>> = dg.iter_mut().collect();
    gn.compute(&g, &mut drefs, 0.5, false).unwrap();
    let s = optim::AdamWScalars::new(1, lr, b1, b2, eps, wd).unwrap();
    let mut ts: Vec<ops::AdamWTensor> = dp
        .iter_mut()
        .zip(&dg)
        .zip(dm.iter_mut().zip(dv.iter_mut()))
        .map(|((param, grad), (m, v))| ops::AdamWTensor { param, grad, m, v })
        .collect();
    ops::FusedAdamW::new()
        .step(&g, &mut ts, &s, Some(&gn))
        .unwrap();
    let down = |v: &[DeviceBuffer<f32>]| {
        v.iter()
            .flat_map(|b| g.download(b).unwrap())
            .collect::<Vec<_>>()
    };
    // The clip coefficient differs in its last bits (f32 partial sums vs f64 on the CPU).
    check("adamw+clip param", &down(&dp), &p.concat(), 1e-7, 1e-5);
    check("adamw+clip m", &down(&dm), &m.concat(), 1e-9, 1e-5);
    check("adamw+clip v", &down(&dv), &v.concat(), 1e-12, 1e-5);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_bf16_matches_f64_reference() {
    let g = gpu();
    let mut r = rng(10);
    let (m, n, k) = (77, 129, 200);
    for (trans_a, trans_b) in [(false, true), (false, false), (true, false), (true, true)] {
        let (ab, af) = rand_bf16(&mut r, m * k, 1.0);
        let (bb, bf) = rand_bf16(&mut r, k * n, 1.0);
        let (cb, cf) = rand_bf16(&mut r, m * n, 1.0);
        let (alpha, beta) = (0.75f32, 0.5f32);
        let prod = common::gemm_ref_f64(&af, &bf, m, n, k, trans_a, trans_b);
        let want: Vec<f32> = prod
            .iter()
            .zip(&cf)
            .map(|(&dot, &c)| (alpha as f64 * dot + beta as f64 * c as f64) as f32)
            .collect();
        let (a, b) = (g.upload(&ab).unwrap(), g.upload(&bb).unwrap());
        let mut c = g.upload(&cb).unwrap();
        let spec = blas::Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha,
            beta,
        };
        blas::gemm_bf16(&g, spec, &a, &b, &mut c).unwrap();
        // f32 accumulation is exact enough; the output is one bf16 rounding of values
        // up to ~15 in size, hence atol at 2^-9 of that scale.
        check(
            &format!("gemm bf16 {m}x{n}x{k} ta={trans_a} tb={trans_b}"),
            &to_f32(&g.download(&c).unwrap()),
            &want,
            3e-2,
            8e-3,
        );
    }
    // The nn.Linear shortcut: Y = X·Wᵀ.
    let (xb, xf) = rand_bf16(&mut r, 3 * 5, 1.0);
    let (wb, wf) = rand_bf16(&mut r, 4 * 5, 1.0);
    let mut want = vec![0.0; 3 * 4];
    cpu::linear(&xf, 3, &wf, 4, &mut want);
    let (x, w) = (g.upload(&xb).unwrap(), g.upload(&wb).unwrap());
    let mut y = g.alloc::<bf16>(12).unwrap();
    blas::gemm_bf16(&g, blas::Gemm::linear(3, 4, 5), &x, &w, &mut y).unwrap();
    check(
        "gemm linear 3x4x5",
        &to_f32(&g.download(&y).unwrap()),
        &want,
        1e-2,
        8e-3,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn no_device_allocation_after_warm_up() {
    let g = gpu();
    let mut r = rng(11);
    let (rows, cols) = (64, 512);
    let (xb, _) = rand_bf16(&mut r, rows * cols, 1.0);
    let (wb, _) = rand_bf16(&mut r, cols, 1.0);
    let x = g.upload(&xb).unwrap();
    let w = g.upload(&wb).unwrap();
    let step = || {
        let mut y = g.alloc::<bf16>(rows * cols).unwrap();
        let mut rstd = g.alloc::<f32>(rows).unwrap();
        let mut f = g.alloc::<f32>(rows * cols).unwrap();
        ops::rmsnorm_forward(&g, &x, &w, 1e-5, &mut y, Some(&mut rstd)).unwrap();
        ops::cast_bf16_to_f32(&g, &y, &mut f).unwrap();
    };
    step();
    g.synchronize().unwrap();
    let warm = g.pool_stats();
    for _ in 0..5 {
        step();
    }
    g.synchronize().unwrap();
    let after = g.pool_stats();
    println!(
        "PARITY allocator: device_allocs warm={} after={}",
        warm.device_allocs, after.device_allocs
    );
    assert_eq!(after.device_allocs, warm.device_allocs);
    assert!(after.reuses >= warm.reuses + 15);
}

#[test]
#[ignore = "needs a CUDA device"]
fn timer_measures_kernel_time() {
    let g = gpu();
    let n = 1 << 24;
    let src = g.zeros::<f32>(n).unwrap();
    let mut dst = g.alloc::<bf16>(n).unwrap();
    let t = g.timer().unwrap();
    for _ in 0..10 {
        ops::cast_f32_to_bf16(&g, &src, &mut dst).unwrap();
    }
    let ms = t.elapsed_ms(&g).unwrap();
    println!(
        "PARITY timer: 10 casts of {n} took {ms:.3} ms on {}",
        g.name()
    );
    assert!(ms > 0.0 && ms.is_finite());
}
