//! GPU-vs-CPU parity for the lm_head log-prob kernels and the DPO kernels
//! (kernels/logprob.cu against `ops::target_logprobs{,_backward}` and
//! `train::loss::dpo_pair`).
//!
//! The GPU tests are `#[ignore = "needs a CUDA device"]` (tools/gpu-check.sh runs them
//! with `--ignored`); each compared output prints a `PARITY` line. Inputs are
//! bf16-rounded and the CPU gets the same values, so the tolerances cover the GPU's own
//! roundings:
//! - Chunked forward: lse comes from bf16 logits, each off by at most 2^-9·|z| (half an
//!   ulp), so lse (a softmax-weighted mean of them) is off by at most 2^-9·max|z|; the
//!   target logit is an f32 dot product. Inputs keep max|z| < 9 (asserted), so logp and
//!   lse get atol 2e-2 (2^-9·9 = 1.8e-2).
//! - Fused forward: logits in f32 accumulators, exp2/log2 in f32: atol 1e-3.
//! - Backward (both): softmax from bf16 logits (relative error up to 2^-9·max|z| ≈ 2%
//!   per term, of both signs), dlogits stored bf16, d_hidden stored bf16: atol
//!   1e-2·max|ref| + rtol 2e-2, and the relative RMS error below 1e-2.
//! - DPO: f64 math on both sides from the same f32 sequence values, outputs f32:
//!   rtol 1e-5 (+ atol 1e-7 for values near 0).
//!
//! The always-run tests check that the kernels are in the fatbin and that the DPO
//! reference used here agrees with finite differences of the loss.

mod common;

use std::sync::Arc;

use half::bf16;
use palign::backend::cuda::logprob::{self as lp, DpoOut, LogprobPath};
use palign::backend::cuda::{DeviceBuffer, Gpu};
use palign::ops::{self, LinearWeight};
use palign::tensor::Tensor;
use palign::train::loss::{dpo_pair, DpoCfg, DpoKind};
use rand::Rng;

use common::{
    assert_kernels_registered, check, f32s, gpu, max_abs, rand_bf16, rel_rms, rng, to_f32,
};

const KERNELS: &[&str] = &[
    "logsoftmax_gather_bf16",
    "logsoftmax_backward_bf16",
    "logprob_fused_fwd_bf16",
    "logprob_fused_combine",
    "seq_logp_sum_f32",
    "dpo_loss_f32",
    "argmax_rows_bf16",
];

// ---------------------------------------------------------------- always run

#[test]
fn fatbin_holds_the_logprob_kernels() {
    assert_kernels_registered(KERNELS);
}

/// The DPO reference: per-sequence values (sums, or means for IPO) in f64, each pair
/// through `dpo_pair`, and the per-token gradient of Σ loss / norm as the trainer's
/// runner broadcasts it.
struct DpoRef {
    seq: Vec<f64>,
    loss: Vec<f64>,
    reward_c: Vec<f64>,
    reward_r: Vec<f64>,
    d_policy: Vec<f64>,
    dlogp: Vec<f64>,
}

fn seq_values(logp: &[f32], offsets: &[u32], mean: bool) -> Vec<f64> {
    offsets
        .windows(2)
        .map(|w| {
            let toks = &logp[w[0] as usize..w[1] as usize];
            let s: f64 = toks.iter().map(|&x| x as f64).sum();
            if mean && !toks.is_empty() {
                s / toks.len() as f64
            } else {
                s
            }
        })
        .collect()
}

/// `policy`/`reference` are the per-sequence values the GPU gets (so both sides start
/// from the same numbers); `offsets` delimit the policy's tokens.
fn dpo_reference(
    cfg: &DpoCfg,
    norm: f64,
    policy: &[f64],
    reference: &[f64],
    offsets: &[u32],
) -> DpoRef {
    let pairs = policy.len() / 2;
    let n_tokens = *offsets.last().unwrap() as usize;
    let mut r = DpoRef {
        seq: policy.to_vec(),
        loss: vec![],
        reward_c: vec![],
        reward_r: vec![],
        d_policy: vec![],
        dlogp: vec![0.0; n_tokens],
    };
    for k in 0..pairs {
        let (pc, pr, rc, rr) = (
            policy[2 * k],
            policy[2 * k + 1],
            reference[2 * k],
            reference[2 * k + 1],
        );
        let pl = dpo_pair(cfg, pc, pr, rc, rr);
        r.loss.push(pl.loss);
        r.reward_c.push(cfg.beta * (pc - rc));
        r.reward_r.push(cfg.beta * (pr - rr));
        for (q, d) in [(2 * k, pl.d_chosen), (2 * k + 1, pl.d_rejected)] {
            r.d_policy.push(d / norm);
            let (a, b) = (offsets[q] as usize, offsets[q + 1] as usize);
            let n = (b - a) as f64;
            let per_token = if cfg.kind == DpoKind::Ipo { d / n } else { d } / norm;
            r.dlogp[a..b].iter_mut().for_each(|x| *x = per_token);
        }
    }
    r
}

fn dpo_cases() -> Vec<DpoCfg> {
    vec![
        DpoCfg {
            beta: 0.1,
            label_smoothing: 0.0,
            kind: DpoKind::Sigmoid,
        },
        DpoCfg {
            beta: 0.5,
            label_smoothing: 0.2,
            kind: DpoKind::Sigmoid,
        },
        DpoCfg {
            beta: 0.3,
            label_smoothing: 0.0,
            kind: DpoKind::Ipo,
        },
    ]
}

/// Token log-probs of `pairs` (chosen, rejected) sequences of 1..=40 tokens each.
fn dpo_batch(seed: u64, pairs: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let mut r = rng(seed);
    let mut offsets = vec![0u32];
    for _ in 0..2 * pairs {
        let len = r.random_range(1..=40u32);
        offsets.push(offsets.last().unwrap() + len);
    }
    let n = *offsets.last().unwrap() as usize;
    let logp: Vec<f32> = (0..n).map(|_| r.random_range(-6.0f32..-0.01)).collect();
    // A reference model's per-token log-probs: near the policy's.
    let ref_logp: Vec<f32> = logp
        .iter()
        .map(|&x| x + r.random_range(-0.3f32..0.3))
        .collect();
    (logp, offsets, ref_logp)
}

#[test]
fn dpo_reference_matches_finite_differences() {
    // d(Σ_k loss_k / norm)/d logp_token by central differences of the whole pipeline
    // (token log-probs -> sequence values -> dpo_pair), against the reference's dlogp.
    let (logp, offsets, ref_logp) = dpo_batch(5, 3);
    let norm = 4.0;
    for cfg in dpo_cases() {
        let mean = cfg.kind == DpoKind::Ipo;
        let reference = seq_values(&ref_logp, &offsets, mean);
        let total = |lp: &[f32]| -> f64 {
            let pol = seq_values(lp, &offsets, mean);
            dpo_reference(&cfg, norm, &pol, &reference, &offsets)
                .loss
                .iter()
                .sum::<f64>()
                / norm
        };
        let r = dpo_reference(
            &cfg,
            norm,
            &seq_values(&logp, &offsets, mean),
            &reference,
            &offsets,
        );
        let h = 1e-2f32; // the step actually taken, up[i] − dn[i], is used below
        for i in (0..logp.len()).step_by(7) {
            let (mut up, mut dn) = (logp.clone(), logp.clone());
            up[i] += h;
            dn[i] -= h;
            let fd = (total(&up) - total(&dn)) / ((up[i] - dn[i]) as f64);
            let tol = 1e-4 * (1.0 + fd.abs());
            assert!(
                (fd - r.dlogp[i]).abs() < tol,
                "{cfg:?} token {i}: fd {fd} vs {}",
                r.dlogp[i]
            );
        }
    }
}

// ---------------------------------------------------------------- helpers

/// One problem: bf16-rounded hidden [rows, h] in [-1, 1], head [v, h] in [-0.25, 0.25]
/// (logits of std ≈ 1.3 at h = 256), targets with 0 and v − 1, dlogp in [-1, 1].
struct Problem {
    rows: usize,
    vocab: usize,
    h: usize,
    hidden_b: Vec<bf16>,
    head_b: Vec<bf16>,
    hidden_f: Vec<f32>,
    head_f: Vec<f32>,
    targets: Vec<u32>,
    dlogp: Vec<f32>,
}

impl Problem {
    fn new(seed: u64, rows: usize, vocab: usize, h: usize) -> Problem {
        let mut r = rng(seed);
        let (hidden_b, hidden_f) = rand_bf16(&mut r, rows * h, 1.0);
        let (head_b, head_f) = rand_bf16(&mut r, vocab * h, 0.25);
        let mut targets: Vec<u32> = (0..rows).map(|_| r.random_range(0..vocab as u32)).collect();
        targets[0] = 0;
        targets[rows - 1] = vocab as u32 - 1;
        targets[rows / 2] = vocab as u32 - 1;
        let dlogp = (0..rows).map(|_| r.random_range(-1.0f32..1.0)).collect();
        Problem {
            rows,
            vocab,
            h,
            hidden_b,
            head_b,
            hidden_f,
            head_f,
            targets,
            dlogp,
        }
    }

    fn tag(&self) -> String {
        format!("T={} V={} H={}", self.rows, self.vocab, self.h)
    }

    fn cpu_hidden(&self) -> Tensor {
        Tensor::from_vec(self.hidden_f.clone(), &[self.rows, self.h])
    }

    fn cpu_head(&self) -> LinearWeight {
        LinearWeight::Dense(Arc::new(Tensor::from_vec(
            self.head_f.clone(),
            &[self.vocab, self.h],
        )))
    }

    /// Naive f64 logits' row log-sum-exp, and max |z| (which sets the chunked tolerance).
    fn lse_f64(&self) -> (Vec<f32>, f32) {
        let mut max_z = 0.0f64;
        let lse = (0..self.rows)
            .map(|i| {
                let x = &self.hidden_f[i * self.h..(i + 1) * self.h];
                let z: Vec<f64> = (0..self.vocab)
                    .map(|j| {
                        let w = &self.head_f[j * self.h..(j + 1) * self.h];
                        x.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
                    })
                    .collect();
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                max_z = z.iter().fold(max_z, |acc, v| acc.max(v.abs()));
                (m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln()) as f32
            })
            .collect();
        (lse, max_z as f32)
    }
}

struct OnDevice {
    hidden: DeviceBuffer<bf16>,
    head: DeviceBuffer<bf16>,
    targets: DeviceBuffer<u32>,
    dlogp: DeviceBuffer<f32>,
}

fn upload(g: &Gpu, p: &Problem) -> OnDevice {
    OnDevice {
        hidden: g.upload(&p.hidden_b).unwrap(),
        head: g.upload(&p.head_b).unwrap(),
        targets: g.upload(&p.targets).unwrap(),
        dlogp: g.upload(&p.dlogp).unwrap(),
    }
}

/// (logp, lse) on the GPU.
fn forward(
    g: &Gpu,
    p: &Problem,
    d: &OnDevice,
    path: LogprobPath,
    chunk: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut logp = g.alloc::<f32>(p.rows).unwrap();
    let mut lse = g.alloc::<f32>(p.rows).unwrap();
    lp::target_logprobs_with(
        g, &d.hidden, p.rows, &d.head, p.vocab, p.h, &d.targets, &mut logp, &mut lse, path, chunk,
    )
    .unwrap();
    (g.download(&logp).unwrap(), g.download(&lse).unwrap())
}

fn backward(
    g: &Gpu,
    p: &Problem,
    d: &OnDevice,
    lse: &[f32],
    path: LogprobPath,
    chunk: usize,
) -> Vec<f32> {
    let lse = g.upload(lse).unwrap();
    let mut dh = g.alloc::<bf16>(p.rows * p.h).unwrap();
    lp::target_logprobs_backward_with(
        g, &d.hidden, p.rows, &d.head, p.vocab, p.h, &d.targets, &lse, &d.dlogp, &mut dh, path,
        chunk,
    )
    .unwrap();
    to_f32(&g.download(&dh).unwrap())
}

fn check_grad(case: &str, got: &[f32], want: &[f32]) {
    check(case, got, want, 1e-2 * max_abs(want), 2e-2);
    let e = rel_rms(got, want);
    println!("PARITY {case}: rel_rms={e:.3e}");
    assert!(e < 1e-2, "{case}: relative RMS error {e}");
}

/// Forward and backward of both paths against the CPU, and against each other.
fn run_problem(g: &Gpu, p: &Problem) {
    let d = upload(g, p);
    let tag = p.tag();
    let want = ops::target_logprobs(&p.cpu_hidden(), &p.cpu_head(), &p.targets)
        .unwrap()
        .0
        .into_vec();
    let (want_lse, max_z) = p.lse_f64();
    assert!(
        max_z < 9.0,
        "{tag}: max |logit| {max_z} voids the chunked tolerance"
    );
    let default_chunk = lp::default_chunk_rows(p.vocab);

    let mut chunked = None;
    for chunk in [16, default_chunk] {
        let (logp, lse) = forward(g, p, &d, LogprobPath::Chunked, chunk);
        check(
            &format!("chunked fwd logp {tag} chunk={chunk}"),
            &logp,
            &want,
            2e-2,
            0.0,
        );
        check(
            &format!("chunked fwd lse {tag} chunk={chunk}"),
            &lse,
            &want_lse,
            2e-2,
            0.0,
        );
        chunked = Some((logp, lse));
    }
    let (c_logp, c_lse) = chunked.unwrap();
    let (f_logp, f_lse) = forward(g, p, &d, LogprobPath::Fused, default_chunk);
    let fused_atol = if p.h.is_multiple_of(8) { 1e-3 } else { 2e-2 }; // else: chunked
    check(
        &format!("fused fwd logp {tag}"),
        &f_logp,
        &want,
        fused_atol,
        0.0,
    );
    check(
        &format!("fused fwd lse {tag}"),
        &f_lse,
        &want_lse,
        fused_atol,
        0.0,
    );
    check(
        &format!("fused vs chunked logp {tag}"),
        &f_logp,
        &c_logp,
        2e-2,
        0.0,
    );

    let no_lse = palign::tensor::Tensor::zeros(&[0]);
    let want_dh = ops::target_logprobs_backward(
        &p.cpu_hidden(),
        &p.cpu_head(),
        &p.targets,
        &no_lse,
        &palign::tensor::Tensor::from_vec(p.dlogp.clone(), &[p.dlogp.len()]),
    )
    .unwrap();
    let want_dh = want_dh.cpu();
    for chunk in [16, default_chunk] {
        let got = backward(g, p, &d, &c_lse, LogprobPath::Chunked, chunk);
        check_grad(
            &format!("chunked bwd d_hidden {tag} chunk={chunk}"),
            &got,
            want_dh,
        );
    }
    for chunk in [16, default_chunk] {
        let got = backward(g, p, &d, &f_lse, LogprobPath::Fused, chunk);
        check_grad(
            &format!("fused bwd d_hidden {tag} chunk={chunk}"),
            &got,
            want_dh,
        );
    }
    // The training forward's variant: logp, lse, and per row ∂logp_i/∂hidden_i; then
    // d_hidden = dlogp_i · that row (scale_rows) against the CPU backward.
    let dlogp_host = g.download(&d.dlogp).unwrap();
    for chunk in [16, default_chunk] {
        let mut logp = g.alloc::<f32>(p.rows).unwrap();
        let mut lse = g.alloc::<f32>(p.rows).unwrap();
        let mut grad = g.alloc::<bf16>(p.rows * p.h).unwrap();
        lp::target_logprobs_and_grad(
            g, &d.hidden, p.rows, &d.head, p.vocab, p.h, &d.targets, &mut logp, &mut lse,
            &mut grad, chunk,
        )
        .unwrap();
        let case = format!("and_grad {tag} chunk={chunk}");
        check(
            &format!("{case} logp"),
            &g.download(&logp).unwrap(),
            &want,
            2e-2,
            0.0,
        );
        let mut dh = g.alloc::<bf16>(p.rows * p.h).unwrap();
        lp::scale_rows(g, &grad, &d.dlogp, p.rows, p.h, &mut dh).unwrap();
        let got = to_f32(&g.download(&dh).unwrap());
        check_grad(&format!("{case} d_hidden"), &got, want_dh);
        // scale_rows alone: exactly bf16(dlogp_i · grad_i).
        let grad_h = to_f32(&g.download(&grad).unwrap());
        let want_scaled: Vec<f32> = grad_h
            .iter()
            .enumerate()
            .map(|(i, &v)| bf16::from_f32(dlogp_host[i / p.h] * v).to_f32())
            .collect();
        check(&format!("{case} scale_rows"), &got, &want_scaled, 0.0, 0.0);
    }
}

// ---------------------------------------------------------------- kernels

#[test]
#[ignore = "needs a CUDA device"]
fn logprobs_match_cpu_vocab_1000() {
    run_problem(&gpu(), &Problem::new(1, 37, 1000, 256));
}

#[test]
#[ignore = "needs a CUDA device"]
fn logprobs_match_cpu_vocab_32000() {
    run_problem(&gpu(), &Problem::new(2, 37, 32000, 256));
}

#[test]
#[ignore = "needs a CUDA device"]
fn logprobs_match_cpu_odd_vocab_and_hidden() {
    // V % 8 != 0: the kernels' scalar paths and the fused vocab tail mask.
    run_problem(&gpu(), &Problem::new(3, 37, 1003, 264));
    // H % 8 != 0: Fused falls back to the chunked forward.
    run_problem(&gpu(), &Problem::new(4, 21, 1000, 100));
}

#[test]
#[ignore = "needs a CUDA device"]
fn logprobs_match_cpu_many_row_tiles() {
    // 17 row tiles of 128: two block groups in the fused kernel's ordering.
    run_problem(&gpu(), &Problem::new(5, 2100, 1000, 256));
}

#[test]
#[ignore = "needs a CUDA device"]
fn target_ids_past_the_vocab_give_nan() {
    let g = gpu();
    let mut p = Problem::new(6, 37, 1000, 256);
    let want = ops::target_logprobs(&p.cpu_hidden(), &p.cpu_head(), &p.targets)
        .unwrap()
        .0
        .into_vec();
    p.targets[5] = 1000;
    p.targets[6] = u32::MAX;
    let d = upload(&g, &p);
    for path in [LogprobPath::Chunked, LogprobPath::Fused] {
        let (logp, _) = forward(&g, &p, &d, path, 16);
        assert!(logp[5].is_nan() && logp[6].is_nan(), "{path:?}");
        let mut want = want.clone();
        want[5] = f32::NAN;
        want[6] = f32::NAN;
        check(
            &format!("{path:?} with bad targets"),
            &logp,
            &want,
            2e-2,
            0.0,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn launchers_reject_short_buffers() {
    let g = gpu();
    let p = Problem::new(7, 8, 64, 32);
    let d = upload(&g, &p);
    let mut logp = g.alloc::<f32>(p.rows).unwrap();
    let mut lse = g.alloc::<f32>(p.rows).unwrap();
    let mut short = g.alloc::<f32>(p.rows - 1).unwrap();
    let is_bad = |r: palign::Result<()>| matches!(r, Err(palign::Error::BadInput(_)));
    for path in [LogprobPath::Chunked, LogprobPath::Fused] {
        // rows beyond the hidden buffer, a short logp, vocab beyond the head.
        assert!(is_bad(lp::target_logprobs(
            &g,
            &d.hidden,
            p.rows + 1,
            &d.head,
            p.vocab,
            p.h,
            &d.targets,
            &mut logp,
            &mut lse,
            path
        )));
        assert!(is_bad(lp::target_logprobs(
            &g, &d.hidden, p.rows, &d.head, p.vocab, p.h, &d.targets, &mut short, &mut lse, path
        )));
        assert!(is_bad(lp::target_logprobs(
            &g,
            &d.hidden,
            p.rows,
            &d.head,
            p.vocab + 1,
            p.h,
            &d.targets,
            &mut logp,
            &mut lse,
            path
        )));
        let mut dh = g.alloc::<bf16>(p.rows * p.h - 1).unwrap();
        assert!(is_bad(lp::target_logprobs_backward(
            &g, &d.hidden, p.rows, &d.head, p.vocab, p.h, &d.targets, &lse, &d.dlogp, &mut dh, path
        )));
    }
    // Fused backward reads lse; Chunked does not.
    let mut dh = g.alloc::<bf16>(p.rows * p.h).unwrap();
    let short_lse = g.alloc::<f32>(1).unwrap();
    assert!(is_bad(lp::target_logprobs_backward(
        &g,
        &d.hidden,
        p.rows,
        &d.head,
        p.vocab,
        p.h,
        &d.targets,
        &short_lse,
        &d.dlogp,
        &mut dh,
        LogprobPath::Fused
    )));
    lp::target_logprobs_backward(
        &g,
        &d.hidden,
        p.rows,
        &d.head,
        p.vocab,
        p.h,
        &d.targets,
        &short_lse,
        &d.dlogp,
        &mut dh,
        LogprobPath::Chunked,
    )
    .unwrap();
    g.synchronize().unwrap();
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn dpo_kernels_match_dpo_pair() {
    let g = gpu();
    let pairs = 37;
    let (logp, offsets, ref_logp) = dpo_batch(9, pairs);
    let n_tokens = logp.len();
    // Two tokens past the last sequence: they must get a zero gradient.
    let mut logp_pad = logp.clone();
    logp_pad.extend([-1.0, -2.0]);
    let d_logp = g.upload(&logp_pad).unwrap();
    let d_ref_logp = g.upload(&ref_logp).unwrap();
    let d_off = g.upload(&offsets).unwrap();
    let norm = 64.0;
    for cfg in dpo_cases() {
        let case = format!(
            "{:?} beta={} ls={}",
            cfg.kind, cfg.beta, cfg.label_smoothing
        );
        let mean = cfg.kind == DpoKind::Ipo;
        let mut pol = g.alloc::<f32>(2 * pairs).unwrap();
        let mut refv = g.alloc::<f32>(2 * pairs).unwrap();
        lp::seq_logp_sums(&g, &d_logp, &d_off, mean, &mut pol).unwrap();
        lp::seq_logp_sums(&g, &d_ref_logp, &d_off, mean, &mut refv).unwrap();
        let pol_h = g.download(&pol).unwrap();
        let ref_h = g.download(&refv).unwrap();
        // Sums of up to 40 values of magnitude < 6, rounded once to f32.
        let want_pol = seq_values(&logp, &offsets, mean);
        let want_ref = seq_values(&ref_logp, &offsets, mean);
        check(
            &format!("seq values {case}"),
            &pol_h,
            &f32s(&want_pol),
            1e-6,
            1e-6,
        );
        check(
            &format!("ref seq values {case}"),
            &ref_h,
            &f32s(&want_ref),
            1e-6,
            1e-6,
        );

        let mut loss = g.alloc::<f32>(pairs).unwrap();
        let mut rwc = g.alloc::<f32>(pairs).unwrap();
        let mut rwr = g.alloc::<f32>(pairs).unwrap();
        let mut dpol = g.alloc::<f32>(2 * pairs).unwrap();
        let mut dlogp = g.alloc::<f32>(n_tokens + 2).unwrap();
        lp::dpo_loss(
            &g,
            &cfg,
            norm,
            &pol,
            &refv,
            &d_off,
            DpoOut {
                loss: &mut loss,
                reward_chosen: &mut rwc,
                reward_rejected: &mut rwr,
                d_policy: &mut dpol,
                dlogp: &mut dlogp,
            },
        )
        .unwrap();
        // The reference starts from the GPU's own f32 sequence values.
        let r = dpo_reference(&cfg, norm, &f64s(&pol_h), &f64s(&ref_h), &offsets);
        assert_eq!(r.seq.len(), 2 * pairs);
        let (at, rt) = (1e-7, 1e-5);
        let mut want_dlogp = f32s(&r.dlogp);
        want_dlogp.extend([0.0, 0.0]);
        for (what, got, want) in [
            ("loss", &loss, f32s(&r.loss)),
            ("reward chosen", &rwc, f32s(&r.reward_c)),
            ("reward rejected", &rwr, f32s(&r.reward_r)),
            ("d_policy", &dpol, f32s(&r.d_policy)),
            ("dlogp", &dlogp, want_dlogp),
        ] {
            check(
                &format!("dpo {what} {case}"),
                &g.download(got).unwrap(),
                &want,
                at,
                rt,
            );
        }
    }
}

/// The trainer's DPO ops (`ops::segment_sums` + `ops::dpo_loss`) on device tensors
/// against the same ops on host tensors: the per-pair numbers that come back and the
/// per-token gradient that stays on the device.
#[test]
#[ignore = "needs a CUDA device"]
fn dpo_ops_on_the_device_match_the_host_ops() {
    let g = gpu();
    let pairs = 23;
    let (logp, offsets, ref_logp) = dpo_batch(13, pairs);
    let counts: Vec<usize> = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    let n = logp.len();
    let host = Tensor::from_vec(logp.clone(), &[n]);
    let dev = Tensor::cuda_f32(g.upload(&logp).unwrap(), &[n]);
    let norm = 16.0;
    for cfg in dpo_cases() {
        let case = format!(
            "{:?} beta={} ls={}",
            cfg.kind, cfg.beta, cfg.label_smoothing
        );
        let mean = cfg.kind == DpoKind::Ipo;
        let refs = Tensor::from_vec(f32s(&seq_values(&ref_logp, &offsets, mean)), &[2 * pairs]);
        let want_pol = ops::segment_sums(&host, &counts, mean).unwrap();
        let got_pol = ops::segment_sums(&dev, &counts, mean).unwrap();
        assert!(got_pol.is_cuda(), "{case}: sequence values left the device");
        let got_pol_h = ops::to_host(&got_pol).unwrap();
        check(
            &format!("ops seq values {case}"),
            &got_pol_h,
            want_pol.cpu(),
            1e-6,
            1e-6,
        );
        // Both sides from the device's sequence values, so only the loss math differs.
        let pol_h = Tensor::from_vec(got_pol_h, &[2 * pairs]);
        let want = ops::dpo_loss(&cfg, norm, &pol_h, &refs, &counts).unwrap();
        let got = ops::dpo_loss(&cfg, norm, &got_pol, &refs, &counts).unwrap();
        assert!(
            got.dlogp.is_cuda(),
            "{case}: the token gradient left the device"
        );
        let (at, rt) = (1e-7, 1e-5);
        check(
            &format!("ops dpo loss {case}"),
            &got.loss,
            &want.loss,
            at,
            rt,
        );
        check(
            &format!("ops dpo reward chosen {case}"),
            &got.reward_chosen,
            &want.reward_chosen,
            at,
            rt,
        );
        check(
            &format!("ops dpo reward rejected {case}"),
            &got.reward_rejected,
            &want.reward_rejected,
            at,
            rt,
        );
        check(
            &format!("ops dpo dlogp {case}"),
            &ops::to_host(&got.dlogp).unwrap(),
            want.dlogp.cpu(),
            at,
            rt,
        );
    }
}

/// Greedy decoding's device argmax picks what the host picks from the same bf16 logits:
/// the lowest index of the maximum, over random rows (bf16 rounding makes ties common)
/// and hand-made ones (all equal, all −inf, the maximum first, last, repeated far apart,
/// NaNs among +inf: the first NaN wins, as torch.argmax), with a vocabulary that is not a
/// multiple of the block and more rows than blocks.
#[test]
#[ignore = "needs a CUDA device"]
fn argmax_rows_matches_the_host_pick() {
    let g = gpu();
    // 70000 rows: more than the 65535 blocks, so blocks loop over a second row.
    for (rows, cols) in [(3usize, 7usize), (37, 32000), (300, 1003), (70000, 7)] {
        let mut r = rng(rows as u64);
        let (mut b, _) = rand_bf16(&mut r, rows * cols, 4.0);
        let set = |b: &mut [bf16], row: usize, f: &dyn Fn(usize) -> f32| {
            for j in 0..cols {
                b[row * cols + j] = bf16::from_f32(f(j));
            }
        };
        set(&mut b, 0, &|_| 1.5);
        set(&mut b, 1, &|_| f32::NEG_INFINITY);
        set(&mut b, 2, &|j| if j == cols - 1 { 9.0 } else { 0.0 });
        if rows > 5 {
            set(&mut b, 3, &|j| if j == 0 { 9.0 } else { -1.0 });
            set(&mut b, 4, &|j| {
                if j == 5 || j == cols - 2 {
                    9.0
                } else {
                    1.0
                }
            });
            set(&mut b, 5, &|j| {
                if j == 1 || j == 4 {
                    f32::NAN
                } else {
                    f32::INFINITY
                }
            });
        }
        let want = ops::argmax_rows(&Tensor::from_vec(to_f32(&b), &[rows, cols])).unwrap();
        let x = Tensor::cuda_bf16(g.upload(&b).unwrap(), &[rows, cols]);
        let got = ops::argmax_rows(&x).unwrap();
        let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        println!("PARITY argmax_rows {rows}x{cols}: {bad} of {rows} rows differ");
        assert_eq!(got, want, "{rows}x{cols}");
    }
}
