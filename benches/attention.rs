//! Flash attention throughput (criterion; `cargo bench --bench attention`).
//!
//! FlashAttention-2's benchmark shapes with Mistral-7B's heads: 16k tokens per batch
//! (batch = 16384 / seq), 32 query heads, 8 KV heads, head_dim 128, causal, at sequence
//! 512/1024/2048/4096. FLOPs are counted as FA2 counts them: forward 4·s²·d·H/2 per
//! sequence (causal halves the square), backward 2.5× the forward, so fwd+bwd is 3.5×.
//! One extra case runs s=4096 with a 1024-token sliding window, counting only the visible
//! (query, key) pairs, to show the cost following the window.
//!
//! Time is GPU time between CUDA events around the launches (no host sync in the loop).
//! The summary prints one `BENCH attention <pass> s=<seq> ...  TFLOP/s` line per case;
//! tools/bench_torch_sdpa.py prints the same table for PyTorch's SDPA flash backend.
//! Without a CUDA device it prints a skip line and exits 0.
//!
//! Then every kernel variant (attention::FWD_VARIANTS, BWD_VARIANTS) at the same shapes,
//! each timed next to the default in the same run: `BENCH attention_variant fwd <name>
//! ...` (forward alone, ratio to the default forward) and `BENCH attention_variant fwd+bwd
//! <name>` (the default forward plus that backward, ratio to the default pair), then
//! `fwd+bwd best=<fwd>+<bwd>`: the fastest of each together. The `attention_variant` lines
//! do not match tools/bench_torch_sdpa.py's pattern, so its RATIO lines stay the defaults'.

#[path = "common/mod.rs"]
mod common;

use common::{bench_gpu, filled_bf16, gpu_ms, ok, Launch};
use criterion::Throughput;
use half::bf16;
use palign::backend::cpu::ops::AttnShape;
use palign::backend::cuda::attention::{
    self as attn, AttnGradInputs, AttnGrads, BwdConfig, BwdVariant, FwdVariant, SeqLayout,
    BWD_VARIANTS, FWD_VARIANTS,
};
use palign::backend::cuda::attn_tune::{agrees, Output};
use palign::backend::cuda::{DeviceBuffer, Gpu};

const TOKENS: usize = 16384;
const N_Q: usize = 32;
const N_KV: usize = 8;
const HEAD_DIM: usize = 128;
const SEQS: &[usize] = &[512, 1024, 2048, 4096];

/// (sequence length, window) of the cases: causal at every length, then one windowed.
fn configs() -> Vec<(usize, Option<usize>)> {
    let mut c: Vec<(usize, Option<usize>)> = SEQS.iter().map(|&s| (s, None)).collect();
    c.push((4096, Some(1024)));
    c
}

/// Visible (query, key) pairs of one causal sequence of `s` tokens with window `w`.
/// One benchmark shape of `configs()` on the device: its packed layout, attention shape,
/// forward FLOPs and the tag the lines print.
fn shape_case(g: &Gpu, s: usize, window: Option<usize>) -> (SeqLayout, AttnShape, f64, String) {
    let batch = TOKENS / s;
    let offsets: Vec<usize> = (0..=batch).map(|b| b * s).collect();
    let layout = ok(SeqLayout::packed(g, &offsets));
    let shape = AttnShape {
        n_heads: N_Q,
        n_kv_heads: N_KV,
        head_dim: HEAD_DIM,
        window,
    };
    let flops = batch as f64 * visible_pairs(s, window) * 4.0 * (HEAD_DIM * N_Q) as f64;
    let tag = window.map_or(format!("s={s}"), |w| format!("s={s} W={w}"));
    (layout, shape, flops, tag)
}

fn visible_pairs(s: usize, w: Option<usize>) -> f64 {
    (0..s)
        .map(|i| w.map_or(i + 1, |w| (i + 1).min(w)) as f64)
        .sum()
}

struct Case<'a> {
    name: String,
    flops: f64,
    run: Launch<'a>,
}

fn main() {
    let Some(gpu) = common::device_or_skip(
        "attention",
        &format!(": {TOKENS} tokens, {N_Q}/{N_KV} heads, d={HEAD_DIM}, causal"),
    ) else {
        return;
    };
    let g = &*gpu;
    let (nq, nkv) = (TOKENS * N_Q * HEAD_DIM, TOKENS * N_KV * HEAD_DIM);
    let q = filled_bf16(g, nq, 1, 2.0);
    let k = filled_bf16(g, nkv, 2, 1.0);
    let v = filled_bf16(g, nkv, 3, 1.0);
    let d_o = filled_bf16(g, nq, 4, 1.0);
    // Output buffers each case writes (shared; the cases run one at a time).
    let outs = std::cell::RefCell::new((
        ok(g.zeros::<bf16>(nq)),
        ok(g.zeros::<f32>(TOKENS * N_Q)),
        ok(g.zeros::<bf16>(nq)),
        ok(g.zeros::<bf16>(nkv)),
        ok(g.zeros::<bf16>(nkv)),
    ));

    let configs = configs();
    let mut cases: Vec<Case> = Vec::new();
    for &(s, window) in &configs {
        let (layout, shape, fwd_flops, tag) = shape_case(g, s, window);
        let layout = std::rc::Rc::new(layout);
        let (l1, l2) = (layout.clone(), layout);
        let (qr, kr, vr, dor, outs_ref) = (&q, &k, &v, &d_o, &outs);
        cases.push(Case {
            name: format!("fwd {tag}"),
            flops: fwd_flops,
            run: Box::new(move || {
                let mut b = outs_ref.borrow_mut();
                let (out, l, ..) = &mut *b;
                ok(attn::attention_forward(g, qr, kr, vr, &l1, shape, out, l))
            }),
        });
        cases.push(Case {
            name: format!("fwd+bwd {tag}"),
            flops: 3.5 * fwd_flops,
            run: Box::new(move || {
                let mut b = outs_ref.borrow_mut();
                let (out, l, dq, dk, dv) = &mut *b;
                ok(attn::attention_forward(g, qr, kr, vr, &l2, shape, out, l));
                let x = AttnGradInputs {
                    q: qr,
                    k: kr,
                    v: vr,
                    o: out,
                    d_o: dor,
                    lse: l,
                };
                ok(attn::attention_backward(
                    g,
                    x,
                    &l2,
                    shape,
                    AttnGrads { dq, dk, dv },
                ))
            }),
        });
    }

    let mut c = common::criterion(200, 1000, 10);
    {
        let mut group = c.benchmark_group("attention");
        for case in cases.iter_mut() {
            group.throughput(Throughput::Elements(case.flops as u64));
            bench_gpu(&mut group, g, &case.name, &mut case.run);
        }
        group.finish();
    }
    let mut summary = Vec::new();
    for case in cases.iter_mut() {
        let ms = gpu_ms(g, &mut case.run, 7, 5);
        summary.push((case.name.clone(), case.flops, ms));
    }
    drop(cases);
    c.final_summary();

    println!("summary on {} (FLOPs as FA2 counts them):", g.name());
    for (name, flops, ms) in summary {
        println!(
            "BENCH attention {name:<18} {ms:>9.3} ms  {:>7.1} TFLOP/s",
            flops / (ms / 1e3) / 1e12
        );
    }
    let mut outs = outs.into_inner();
    variants(
        g,
        Inputs {
            q: &q,
            k: &k,
            v: &v,
            d_o: &d_o,
        },
        &mut outs,
    );
}

struct Inputs<'a> {
    q: &'a DeviceBuffer<bf16>,
    k: &'a DeviceBuffer<bf16>,
    v: &'a DeviceBuffer<bf16>,
    d_o: &'a DeviceBuffer<bf16>,
}

type Outs = (
    DeviceBuffer<bf16>,
    DeviceBuffer<f32>,
    DeviceBuffer<bf16>,
    DeviceBuffer<bf16>,
    DeviceBuffer<bf16>,
);

/// One forward (and with `bwd`, backward) pass with the given kernels.
fn pass(
    g: &Gpu,
    x: &Inputs,
    outs: &mut Outs,
    layout: &SeqLayout,
    shape: AttnShape,
    fwd: &'static FwdVariant,
    bwd: Option<&'static BwdConfig>,
) -> palign::Result<()> {
    let (out, l, dq, dk, dv) = outs;
    attn::attention_forward_with(g, x.q, x.k, x.v, layout, shape, out, l, fwd)?;
    if let Some(b) = bwd {
        let grads = AttnGradInputs {
            q: x.q,
            k: x.k,
            v: x.v,
            o: out,
            d_o: x.d_o,
            lse: l,
        };
        attn::attention_backward_with(
            g,
            grads,
            layout,
            shape,
            AttnGrads { dq, dk, dv },
            BwdVariant::Named(b),
        )?;
    }
    Ok(())
}

/// GPU ms per pass (as `gpu_ms`), or the launch error (a variant this GPU cannot run).
fn time_pass(
    g: &Gpu,
    x: &Inputs,
    outs: &mut Outs,
    layout: &SeqLayout,
    shape: AttnShape,
    fwd: &'static FwdVariant,
    bwd: Option<&'static BwdConfig>,
) -> Result<f64, String> {
    pass(g, x, outs, layout, shape, fwd, bwd).map_err(|e| e.to_string())?;
    let mut run: Launch = Box::new(|| ok(pass(g, x, outs, layout, shape, fwd, bwd)));
    Ok(gpu_ms(g, &mut run, 7, 5))
}

/// A variant and its time (ms).
type Best<T> = (&'static T, f64);

/// Every forward and backward variant next to the default, per shape.
fn variants(g: &Gpu, x: Inputs, outs: &mut Outs) {
    println!(
        "variants on {} (ratios against the default in the same run):",
        g.name()
    );
    let line = |which: &str, name: &str, tag: &str, flops: f64, ms: f64, base: f64, vs: &str| {
        println!(
            "BENCH attention_variant {which:<7} {name:<20} {tag:<12} {ms:>9.3} ms  {:>7.1} TFLOP/s  {:.2}x {vs}",
            flops / (ms / 1e3) / 1e12,
            base / ms
        )
    };
    // Two passes: the wgmma variants (sm_90a) only after every other line is out, so a
    // fault in a kernel not yet verified on a GPU cannot take the others' lines with it.
    // The second pass starts from the first's fastest pair per shape.
    // Per shape (by index, so a shape whose default failed keeps its place).
    let (f0, b0) = (&FWD_VARIANTS[0], &BWD_VARIANTS[0]);
    let mut bests: Vec<(Best<FwdVariant>, Best<BwdConfig>)> =
        vec![((f0, f64::INFINITY), (b0, f64::INFINITY)); configs().len()];
    for wgmma_pass in [false, true] {
        if wgmma_pass && !FWD_VARIANTS.iter().any(|v| v.wgmma && v.runs_on(g)) {
            println!(
                "BENCH attention_variant: no wgmma variant runs on {}",
                g.name()
            );
            break;
        }
        if wgmma_pass && common::tests_hung("gpu_attention") {
            println!("BENCH attention_variant: wgmma variants skipped (gpu_attention timed out)");
            break;
        }
        for (si, (s, window)) in configs().into_iter().enumerate() {
            let (layout, shape, flops, tag) = shape_case(g, s, window);

            // Forward alone.
            let Ok(base) = time_pass(g, &x, outs, &layout, shape, f0, None) else {
                println!("BENCH attention_variant fwd {tag}: the default forward failed");
                continue;
            };
            // A variant not yet verified on a GPU must also agree with the default (the
            // tuner's test) before it may count as the fastest.
            // Only a pass with unverified variants needs the default's outputs to compare.
            let fwd_check = FWD_VARIANTS
                .iter()
                .any(|v| v.wgmma == wgmma_pass && !v.verified);
            let want = fwd_check.then(|| Output::heads(ok(g.download(&outs.0)), HEAD_DIM));
            let mut best_fwd = if wgmma_pass { bests[si].0 } else { (f0, base) };
            for v in FWD_VARIANTS.iter().filter(|v| v.wgmma == wgmma_pass) {
                match time_pass(g, &x, outs, &layout, shape, v, None) {
                    Ok(ms) => {
                        line("fwd", v.name, &tag, flops, ms, base, f0.name);
                        if !v.verified
                            && !want.as_ref().is_some_and(|w| {
                                agrees(&Output::heads(ok(g.download(&outs.0)), HEAD_DIM), w)
                            })
                        {
                            println!(
                                "BENCH attention_variant fwd {} {tag}: output DIFFERS from {}'s",
                                v.name, f0.name
                            );
                            continue;
                        }
                        if ms < best_fwd.1 {
                            best_fwd = (v, ms);
                        }
                    }
                    Err(e) => println!(
                        "BENCH attention_variant fwd {} {tag}: skipped ({e})",
                        v.name
                    ),
                }
            }
            // Forward (the default) + backward.
            let Ok(base) = time_pass(g, &x, outs, &layout, shape, f0, Some(b0)) else {
                println!("BENCH attention_variant fwd+bwd {tag}: the default backward failed");
                continue;
            };
            let grads = |outs: &Outs| {
                [&outs.2, &outs.3, &outs.4].map(|b| Output::heads(ok(g.download(b)), HEAD_DIM))
            };
            let bwd_check = BWD_VARIANTS
                .iter()
                .any(|v| v.wgmma == wgmma_pass && !v.verified);
            let want = if bwd_check {
                grads(outs).to_vec()
            } else {
                Vec::new()
            };
            let mut best_bwd = if wgmma_pass { bests[si].1 } else { (b0, base) };
            for v in BWD_VARIANTS.iter().filter(|v| v.wgmma == wgmma_pass) {
                if v.kernel(HEAD_DIM).is_none() {
                    continue;
                }
                match time_pass(g, &x, outs, &layout, shape, f0, Some(v)) {
                    Ok(ms) => {
                        line("fwd+bwd", v.name, &tag, 3.5 * flops, ms, base, b0.name);
                        if !v.verified && !grads(outs).iter().zip(&want).all(|(a, b)| agrees(a, b))
                        {
                            println!(
                            "BENCH attention_variant fwd+bwd {} {tag}: dQ/dK/dV DIFFER from {}'s",
                            v.name, b0.name
                        );
                            continue;
                        }
                        if ms < best_bwd.1 {
                            best_bwd = (v, ms);
                        }
                    }
                    Err(e) => {
                        println!(
                            "BENCH attention_variant fwd+bwd {} {tag}: skipped ({e})",
                            v.name
                        )
                    }
                }
            }
            // The fastest of each together, against the default pair timed again now (in the
            // second pass only where a wgmma variant changed the pair).
            let (bf, bb) = (best_fwd.0, best_bwd.0);
            let changed =
                !wgmma_pass || bf.name != bests[si].0 .0.name || bb.name != bests[si].1 .0.name;
            if !wgmma_pass {
                bests[si] = (best_fwd, best_bwd);
            }
            if !changed {
                continue;
            }
            if let (Ok(base), Ok(ms)) = (
                time_pass(g, &x, outs, &layout, shape, f0, Some(b0)),
                time_pass(g, &x, outs, &layout, shape, bf, Some(bb)),
            ) {
                let name = format!("best={}+{}", bf.name, bb.name);
                let vs = format!("{}+{}", f0.name, b0.name);
                line("fwd+bwd", &name, &tag, 3.5 * flops, ms, base, &vs);
            }
        }
    }
}
