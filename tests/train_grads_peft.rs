//! Adapter gradients of one SFT step equal peft + torch's (tools/make_train_fixtures.py:
//! tiny models, nonzero initial adapter on all 7 projections, rows 0..4 of
//! sft_rows.jsonl, loss = mean token cross-entropy over the completion tokens).

mod common;
use common::*;

use palign::lora::peft;
use palign::model::llama::SeqBatch;
use palign::model::llama::PROJ_NAMES;
use palign::model::weights::{to_f32, Weights};
use palign::model::{Model, ScoreSeq};
use std::path::Path;

fn rows(path: &Path, n: usize) -> Vec<ScoreSeq> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids = |k: &str| {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect::<Vec<_>>()
            };
            let (p, c) = (ids("prompt_ids"), ids("completion_ids"));
            ScoreSeq {
                prompt_len: p.len(),
                ids: [p, c].concat(),
            }
        })
        .collect()
}

fn check(base: &str) {
    let model = Model::load(&fx().join(base)).unwrap();
    let dir = fx().join("train").join(base);
    let adapter = peft::load(&dir.join("init_adapter"), &model.cfg).unwrap();
    let seqs = rows(&dir.join("sft_rows.jsonl"), 4);
    let b = SeqBatch::new(&seqs);
    let n = b.targets.len() as f32;
    let (_, grads) = step_grads(
        &model,
        &adapter,
        &b,
        None,
        Some(&vec![-1.0 / n; b.targets.len()]),
    );
    let want = Weights::open_files(&[dir.join("expected/sft_grads_step1.safetensors")]).unwrap();
    let mut worst = 0.0f32;
    for (l, p, g) in grads.pairs() {
        let block = if p >= 4 { "mlp" } else { "self_attn" };
        for (ab, t) in [("A", &g.a), ("B", &g.b)] {
            let key = format!(
                "base_model.model.model.layers.{l}.{block}.{}.lora_{ab}.weight",
                PROJ_NAMES[p]
            );
            let e = want
                .get(&key)
                .unwrap_or_else(|| panic!("{key} missing in fixture"));
            let w = to_f32(want.bytes(e), e.dtype).unwrap();
            let scale = w.iter().map(|x| x.abs()).fold(0.0f32, f32::max).max(1e-6);
            for (a, b) in t.cpu().iter().zip(&w) {
                let d = (a - b).abs() / scale;
                worst = worst.max(d);
                assert!(d < 1e-4, "{base} {key}: {a} vs {b} (max |g| {scale})");
            }
        }
    }
    eprintln!("{base}: worst |Δg|/max|g| = {worst:.2e}");
}

#[test]
fn sft_gradients_match_peft_llama() {
    check("tiny-llama");
}

#[test]
fn sft_gradients_match_peft_mistral() {
    check("tiny-mistral");
}
