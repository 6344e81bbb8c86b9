//! The whole model's adapter gradients against central finite differences: tiny
//! Mistral (GQA 4:2, sliding window 8, tied head) and LLaMA, a nonzero adapter on all
//! seven projections, a loss that weights every completion log-prob differently.

mod common;

use common::{flat_grads, lcg, nonzero_adapter, step_grads};
use palign::lora::Adapter;
use palign::model::llama::{Dropout, Recompute, SeqBatch};
use palign::model::{Model, ScoreSeq};
use std::path::Path;

/// The tiny model, a nonzero adapter on all seven projections, two sequences and a
/// different weight per completion log-prob.
fn setup(model_name: &str) -> (Model, Adapter, SeqBatch, Vec<f32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(model_name);
    let model = Model::load(&dir).unwrap();
    let adapter = nonzero_adapter(&model.cfg, 3, 0.3);
    let ids = lcg(40, 5)
        .iter()
        .map(|v| 3 + ((v + 1.0) * 200.0) as u32)
        .collect::<Vec<_>>();
    let seqs = vec![
        ScoreSeq {
            ids: ids[..13].to_vec(),
            prompt_len: 4,
        },
        ScoreSeq {
            ids: ids[13..].to_vec(),
            prompt_len: 9,
        },
    ];
    let b = SeqBatch::new(&seqs);
    let weights = lcg(b.targets.len(), 9);
    (model, adapter, b, weights)
}

/// `p` > 0: dropout on every adapter input, with the same masks in every evaluation (the
/// loss stays a deterministic, smooth function of the adapter).
fn check(model_name: &str, p: f32) {
    let (model, adapter, b, weights) = setup(model_name);
    let drop = || (p > 0.0).then(|| Dropout::new(p, 11, 3));
    let loss = |a: &Adapter| -> f64 {
        let mut d = drop();
        let (lp, _) = model
            .forward(
                Some(a),
                &b.ids,
                &b.pack,
                &b.rows,
                &b.targets,
                d.as_mut(),
                false,
            )
            .unwrap();
        palign::ops::to_host(&lp)
            .unwrap()
            .iter()
            .zip(&weights)
            .map(|(l, w)| *l as f64 * *w as f64)
            .sum()
    };
    let mut d = drop();
    let (_, grads) = step_grads(&model, &adapter, &b, d.as_mut(), Some(&weights));

    // Probe a spread of coordinates of every tensor (A and B of each projection and layer).
    let h = 1e-2f32;
    let mut worst = 0.0f64;
    let mut checked = 0;
    let n_pairs = adapter.pairs().count();
    for pi in 0..n_pairs {
        for which in 0..2 {
            let len = {
                let p = adapter.pairs().nth(pi).unwrap().2;
                if which == 0 {
                    p.a.numel()
                } else {
                    p.b.numel()
                }
            };
            for probe in 0..3 {
                let idx = (probe * 7919 + pi * 31) % len;
                let bump = |a: &mut Adapter, d: f32| {
                    let p = a.pairs_mut().nth(pi).unwrap().2;
                    let t = if which == 0 { &mut p.a } else { &mut p.b };
                    t.cpu_mut()[idx] += d;
                };
                let mut ap = adapter.try_clone().unwrap();
                bump(&mut ap, h);
                let mut am = adapter.try_clone().unwrap();
                bump(&mut am, -h);
                let num = (loss(&ap) - loss(&am)) / (2.0 * h as f64);
                let g = grads.pairs().nth(pi).unwrap().2;
                let ana = if which == 0 {
                    g.a.cpu()[idx]
                } else {
                    g.b.cpu()[idx]
                } as f64;
                let err = (num - ana).abs() / (1e-2 + ana.abs().max(num.abs()));
                worst = worst.max(err);
                assert!(
                    err < 3e-2,
                    "{model_name} pair {pi} {} [{idx}]: fd {num} vs analytic {ana}",
                    if which == 0 { "A" } else { "B" }
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 6 * n_pairs);
    eprintln!("{model_name} p {p}: {checked} coordinates, worst relative error {worst:.2e}");
}

#[test]
fn mistral_adapter_gradients_match_finite_differences() {
    check("tiny-mistral", 0.0);
}

#[test]
fn llama_adapter_gradients_match_finite_differences() {
    check("tiny-llama", 0.0);
}

/// The dropout backward (each adapter's own mask on its input and on its share of dX,
/// q/k/v and gate/up grouped) against finite differences of the masked forward.
#[test]
fn gradients_with_dropout_match_finite_differences() {
    check("tiny-mistral", 0.3);
    check("tiny-llama", 0.3);
}

/// Adapter gradients of one forward + backward under a memory plan, with dropout on.
fn grads_with(
    model: &mut Model,
    plan: Recompute,
    p: f32,
    adapter: &Adapter,
    b: &SeqBatch,
    w: &[f32],
) -> Vec<f32> {
    model.recompute = plan;
    let mut d = Dropout::new(p, 11, 3);
    flat_grads(&step_grads(model, adapter, b, Some(&mut d), Some(w)).1)
}

#[test]
fn recompute_plans_give_the_same_gradients_with_dropout() {
    for name in ["tiny-mistral", "tiny-llama"] {
        let (mut model, adapter, b, w) = setup(name);
        let none = grads_with(&mut model, Recompute::None, 0.1, &adapter, &b, &w);
        let no_drop = grads_with(&mut model, Recompute::None, 0.0, &adapter, &b, &w);
        // Dropout is really on (so the replayed masks are being compared).
        assert!(none.iter().zip(&no_drop).any(|(a, b)| a != b), "{name}");
        for plan in [Recompute::Attention, Recompute::Full] {
            let g = grads_with(&mut model, plan, 0.1, &adapter, &b, &w);
            let scale = none.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = none
                .iter()
                .zip(&g)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-6 * scale,
                "{name} {plan:?}: worst {worst} of scale {scale}"
            );
        }
    }
}

/// The lm_head gradient taken in the forward (`lm_grad_in_forward`) gives the backward's
/// gradients: the same products, only rounded in another order.
#[test]
fn lm_grad_in_forward_gives_the_same_gradients() {
    for name in ["tiny-mistral", "tiny-llama"] {
        let (mut model, adapter, b, w) = setup(name);
        model.lm_grad_in_forward = false;
        let (lp0, g0) = step_grads(&model, &adapter, &b, None, Some(&w));
        model.lm_grad_in_forward = true;
        let (lp1, g1) = step_grads(&model, &adapter, &b, None, Some(&w));
        assert_eq!(lp0, lp1, "{name}: the log-probs themselves are unchanged");
        let (g0, g1) = (flat_grads(&g0), flat_grads(&g1));
        let scale = g0.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        let worst = g0
            .iter()
            .zip(&g1)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-5 * scale,
            "{name}: worst {worst} of scale {scale}"
        );
    }
}
