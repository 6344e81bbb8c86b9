//! `palign score` against transformers: per-token log-probs recorded by
//! tools/make_fixtures.py (transformers, f32, eager attention) for tiny LLaMA and
//! Mistral (GQA 4:2, sliding window 8, tied embeddings, sharded), f32 and bf16 files.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs the real binary, then compares every row's sum and tokens to transformers.
fn check(model: &str, data: &str, template: &str, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.jsonl");
    let st = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(["score", "--quiet", "--template", template, "--model"])
        .arg(fixtures().join(model))
        .arg("--data")
        .arg(fixtures().join("data").join(data))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let got = read_jsonl(&out);
    let want = read_jsonl(&fixtures().join("expected").join(model).join(expected));
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let wt = w["token_logps"].as_array().unwrap();
        let gt = g["token_logps"].as_array().unwrap();
        assert_eq!(
            g["n_tokens"].as_u64().unwrap() as usize,
            wt.len(),
            "{model}/{expected} row {i}: token count"
        );
        assert_eq!(gt.len(), wt.len());
        let d = (g["logp"].as_f64().unwrap() - w["logp"].as_f64().unwrap()).abs();
        assert!(d <= 1e-4, "{model}/{expected} row {i}: |Δ logp| = {d}");
        for (a, b) in gt.iter().zip(wt) {
            assert!(
                (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 2e-5,
                "{model}/{expected} row {i}"
            );
        }
    }
}

#[test]
fn token_id_rows_match_transformers() {
    for m in [
        "tiny-llama",
        "tiny-mistral",
        "tiny-llama-bf16",
        "tiny-mistral-bf16",
    ] {
        check(m, "score_ids.jsonl", "none", "ids.jsonl");
    }
}

#[test]
fn text_rows_match_transformers_for_every_template() {
    for m in [
        "tiny-llama",
        "tiny-mistral",
        "tiny-llama-bf16",
        "tiny-mistral-bf16",
    ] {
        for t in ["none", "vicuna", "mistral"] {
            check(m, "score_text.jsonl", t, &format!("text-{t}.jsonl"));
        }
    }
}

/// Tokenization alone: palign's ids and prompt lengths equal transformers' for text rows,
/// and the rendered template strings are byte-identical.
#[test]
fn text_rows_tokenize_like_transformers() {
    use palign::data::{encode_pair, PairText};
    use palign::model::{Template, Tokenizer};
    let dir = fixtures().join("tiny-llama");
    let tok = Tokenizer::load(&dir, None, None).unwrap();
    let rows = read_jsonl(&fixtures().join("data/score_text.jsonl"));
    for t in ["none", "vicuna", "mistral"] {
        let template: Template = t.parse().unwrap();
        let want = read_jsonl(&fixtures().join(format!("expected/tiny-llama/text-{t}.jsonl")));
        for (r, w) in rows.iter().zip(&want) {
            let pair = PairText {
                prompt: r["prompt"].as_str().unwrap(),
                completion: r["completion"].as_str().unwrap(),
            };
            assert_eq!(
                template.prompt(pair.prompt),
                w["prompt_text"].as_str().unwrap()
            );
            assert_eq!(
                template.completion(pair.completion),
                w["completion_text"].as_str().unwrap()
            );
            let (ids, plen) = encode_pair(&tok, template, &pair).unwrap();
            let wids: Vec<u32> = w["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, wids, "template {t}");
            assert_eq!(plen, w["prompt_len"].as_u64().unwrap() as usize);
            assert_eq!(
                ids.iter().filter(|&&i| i == 1).count(),
                1,
                "exactly one BOS"
            );
        }
    }
}
