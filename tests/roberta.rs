//! RoBERTa sequence classifier against transformers: token ids and logits recorded by
//! tools/make_roberta_fixtures.py (tiny random RobertaForSequenceClassification, one
//! logit, byte-level BPE, f32 eval mode, one pair per call), including longest-first
//! truncation at max_length 40.

use palign::model::roberta::{position_ids, RobertaClassifier};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/roberta")
}

struct Row {
    prompt: String,
    response: String,
    max_length: usize,
    ids: Vec<u32>,
    logits: Vec<f32>,
}

fn expected() -> Vec<Row> {
    let p = fixtures().join("expected.jsonl");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let nums = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap());
            Row {
                prompt: v["prompt"].as_str().unwrap().to_string(),
                response: v["response"].as_str().unwrap().to_string(),
                max_length: v["max_length"].as_u64().unwrap() as usize,
                ids: nums("ids").map(|x| x as u32).collect(),
                logits: nums("logits").map(|x| x as f32).collect(),
            }
        })
        .collect()
}

fn model() -> RobertaClassifier {
    RobertaClassifier::load(&fixtures().join("model")).unwrap()
}

#[test]
fn token_ids_match_transformers() {
    let m = model();
    let rows = expected();
    // The fixture must exercise truncation, an empty side, and a literal pad token.
    assert!(rows.iter().any(|r| r.max_length == 40 && r.ids.len() == 40));
    assert!(rows.iter().any(|r| r.response.is_empty()));
    assert!(rows
        .iter()
        .any(|r| r.ids[1..].contains(&m.cfg.pad_token_id)));
    for r in &rows {
        let ids = m.encode_pair(&r.prompt, &r.response, r.max_length).unwrap();
        assert_eq!(ids, r.ids, "{:?} / {:?}", r.prompt, r.response);
    }
}

#[test]
fn logits_match_transformers() {
    let m = model();
    let rows = expected();
    for max_length in [40, 64] {
        let group: Vec<&Row> = rows.iter().filter(|r| r.max_length == max_length).collect();
        assert!(group.len() >= 3);
        let pairs: Vec<(String, String)> = group
            .iter()
            .map(|r| (r.prompt.clone(), r.response.clone()))
            .collect();
        let got = m.score_pairs(&pairs, 4, max_length).unwrap();
        assert_eq!(got.len(), group.len());
        for (g, r) in got.iter().zip(&group) {
            assert_eq!(g.len(), 1, "one logit per pair");
            let d = (g[0] - r.logits[0]).abs();
            assert!(
                d <= 1e-4,
                "{:?}: {} vs {} (Δ {d})",
                r.prompt,
                g[0],
                r.logits[0]
            );
        }
    }
}

#[test]
fn batching_does_not_change_results() {
    let m = model();
    let pairs: Vec<(String, String)> = expected()
        .iter()
        .filter(|r| r.max_length == 64)
        .map(|r| (r.prompt.clone(), r.response.clone()))
        .collect();
    let one = m.score_pairs(&pairs, 1, 64).unwrap();
    for batch in [2, 3, pairs.len()] {
        let got = m.score_pairs(&pairs, batch, 64).unwrap();
        for (a, b) in got.iter().zip(&one) {
            assert!(
                (a[0] - b[0]).abs() <= 1e-6,
                "batch {batch}: {} vs {}",
                a[0],
                b[0]
            );
        }
    }
}

#[test]
fn positions_follow_roberta() {
    // pad = 1: the first real token sits at position 2; a pad inside keeps position 1.
    assert_eq!(position_ids(&[0, 9, 2], 1), [2, 3, 4]);
    assert_eq!(position_ids(&[0, 1, 2], 1), [2, 1, 3]);
}

#[test]
fn bad_inputs_are_bad_input() {
    let m = model();
    let pair = vec![("a".to_string(), "b".to_string())];
    // 64 positions in the tiny model's table (66 − pad − 1).
    assert!(m.score_pairs(&pair, 1, 65).unwrap_err().is_bad_input());
    assert!(m.score_pairs(&pair, 0, 64).unwrap_err().is_bad_input());
    assert!(m.score_pairs(&pair, 1, 3).unwrap_err().is_bad_input());
    assert!(m.score_ids(&[vec![0, 400, 2]]).unwrap_err().is_bad_input());

    let src = fixtures().join("model");
    for (missing, also_bin) in [
        ("config.json", false),
        ("model.safetensors", false),
        ("model.safetensors", true),
        ("tokenizer.json", false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            if f != missing {
                std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
            }
        }
        if also_bin {
            std::fs::write(dir.path().join("pytorch_model.bin"), b"not read").unwrap();
        }
        let err = match RobertaClassifier::load(dir.path()) {
            Ok(_) => panic!("loaded without {missing}"),
            Err(e) => e,
        };
        assert!(err.is_bad_input(), "{missing}: {err}");
        if also_bin {
            assert!(err.to_string().contains("safetensors"), "{err}");
        }
    }

    // A config the encoder cannot compute is refused, not mis-scored.
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"gelu\"", "\"gelu_new\""),
    )
    .unwrap();
    let err = RobertaClassifier::load(dir.path()).err().expect("gelu_new");
    assert!(
        err.is_bad_input() && err.to_string().contains("gelu"),
        "{err}"
    );
}
