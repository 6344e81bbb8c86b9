//! Adapters move between palign and PEFT both ways:
//! - one PEFT wrote (tests/fixtures/train/*/init_adapter) scores in palign like in PEFT;
//! - one palign wrote (train/tiny-mistral/palign_adapter, from `palign sft`) loads in
//!   `peft.PeftModel.from_pretrained` (tools/check_peft_roundtrip.py) and scores the same;
//! - palign still writes that adapter_config.json, field for field.

mod common;
use common::*;

use serde_json::Value;
use std::path::Path;

fn score_with_adapter(base: &str, adapter: &Path, expected: &Path) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("s.jsonl");
    let model = fx().join(base);
    let data = fx().join("data/score_ids.jsonl");
    palign(&[
        "score",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let (got, want) = (jsonl(&out), jsonl(expected));
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = (g["logp"].as_f64().unwrap() - w["logp"].as_f64().unwrap()).abs();
        assert!(
            d <= 1e-4,
            "{base} row {i}: |Δ logp| {d} ({})",
            adapter.display()
        );
    }
}

#[test]
fn peft_written_adapters_score_like_peft() {
    for base in ["tiny-llama", "tiny-mistral"] {
        let t = fx().join("train").join(base);
        score_with_adapter(
            base,
            &t.join("init_adapter"),
            &t.join("expected/adapter_scores.jsonl"),
        );
    }
}

#[test]
fn palign_written_adapter_loads_in_peft_with_the_same_scores() {
    let t = fx().join("train/tiny-mistral");
    score_with_adapter(
        "tiny-mistral",
        &t.join("palign_adapter"),
        &t.join("expected/palign_adapter_peft_scores.jsonl"),
    );
    // palign still writes exactly this config (the one PEFT was shown).
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let data = format!("jsonl:{}", t.join("sft_rows.jsonl").display());
    let model = fx().join("tiny-mistral");
    palign(&[
        "sft",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
        "--peft",
        "lora",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--targets",
        "all",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--dropout",
        "0",
    ]);
    let read = |p: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (mut a, mut b) = (read(&out), read(&t.join("palign_adapter")));
    a["base_model_name_or_path"] = Value::Null;
    b["base_model_name_or_path"] = Value::Null;
    assert_eq!(a, b);
    // safetensors metadata {"format":"pt"} and PEFT's key names
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    assert!(header
        .get("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        .is_some());
}
