//! Bandwidth of the small kernels (criterion; `cargo bench --bench small_kernels`).
//!
//! Shapes are Mistral-7B's at 4096 tokens per step (hidden 4096, 32/8 heads of 128,
//! MLP 14336, LoRA r=16 on all seven projections of 32 layers for the optimizer).
//! Time is GPU time between CUDA events around the launches (no host sync in the
//! loop), and throughput counts the bytes each kernel must move at least once, so
//! criterion's `thrpt` is achieved HBM bandwidth. A summary with one `BENCH` line per
//! kernel (decimal GB/s, or TFLOP/s for the GEMM) is printed at the end.
//!
//! Without a CUDA device (or without compiled kernels) it prints a skip line and
//! exits 0, so `cargo bench` works on every machine.

#[path = "common/mod.rs"]
mod common;

use common::{bench_gpu, filled_bf16, gpu_ms, ok, Launch};
use criterion::Throughput;
use half::bf16;
use palign::backend::cpu::optim::AdamWScalars;
use palign::backend::cuda::{blas, ops, DeviceBuffer, Gpu};

const TOKENS: usize = 4096;
const HIDDEN: usize = 4096;
const VOCAB: usize = 32000;
const N_Q: usize = 32;
const N_KV: usize = 8;
const HEAD_DIM: usize = 128;
const MLP: usize = 14336;
const LORA_R: usize = 16;
const LAYERS: usize = 32;

/// One benchmark: a name, bytes (or FLOPs) per call, and the launch.
struct Case<'a> {
    name: &'static str,
    amount: u64,
    flops: bool,
    run: Launch<'a>,
}

fn filled_f32(gpu: &Gpu, n: usize, scale: f32) -> DeviceBuffer<f32> {
    let host: Vec<f32> = (0..n)
        .map(|i| ((i % 1000) as f32 / 1000.0 - 0.5) * scale)
        .collect();
    ok(gpu.upload(&host))
}

fn main() {
    let Some(gpu) = common::device_or_skip("small_kernels", "") else {
        return;
    };
    let g = &*gpu;

    let bf = 2u64; // bytes per bf16
    let rows_x = (TOKENS * HIDDEN) as u64;

    // Embedding: read and write one row per token.
    let table = filled_bf16(g, VOCAB * HIDDEN, 1, 1.0);
    let ids: Vec<u32> = (0..TOKENS as u32)
        .map(|t| t.wrapping_mul(7919) % VOCAB as u32)
        .collect();
    let ids = ok(g.upload(&ids));
    let mut emb_out = ok(g.alloc::<bf16>(TOKENS * HIDDEN));

    // RMSNorm.
    let x = filled_bf16(g, TOKENS * HIDDEN, 2, 1.0);
    let w = filled_bf16(g, HIDDEN, 3, 1.0);
    let dy = filled_bf16(g, TOKENS * HIDDEN, 4, 1.0);
    let mut y = ok(g.alloc::<bf16>(TOKENS * HIDDEN));
    let mut rstd = ok(g.zeros::<f32>(TOKENS));
    let mut dx = ok(g.alloc::<bf16>(TOKENS * HIDDEN));
    let rstd_saved = filled_f32(g, TOKENS, 1.0);

    // RoPE on Q and K.
    let tables = ok(ops::RopeTables::new(g, HEAD_DIM, 1e6, 8192));
    let pos: Vec<u32> = (0..TOKENS as u32).collect();
    let pos = ok(g.upload(&pos));
    let mut q = filled_bf16(g, TOKENS * N_Q * HEAD_DIM, 5, 1.0);
    let mut k = filled_bf16(g, TOKENS * N_KV * HEAD_DIM, 6, 1.0);
    let mut dq = filled_bf16(g, TOKENS * N_Q * HEAD_DIM, 11, 1.0);
    let mut dk = filled_bf16(g, TOKENS * N_KV * HEAD_DIM, 12, 1.0);
    let rope_bytes = 2 * bf * (TOKENS * (N_Q + N_KV) * HEAD_DIM) as u64;

    // SwiGLU.
    let n_mlp = TOKENS * MLP;
    let gate = filled_bf16(g, n_mlp, 7, 1.0);
    let up = filled_bf16(g, n_mlp, 8, 1.0);
    let dout = filled_bf16(g, n_mlp, 9, 1.0);
    let mut h = ok(g.alloc::<bf16>(n_mlp));
    let mut dgate = ok(g.alloc::<bf16>(n_mlp));
    let mut dup = ok(g.alloc::<bf16>(n_mlp));

    // Casts.
    let mut as_f32 = ok(g.alloc::<f32>(n_mlp));
    let f32_src = filled_f32(g, n_mlp, 2.0);
    let mut as_bf16 = ok(g.alloc::<bf16>(n_mlp));

    // AdamW + grad norm over LoRA A [r, in] and B [out, r] of q, k, v, o, gate, up, down.
    let proj = [
        (HIDDEN, HIDDEN),
        (HIDDEN, N_KV * HEAD_DIM),
        (HIDDEN, N_KV * HEAD_DIM),
        (HIDDEN, HIDDEN),
        (HIDDEN, MLP),
        (HIDDEN, MLP),
        (MLP, HIDDEN),
    ];
    let mut sizes = Vec::new();
    for _ in 0..LAYERS {
        for &(i, o) in &proj {
            sizes.push(LORA_R * i);
            sizes.push(o * LORA_R);
        }
    }
    let n_params: usize = sizes.iter().sum();
    let mut params: Vec<DeviceBuffer<f32>> = sizes.iter().map(|&n| filled_f32(g, n, 0.1)).collect();
    let mut grads: Vec<DeviceBuffer<f32>> = sizes.iter().map(|&n| filled_f32(g, n, 0.01)).collect();
    let mut ms: Vec<DeviceBuffer<f32>> = sizes.iter().map(|&n| ok(g.zeros(n))).collect();
    let mut vs: Vec<DeviceBuffer<f32>> = sizes.iter().map(|&n| ok(g.zeros(n))).collect();
    let scalars = ok(AdamWScalars::new(10, 2e-4, 0.9, 0.999, 1e-8, 0.01));
    let mut adamw = ops::FusedAdamW::new();
    let mut gn = ok(ops::GradNorm::new(g));

    // GEMM: Y[tokens, MLP] = X[tokens, hidden] · W[MLP, hidden]ᵀ.
    let wg = filled_bf16(g, MLP * HIDDEN, 10, 1.0);
    let mut yg = ok(g.alloc::<bf16>(TOKENS * MLP));

    let mut cases: Vec<Case> = vec![
        Case {
            name: "embedding_forward",
            amount: 2 * bf * rows_x + 4 * TOKENS as u64,
            flops: false,
            run: Box::new(|| {
                ok(ops::embedding_forward(
                    g,
                    &table,
                    HIDDEN,
                    &ids,
                    &mut emb_out,
                ))
            }),
        },
        Case {
            name: "rmsnorm_forward",
            amount: 2 * bf * rows_x + 4 * TOKENS as u64,
            flops: false,
            run: Box::new(|| {
                ok(ops::rmsnorm_forward(
                    g,
                    &x,
                    &w,
                    1e-5,
                    &mut y,
                    Some(&mut rstd),
                ))
            }),
        },
        Case {
            name: "rmsnorm_backward",
            amount: 3 * bf * rows_x + 4 * TOKENS as u64,
            flops: false,
            run: Box::new(|| {
                ok(ops::rmsnorm_backward(
                    g,
                    &dy,
                    &x,
                    &w,
                    &rstd_saved,
                    &mut dx,
                    false,
                ))
            }),
        },
        Case {
            name: "rope_forward",
            amount: rope_bytes,
            flops: false,
            run: Box::new(|| {
                let args = ops::RopeArgs {
                    q: &mut q,
                    k: &mut k,
                    n_q_heads: N_Q,
                    n_kv_heads: N_KV,
                    positions: &pos,
                };
                ok(ops::rope_forward(g, args, &tables))
            }),
        },
        Case {
            name: "rope_backward",
            amount: rope_bytes,
            flops: false,
            run: Box::new(|| {
                let args = ops::RopeArgs {
                    q: &mut dq,
                    k: &mut dk,
                    n_q_heads: N_Q,
                    n_kv_heads: N_KV,
                    positions: &pos,
                };
                ok(ops::rope_backward(g, args, &tables))
            }),
        },
        Case {
            name: "swiglu_forward",
            amount: 3 * bf * n_mlp as u64,
            flops: false,
            run: Box::new(|| ok(ops::swiglu_forward(g, &gate, &up, &mut h))),
        },
        Case {
            name: "swiglu_backward",
            amount: 5 * bf * n_mlp as u64,
            flops: false,
            run: Box::new(|| {
                ok(ops::swiglu_backward(
                    g, &dout, &gate, &up, &mut dgate, &mut dup,
                ))
            }),
        },
        Case {
            name: "cast_bf16_to_f32",
            amount: 6 * n_mlp as u64,
            flops: false,
            run: Box::new(|| ok(ops::cast_bf16_to_f32(g, &gate, &mut as_f32))),
        },
        Case {
            name: "cast_f32_to_bf16",
            amount: 6 * n_mlp as u64,
            flops: false,
            run: Box::new(|| ok(ops::cast_f32_to_bf16(g, &f32_src, &mut as_bf16))),
        },
        Case {
            name: "grad_norm",
            // The norm reads every grad once; the clip coefficient goes to AdamW (which
            // scales on the fly), so the in-place clip pass is not part of a step.
            amount: 4 * n_params as u64,
            flops: false,
            run: Box::new(|| {
                let mut refs: Vec<&mut DeviceBuffer<f32>> = grads.iter_mut().collect();
                ok(gn.compute(g, &mut refs, 1.0, false))
            }),
        },
        Case {
            name: "gemm_bf16_linear",
            amount: 2 * (TOKENS * MLP * HIDDEN) as u64,
            flops: true,
            run: Box::new(|| {
                ok(blas::gemm_bf16(
                    g,
                    blas::Gemm::linear(TOKENS, MLP, HIDDEN),
                    &x,
                    &wg,
                    &mut yg,
                ))
            }),
        },
    ];
    let mut c = common::criterion(300, 2000, 20);
    let mut summary = Vec::new();
    {
        let mut group = c.benchmark_group("small_kernels");
        for case in cases.iter_mut() {
            group.throughput(Throughput::Bytes(case.amount));
            bench_gpu(&mut group, g, case.name, &mut case.run);
        }
        group.finish();
    }
    for case in cases.iter_mut() {
        let ms = gpu_ms(g, &mut case.run, 15, 10);
        summary.push((case.name, case.amount, case.flops, ms));
    }
    drop(cases);

    // AdamW (needs &mut to every state buffer, so built after the other cases are gone).
    let mut adamw_run: Launch = Box::new(|| {
        let mut ts: Vec<ops::AdamWTensor> = params
            .iter_mut()
            .zip(&grads)
            .zip(ms.iter_mut().zip(vs.iter_mut()))
            .map(|((param, grad), (m, v))| ops::AdamWTensor { param, grad, m, v })
            .collect();
        ok(adamw.step(g, &mut ts, &scalars, None))
    });
    let adamw_bytes = 7 * 4 * n_params as u64;
    {
        let mut group = c.benchmark_group("small_kernels");
        group.throughput(Throughput::Bytes(adamw_bytes));
        bench_gpu(&mut group, g, "adamw_step", &mut adamw_run);
        group.finish();
    }
    summary.push((
        "adamw_step",
        adamw_bytes,
        false,
        gpu_ms(g, &mut adamw_run, 15, 10),
    ));
    c.final_summary();

    println!(
        "summary on {} ({} LoRA params for AdamW):",
        g.name(),
        n_params
    );
    for (name, amount, flops, ms) in summary {
        let rate = amount as f64 / (ms / 1e3);
        if flops {
            println!(
                "BENCH {name:<18} {ms:>9.4} ms  {:>8.1} TFLOP/s",
                rate / 1e12
            );
        } else {
            println!("BENCH {name:<18} {ms:>9.4} ms  {:>8.1} GB/s", rate / 1e9);
        }
    }
}
