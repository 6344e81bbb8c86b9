//! lm_head log-probs (criterion; `cargo bench --bench logprob`): time and extra device
//! memory of `target_logprobs` (forward) and forward + `target_logprobs_backward`, for
//! the fused and chunked paths against the unfused baseline (cuBLAS writes the full
//! `[T, V]` bf16 logits, the log-softmax kernel runs on all rows at once; its backward
//! turns those logits into dlogits in place with the saved lse and multiplies by the
//! head, so it does not recompute them). Shape of issue 9: T = 8192 tokens (batch 16 ×
//! 512), V = 32000, H = 4096.
//!
//! Time is GPU time between CUDA events around the launches. Extra memory is the pool's
//! peak in-use bytes during one call minus what was in use before (inputs, outputs and
//! cuBLAS's workspace), with the peak restarted before the call
//! (`common::peak_extra_bytes`). Sizes are pool buckets (≤ 12.5% over the requested
//! bytes).
//!
//! "ingrad" is the training forward that also writes each row's log-prob gradient
//! (`target_logprobs_and_grad`), so its backward is a row scale: fwd+bwd costs two
//! logits-sized GEMMs, like the unfused path, instead of the chunked path's three.
//!
//! The summary prints one `BENCH logprob <path> <pass>` line per case and
//! `RATIO logprob_fused_vs_unfused` / `RATIO logprob_chunked_vs_unfused` lines (time:
//! unfused ms ÷ ms, memory: unfused extra ÷ extra; the targets are ≥ 1.5× and
//! ≥ 10×). Without a CUDA device it prints a skip line and exits 0.

#[path = "common/mod.rs"]
mod common;

use std::cell::RefCell;

use common::{bench_gpu, filled_bf16, gpu_ms, ok, Launch};
use half::bf16;
use palign::backend::cuda::blas::{self, Gemm};
use palign::backend::cuda::logprob::{self as lp, LogprobPath};
use palign::backend::cuda::{DeviceBuffer, Gpu};

const T: usize = 8192;
const V: usize = 32000;
const H: usize = 4096;

struct Inputs {
    hidden: DeviceBuffer<bf16>,
    head: DeviceBuffer<bf16>,
    targets: DeviceBuffer<u32>,
    dlogp: DeviceBuffer<f32>,
}

struct Outputs {
    logp: DeviceBuffer<f32>,
    lse: DeviceBuffer<f32>,
    d_hidden: DeviceBuffer<bf16>,
    /// `∂logp_i/∂hidden_i` of the "ingrad" path (what a training forward saves instead
    /// of the hidden rows, so it is an output here, not extra memory).
    grad: DeviceBuffer<bf16>,
}

/// The training forward that also writes each row's log-prob gradient, then the
/// backward as a row scale (`target_logprobs_and_grad` + `scale_rows`).
fn ingrad(g: &Gpu, x: &Inputs, o: &mut Outputs) {
    ok(lp::target_logprobs_and_grad(
        g,
        &x.hidden,
        T,
        &x.head,
        V,
        H,
        &x.targets,
        &mut o.logp,
        &mut o.lse,
        &mut o.grad,
        lp::default_chunk_rows(V),
    ));
    ok(lp::scale_rows(g, &o.grad, &x.dlogp, T, H, &mut o.d_hidden));
}

fn forward(g: &Gpu, x: &Inputs, o: &mut Outputs, path: LogprobPath) {
    ok(lp::target_logprobs(
        g,
        &x.hidden,
        T,
        &x.head,
        V,
        H,
        &x.targets,
        &mut o.logp,
        &mut o.lse,
        path,
    ));
}

fn backward(g: &Gpu, x: &Inputs, o: &mut Outputs, path: LogprobPath) {
    ok(lp::target_logprobs_backward(
        g,
        &x.hidden,
        T,
        &x.head,
        V,
        H,
        &x.targets,
        &o.lse,
        &x.dlogp,
        &mut o.d_hidden,
        path,
    ));
}

/// The baseline: full logits, log-softmax over all rows; with `bwd`, dlogits in place
/// from the saved lse and one GEMM into d_hidden.
fn unfused(g: &Gpu, x: &Inputs, o: &mut Outputs, bwd: bool) {
    let mut logits = ok(g.alloc::<bf16>(T * V));
    ok(blas::gemm_bf16(
        g,
        Gemm::linear(T, V, H),
        &x.hidden,
        &x.head,
        &mut logits,
    ));
    ok(lp::logsoftmax_gather(
        g,
        &logits,
        T,
        V,
        H,
        &x.hidden,
        &x.head,
        &x.targets,
        &mut o.logp,
        &mut o.lse,
    ));
    if bwd {
        ok(lp::logsoftmax_backward(
            g,
            &mut logits,
            T,
            V,
            &x.targets,
            &x.dlogp,
            Some(&o.lse),
        ));
        let back = Gemm {
            m: T,
            n: H,
            k: V,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        };
        ok(blas::gemm_bf16(g, back, &logits, &x.head, &mut o.d_hidden));
    }
}

struct Case<'a> {
    path: &'static str,
    pass: &'static str,
    run: Launch<'a>,
    /// Extra device bytes of one call.
    extra: usize,
}

fn main() {
    let Some(gpu) = common::device_or_skip("logprob", &format!(": T={T} V={V} H={H}")) else {
        return;
    };
    let g = &*gpu;
    let x = Inputs {
        hidden: filled_bf16(g, T * H, 1, 1.0),
        head: filled_bf16(g, V * H, 2, 0.05),
        targets: ok(g.upload(&(0..T).map(|i| (i * 7919 % V) as u32).collect::<Vec<_>>())),
        dlogp: ok(g.upload(&vec![-1.0f32 / T as f32; T])),
    };
    let outs = RefCell::new(Outputs {
        logp: ok(g.zeros::<f32>(T)),
        lse: ok(g.zeros::<f32>(T)),
        d_hidden: ok(g.zeros::<bf16>(T * H)),
        grad: ok(g.zeros::<bf16>(T * H)),
    });
    // Create cuBLAS (its workspace stays allocated) before the baseline is taken.
    {
        let a = ok(g.zeros::<bf16>(64 * 64));
        let mut c = ok(g.zeros::<bf16>(64 * 64));
        ok(blas::gemm_bf16(g, Gemm::linear(64, 64, 64), &a, &a, &mut c));
        ok(g.synchronize());
    }

    let (xr, or) = (&x, &outs);
    let mut cases: Vec<Case> = vec![
        Case {
            path: "fused",
            pass: "fwd",
            run: Box::new(move || forward(g, xr, &mut or.borrow_mut(), LogprobPath::Fused)),
            extra: 0,
        },
        Case {
            path: "chunked",
            pass: "fwd",
            run: Box::new(move || forward(g, xr, &mut or.borrow_mut(), LogprobPath::Chunked)),
            extra: 0,
        },
        Case {
            path: "fused",
            pass: "fwd+bwd",
            run: Box::new(move || {
                let o = &mut or.borrow_mut();
                forward(g, xr, o, LogprobPath::Fused);
                backward(g, xr, o, LogprobPath::Fused);
            }),
            extra: 0,
        },
        Case {
            path: "chunked",
            pass: "fwd+bwd",
            run: Box::new(move || {
                let o = &mut or.borrow_mut();
                forward(g, xr, o, LogprobPath::Chunked);
                backward(g, xr, o, LogprobPath::Chunked);
            }),
            extra: 0,
        },
        Case {
            path: "ingrad",
            pass: "fwd+bwd",
            run: Box::new(move || ingrad(g, xr, &mut or.borrow_mut())),
            extra: 0,
        },
        Case {
            path: "unfused",
            pass: "fwd",
            run: Box::new(move || unfused(g, xr, &mut or.borrow_mut(), false)),
            extra: 0,
        },
        Case {
            path: "unfused",
            pass: "fwd+bwd",
            run: Box::new(move || unfused(g, xr, &mut or.borrow_mut(), true)),
            extra: 0,
        },
    ];

    for case in cases.iter_mut() {
        case.extra = common::peak_extra_bytes(g, &mut case.run);
    }

    let mut c = common::criterion(300, 2000, 10);
    {
        let mut group = c.benchmark_group("logprob");
        for case in cases.iter_mut() {
            bench_gpu(
                &mut group,
                g,
                &format!("{} {}", case.path, case.pass),
                &mut case.run,
            );
        }
        group.finish();
    }
    let summary: Vec<(&str, &str, f64, usize)> = cases
        .iter_mut()
        .map(|case| {
            let ms = gpu_ms(g, &mut case.run, 7, 3);
            (case.path, case.pass, ms, case.extra)
        })
        .collect();
    drop(cases);
    c.final_summary();

    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!("summary on {}:", g.name());
    for &(path, pass, ms, extra) in &summary {
        println!(
            "BENCH logprob {path:<8} {pass:<8} {ms:>9.3} ms  extra {:>9.1} MiB",
            mib(extra)
        );
    }
    let find = |path: &str, pass: &str| {
        summary
            .iter()
            .find(|s| s.0 == path && s.1 == pass)
            .map(|s| (s.2, s.3))
    };
    for pass in ["fwd", "fwd+bwd"] {
        let Some((base_ms, base_mem)) = find("unfused", pass) else {
            continue;
        };
        for path in ["fused", "chunked", "ingrad"] {
            if let Some((ms, mem)) = find(path, pass) {
                println!(
                    "RATIO logprob_{path}_vs_unfused {pass:<8} time {:.2}x  memory {:.1}x  (targets: >= 1.5x, >= 10x)",
                    base_ms / ms,
                    base_mem as f64 / mem.max(1) as f64
                );
            }
        }
    }
}
