//! Shared prefixes (`SeqBatch::sharing_prefixes`): sequences that begin with the same
//! tokens compute them once, and nothing a caller sees changes. On the tiny LLaMA and
//! Mistral (GQA, sliding window 8, shorter than the sequences): the same completion
//! log-probs and the same adapter gradients as packing every sequence on its own, under
//! each memory plan; DPO training through the CLI gives the same metrics with sharing
//! on and off.

mod common;

use common::{flat_grads, lcg, nonzero_adapter, rel_rms, step_grads};
use palign::model::llama::{Recompute, SeqBatch};
use palign::model::{Model, ScoreSeq};
use std::path::Path;

/// n token ids in 3..403.
fn ids(n: usize, seed: u64) -> Vec<u32> {
    lcg(n, seed)
        .iter()
        .map(|v| 3 + ((v + 1.0) * 200.0) as u32)
        .collect()
}

/// Two groups sharing a 12-token prompt: a pair whose completions also share their
/// first two tokens (the shared prefix runs past the prompt), and three completions of
/// one prompt; then one sequence alone.
fn seqs() -> Vec<ScoreSeq> {
    let mut out = Vec::new();
    for (pair, lens) in [vec![6, 9], vec![5, 3, 7]].into_iter().enumerate() {
        let pl = 12;
        let prompt = ids(pl, 10 + pair as u64);
        let common = ids(2, 20);
        for (b, len) in lens.into_iter().enumerate() {
            let mut v = prompt.clone();
            if pair == 0 {
                v.extend(&common);
            }
            v.extend(ids(len, 30 + 2 * pair as u64 + b as u64));
            out.push(ScoreSeq {
                ids: v,
                prompt_len: pl,
            });
        }
    }
    out.push(ScoreSeq {
        ids: ids(15, 40),
        prompt_len: 6,
    });
    out
}

fn model(name: &str) -> Model {
    Model::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

#[test]
fn shared_batches_compute_each_prefix_once_and_score_the_same_targets() {
    let s = seqs();
    let (plain, shared) = (SeqBatch::new(&s), SeqBatch::sharing_prefixes(&s));
    // Pair 0 shares its 12-token prompt and 2 common tokens; group 1's prompt is
    // computed once instead of three times.
    assert_eq!(plain.ids.len(), shared.ids.len() + 14 + 2 * 12);
    assert_eq!(
        (plain.tokens, shared.tokens),
        (plain.ids.len(), plain.ids.len())
    );
    assert_eq!(shared.targets, plain.targets);
    assert_eq!(shared.counts, plain.counts);
    assert!(shared.pack.prefixes().is_some());
    // The three completions of group 1 are predicted first from the same prompt row.
    let first = |k: usize| shared.rows[plain.counts[..k].iter().sum::<usize>()];
    assert_eq!((first(2), first(2)), (first(3), first(4)));
    // Every target is predicted from a row holding the same token at the same position.
    let (pp, sp) = (plain.pack.positions(), shared.pack.positions());
    for (&a, &b) in plain.rows.iter().zip(&shared.rows) {
        assert_eq!((plain.ids[a], pp[a]), (shared.ids[b], sp[b]));
    }
}

#[test]
fn shared_prefixes_give_the_same_logprobs_and_gradients() {
    for name in ["tiny-llama", "tiny-mistral"] {
        let mut m = model(name);
        let a = nonzero_adapter(&m.cfg, 2, 0.3);
        let s = seqs();
        let (plain, shared) = (SeqBatch::new(&s), SeqBatch::sharing_prefixes(&s));
        let weights: Vec<f32> = ids(plain.targets.len(), 60)
            .iter()
            .map(|&x| (x as f32 - 200.0) / 300.0)
            .collect();
        for plan in [Recompute::None, Recompute::Attention, Recompute::Full] {
            for lm_grad_in_forward in [false, true] {
                m.recompute = plan;
                m.lm_grad_in_forward = lm_grad_in_forward;
                let (lp0, g0) = step_grads(&m, &a, &plain, None, Some(&weights));
                let (lp1, g1) = step_grads(&m, &a, &shared, None, Some(&weights));
                let case = format!("{name} {plan:?} lm_grad_in_forward={lm_grad_in_forward}");
                for (x, y) in lp0.iter().zip(&lp1) {
                    assert!((x - y).abs() < 1e-4, "{case}: log-prob {x} vs {y}");
                }
                let (g0, g1) = (flat_grads(&g0), flat_grads(&g1));
                let err = rel_rms(&g1, &g0);
                assert!(err < 1e-4, "{case}: gradients differ, rel rms {err:e}");
            }
        }
        // The scoring entry point shares too, with the same per-sequence values.
        let want: Vec<Vec<f32>> = plain.split(&lp_plain(&m, &plain));
        let got = m.completion_logprobs(&s, None).unwrap();
        for (w, g) in want.iter().zip(&got) {
            for (x, y) in w.iter().zip(g) {
                assert!((x - y).abs() < 1e-4, "{name}: {x} vs {y}");
            }
        }
    }
}

fn lp_plain(m: &Model, b: &SeqBatch) -> Vec<f32> {
    let (lp, _) = m
        .forward(None, &b.ids, &b.pack, &b.rows, &b.targets, None, false)
        .unwrap();
    palign::ops::to_host(&lp).unwrap()
}

#[test]
fn a_few_shared_tokens_are_not_worth_the_expanded_attention() {
    // Two 100-token sequences sharing their first 3 tokens: 3 of 200 is under 1/32.
    let mut a = ids(100, 70);
    let mut b = ids(100, 71);
    b[..3].copy_from_slice(&a[..3]);
    a[3] = b[3] + 1;
    let s = [a, b].map(|ids| ScoreSeq {
        ids,
        prompt_len: 50,
    });
    let batch = SeqBatch::sharing_prefixes(&s);
    assert!(batch.pack.prefixes().is_none());
    assert_eq!(batch.ids.len(), 200);
    // With 8 shared tokens (8 · 32 ≥ 200) they share.
    let mut s = s;
    let head: Vec<u32> = s[0].ids[..8].to_vec();
    s[1].ids[..8].copy_from_slice(&head);
    assert_eq!(SeqBatch::sharing_prefixes(&s).ids.len(), 192);
}

#[test]
fn pairs_whose_prompts_differ_are_not_grouped_with_their_neighbours() {
    // Every sequence starts with the same 3-token template. A chosen/rejected pair with
    // different prompts (HH-RLHF has a few) sits between two pairs with 20-token shared
    // prompts: it shares only the template, and the next pair still pairs with itself
    // (grouped with the odd pair instead it would share only the template too).
    let template = [1u32, 7, 7];
    let mk = |prompt: &[u32], seed: u64| {
        let mut v = template.to_vec();
        v.extend(prompt);
        v.extend(ids(4, seed));
        ScoreSeq {
            ids: v,
            prompt_len: 3 + prompt.len(),
        }
    };
    let (p0, p2) = (ids(20, 1), ids(20, 3));
    let s = vec![
        mk(&p0, 100),
        mk(&p0, 101),
        mk(&ids(20, 5), 102),
        mk(&ids(20, 6), 103),
        mk(&p2, 104),
        mk(&p2, 105),
    ];
    let b = SeqBatch::sharing_prefixes(&s);
    assert_eq!(b.tokens - b.ids.len(), 23 + 3 + 23);
}

/// `palign dpo` without dropout (so the policy pass shares prompts too, as do the
/// reference and evaluation passes), against the same run with sharing turned off:
/// the same metrics, up to float summation order.
#[test]
fn dpo_training_is_the_same_with_and_without_sharing() {
    let t = common::fx().join("train/tiny-llama");
    let data = format!("jsonl:{}", t.join("dpo_pairs.jsonl").display());
    let d = tempfile::tempdir().unwrap();
    let run = |name: &str, share: &str| {
        let out = d.path().join(name);
        let o = std::process::Command::new(common::bin())
            .env("PALIGN_DEVICE", "cpu")
            .env("PALIGN_SHARE_PREFIX", share)
            .args(["dpo", "--quiet", "--model"])
            .arg(common::fx().join("tiny-llama"))
            .args(["--data", &data, "--eval-data", &data, "--eval-every", "2"])
            .arg("--out")
            .arg(&out)
            .args(["--init-adapter"])
            .arg(t.join("init_adapter"))
            .args(["--no-shuffle", "--dropout", "0", "--batch-size", "4"])
            .args(["--steps", "3", "--lr", "1e-3", "--peft", "lora"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        common::jsonl(&out.join("metrics.jsonl"))
    };
    let (on, off) = (run("on", "on"), run("off", "off"));
    assert_eq!(on.len(), off.len());
    let mut compared = 0;
    for (a, b) in on.iter().zip(&off) {
        for (k, bv) in b.as_object().unwrap() {
            if k == "tokens_per_s" || k.ends_with("_s") {
                continue;
            }
            let (Some(x), Some(y)) = (a[k].as_f64(), bv.as_f64()) else {
                continue;
            };
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "step {} {k}: shared {x} vs unshared {y}",
                b["step"]
            );
            compared += 1;
        }
    }
    assert!(compared > 20, "only {compared} values compared");
    assert!(on
        .iter()
        .any(|r| r.get("eval_loss").is_some() || r.get("eval/loss").is_some()));
}

/// Few-shot evaluation contexts (`PackedSeqs`, as `Lm::choice_logprobs` packs them):
/// questions of one subject share the header and shots, computed once, and each
/// question's rows are where its tokens are.
#[test]
fn few_shot_contexts_share_their_header() {
    let header = ids(40, 80);
    let qs: Vec<Vec<u32>> = (0..4)
        .map(|q| [header.clone(), ids(6 + q, 90 + q as u64)].concat())
        .collect();
    let refs: Vec<&[u32]> = qs.iter().map(Vec::as_slice).collect();
    let p = palign::model::llama::PackedSeqs::new(&refs, true);
    let total: usize = qs.iter().map(Vec::len).sum();
    assert_eq!(p.ids.len(), total - 3 * 40);
    let positions = p.pack.positions();
    for (i, q) in qs.iter().enumerate() {
        for (pos, &t) in q.iter().enumerate() {
            assert_eq!(p.ids[p.row(i, pos)], t, "question {i} token {pos}");
            assert_eq!(
                positions[p.row(i, pos)] as usize,
                pos,
                "question {i} token {pos}"
            );
        }
    }
    let plain = palign::model::llama::PackedSeqs::new(&refs, false);
    assert_eq!(
        (plain.ids.len(), plain.pack.prefixes().is_none()),
        (total, true)
    );
}

/// Generation's prefill shares prompt prefixes (few-shot exemplars): prompts batched
/// together generate exactly what each generates alone (greedy, and seeded sampling),
/// with Mistral's window (8) shorter than the shared part, and identical prompts too.
#[test]
fn generation_with_shared_prompt_prefixes_matches_each_prompt_alone() {
    use palign::model::generate::{generate, GenConfig};
    let header = ids(20, 120);
    let mut prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| [header.clone(), ids(3 + i, 130 + i as u64)].concat())
        .collect();
    // An identical prompt next to its original: they share all but the last token.
    prompts.insert(2, prompts[1].clone());
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let packed = palign::model::llama::PackedSeqs::new(&refs, true);
    assert!(packed.pack.prefixes().is_some());
    // Greedy grouping: [p0], [p1, p1'] sharing all but a token, [p2, p3] the header.
    let total: usize = prompts.iter().map(Vec::len).sum();
    assert_eq!(
        packed.ids.len(),
        total - (prompts[1].len() - 1) - header.len()
    );
    for name in ["tiny-llama", "tiny-mistral"] {
        let m = model(name);
        for temperature in [0.0, 0.8] {
            let cfg = |batch_size| GenConfig {
                max_new_tokens: 12,
                temperature,
                top_k: 0,
                top_p: 1.0,
                seed: 5,
                eos_ids: vec![],
                batch_size,
                row_max_new_tokens: Vec::new(),
            };
            let alone = generate(&m, None, &prompts, &cfg(1), None, |_| {}).unwrap();
            // 8: one shared prefill; 3: shared prefills into slots freed by earlier rows.
            for batch in [8, 3] {
                let together = generate(&m, None, &prompts, &cfg(batch), None, |_| {}).unwrap();
                assert_eq!(
                    together, alone,
                    "{name} temperature {temperature} batch {batch}"
                );
            }
        }
    }
}
