//! LoRA projections (criterion; `cargo bench --bench lora`) at M = 8192 tokens, in =
//! 4096, out = 4096 (q/o) and 14336 (gate/up), ranks 16 and 64, NF4 base:
//!
//! - `base`: the NF4 fused GEMM alone (`nf4::gemm_fused`), the projection without
//!   an adapter;
//! - `fused`: `lora::lora_forward(fused = true)`: cuBLAS `s·X·Aᵀ` [M, r], then the NF4
//!   GEMM with the adapter slab (`nf4_gemm_fwd_lora`), Y written once;
//! - `fused_kernel`: that kernel alone (the factor precomputed), to split the cost;
//! - `unfused`: `lora_forward(fused = false)`: the factor, the NF4 GEMM, then cuBLAS
//!   `Y += XA·Bᵀ` (beta = 1), i.e. separate GEMMs;
//!
//! and the same three for the input gradient (`lora_backward_input`, dX = dY·W +
//! s·(dY·B)·A). Issue 9's target is fused ≤ 1.05x base.
//!
//! Time is GPU time between CUDA events (median of 9 batches of 5 calls after
//! criterion's run). Output: one `BENCH lora ...` line per shape, rank and direction,
//! then `RATIO lora_fused_vs_base ...` and `RATIO lora_fused_vs_unfused ...` lines
//! (tools/gpu-check.sh copies them into its report).
//!
//! Without a CUDA device (or without compiled kernels) it prints a skip line and exits
//! 0, so `cargo bench` works on every machine.

#[path = "common/mod.rs"]
mod common;

use common::{bench_gpu, filled_bf16, gpu_ms, ok, random_weight, Launch};
use criterion::Criterion;
use half::bf16;
use palign::backend::cuda::lora::{self, LoraBase, LoraDev, LoraPath};
use palign::backend::cuda::nf4::{self, Nf4Op, Out};
use palign::backend::cuda::{DeviceBuffer, Gpu};

const TOKENS: usize = 8192;
const IN: usize = 4096;
const OUTS: &[(&str, usize)] = &[("q_o", 4096), ("gate_up", 14336)];
const RANKS: &[usize] = &[16, 64];

/// Criterion over `cases` (name, launch), then each one's summary time in ms.
fn bench(c: &mut Criterion, g: &Gpu, group: &str, cases: &mut [(String, Launch<'_>)]) -> Vec<f64> {
    {
        let mut grp = c.benchmark_group(group);
        for (name, run) in cases.iter_mut() {
            bench_gpu(&mut grp, g, name, run);
        }
        grp.finish();
    }
    cases
        .iter_mut()
        .map(|(_, run)| gpu_ms(g, run, 9, 5))
        .collect()
}

fn main() {
    let Some(gpu) = common::device_or_skip("lora", "") else {
        return;
    };
    let g = &*gpu;
    let mut c = common::criterion(200, 600, 10);
    let mut lines = Vec::new();
    let mut ratios = Vec::new();

    for &(label, out) in OUTS {
        let w = random_weight(g, out, IN, 1);
        let x = filled_bf16(g, TOKENS * IN, 2, 1.0);
        let dy = filled_bf16(g, TOKENS * out, 3, 1.0);
        for &r in RANKS {
            let a = filled_bf16(g, r * IN, 4, 0.02);
            let b = filled_bf16(g, out * r, 5, 0.02);
            let adapter = LoraDev {
                a: &a,
                b: &b,
                rank: r,
                scale: 16.0 / r as f32,
            };
            let base = LoraBase::Nf4(&w);
            for op in [Nf4Op::Forward, Nf4Op::Backward] {
                let (inp, outc) = op.dims([out, IN]);
                let input = match op {
                    Nf4Op::Forward => &x,
                    Nf4Op::Backward => &dy,
                };
                // One output per case (criterion keeps every closure alive at once).
                let mut outs: Vec<DeviceBuffer<bf16>> =
                    (0..4).map(|_| ok(g.alloc::<bf16>(TOKENS * outc))).collect();
                let mut factors: Vec<DeviceBuffer<bf16>> =
                    (0..3).map(|_| ok(g.alloc::<bf16>(TOKENS * r))).collect();
                let [o1, o2, o3, o4] = &mut outs[..] else {
                    unreachable!()
                };
                let [f1, f2, f3] = &mut factors[..] else {
                    unreachable!()
                };
                // The precomputed factor for the kernel-only case.
                match op {
                    Nf4Op::Forward => {
                        ok(lora::lora_forward(
                            g, base, input, None, TOKENS, adapter, f3, o4, true,
                        ));
                    }
                    Nf4Op::Backward => {
                        ok(lora::lora_backward_input(
                            g, base, input, TOKENS, adapter, f3, o4, true,
                        ));
                    }
                }
                let f3 = &*f3;
                let right = match op {
                    Nf4Op::Forward => &b,
                    Nf4Op::Backward => &a,
                };
                let run_lora =
                    move |fused: bool, f: &mut DeviceBuffer<bf16>, o: &mut DeviceBuffer<bf16>| {
                        let path = match op {
                            Nf4Op::Forward => ok(lora::lora_forward(
                                g, base, input, None, TOKENS, adapter, f, o, fused,
                            )),
                            Nf4Op::Backward => ok(lora::lora_backward_input(
                                g, base, input, TOKENS, adapter, f, o, fused,
                            )),
                        };
                        assert_eq!(path == LoraPath::Fused, fused, "bench shapes are fusable");
                    };
                let w = &w;
                let dir = op.name();
                let mut cases: Vec<(String, Launch<'_>)> = vec![
                    (
                        format!("{dir} {label} r={r} base"),
                        Box::new(move || {
                            ok(nf4::gemm_fused(g, op, input, TOKENS, w, Out::Bf16(o1)))
                        }),
                    ),
                    (
                        format!("{dir} {label} r={r} fused"),
                        Box::new(move || run_lora(true, f1, o2)),
                    ),
                    (
                        format!("{dir} {label} r={r} fused_kernel"),
                        Box::new(move || {
                            ok(lora::gemm_fused_lora(
                                g,
                                op,
                                input,
                                TOKENS,
                                w,
                                f3,
                                right,
                                r,
                                Out::Bf16(o3),
                            ))
                        }),
                    ),
                    (
                        format!("{dir} {label} r={r} unfused"),
                        Box::new(move || run_lora(false, f2, o4)),
                    ),
                ];
                let t = bench(&mut c, g, "lora", &mut cases);
                let (base_ms, fused_ms, kernel_ms, unfused_ms) = (t[0], t[1], t[2], t[3]);
                let flops = 2.0 * (TOKENS * inp * outc) as f64;
                let tflops = flops / (base_ms / 1e3) / 1e12;
                lines.push(format!(
                    "BENCH lora {dir} {label:<7} m={TOKENS} out={out} in={IN} r={r:<2}  \
                     base {base_ms:>8.4} ms ({tflops:.1} TFLOP/s)  fused {fused_ms:>8.4} ms  \
                     fused_kernel {kernel_ms:>8.4} ms  unfused {unfused_ms:>8.4} ms"
                ));
                ratios.push(format!(
                    "RATIO lora_fused_vs_base {dir} {label} r={r}: {:.3}x \
                     (kernel only {:.3}x; target <= 1.05)",
                    fused_ms / base_ms,
                    kernel_ms / base_ms
                ));
                ratios.push(format!(
                    "RATIO lora_fused_vs_unfused {dir} {label} r={r}: {:.3}x ({:.2}x faster)",
                    fused_ms / unfused_ms,
                    unfused_ms / fused_ms
                ));
            }
        }
    }
    c.final_summary();

    println!("lora summary on {} (M = {TOKENS}, NF4 base):", g.name());
    for l in lines.iter().chain(&ratios) {
        println!("{l}");
    }
}
