//! `palign sft` / `palign dpo` against peft + torch + TRL's formula, step for step
//! (fixtures from tools/make_train_fixtures.py): tiny LLaMA and Mistral, a nonzero
//! initial adapter on all 7 projections, 12 token-id rows in file order, batch 4,
//! 3 AdamW steps with clipping active; LoRA on the f32 base and QLoRA on the NF4 base.

use palign::model::llama::PROJ_NAMES;
use palign::model::weights::{to_f32, Weights};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn adapter(dir: &Path) -> Vec<f32> {
    let w = Weights::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
    let mut out = Vec::new();
    for l in 0..2 {
        for p in PROJ_NAMES {
            let block = if matches!(p, "gate_proj" | "up_proj" | "down_proj") {
                "mlp"
            } else {
                "self_attn"
            };
            for ab in ["A", "B"] {
                let e = w
                    .get(&format!(
                        "base_model.model.model.layers.{l}.{block}.{p}.lora_{ab}.weight"
                    ))
                    .unwrap();
                out.extend(to_f32(w.bytes(e), e.dtype).unwrap());
            }
        }
    }
    out
}

fn palign(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_palign"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "palign {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs one training and checks every step's metrics and the final adapter.
fn check(base: &str, method: &str, peft: &str, model_dir: &str) {
    let t = fx().join("train").join(base);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let model = fx().join(model_dir);
    let init = t.join("init_adapter");
    let (data, extra): (PathBuf, Vec<&str>) = if method == "sft" {
        (
            t.join("sft_rows.jsonl"),
            vec![
                "--grad-accum",
                "1",
                "--weight-decay",
                "0.01",
                "--max-grad-norm",
                "0.3",
                "--warmup-steps",
                "0",
            ],
        )
    } else {
        (
            t.join("dpo_pairs.jsonl"),
            vec![
                "--weight-decay",
                "0",
                "--max-grad-norm",
                "1.0",
                "--beta",
                "0.1",
            ],
        )
    };
    let data = format!("jsonl:{}", data.display());
    let mut args = vec![
        method,
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend([
        "--init-adapter",
        init.to_str().unwrap(),
        "--no-shuffle",
        "--dropout",
        "0",
        "--batch-size",
        "4",
    ]);
    args.extend([
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--scheduler",
        "constant",
        "--peft",
        peft,
    ]);
    args.extend(extra);
    palign(&args);

    let prefix = if peft == "qlora" { "qlora_" } else { "" };
    let want = jsonl(&t.join(format!("expected/{prefix}{method}_steps.jsonl")));
    let got = jsonl(&out.join("metrics.jsonl"));
    assert_eq!(got.len(), want.len());
    let what = format!("{base} {method} {peft} ({model_dir})");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["step"], w["step"]);
        assert_eq!(g["tokens"], w["tokens"], "{what}");
        for (k, wv) in w.as_object().unwrap() {
            let (Some(wv), Some(gv)) = (wv.as_f64(), g[k].as_f64()) else {
                continue;
            };
            let ok = if k.starts_with("rewards/") {
                // β·(π − r) of ~100-nat f32 sums: ~1e-6 absolute noise on both sides.
                (gv - wv).abs() <= 1e-5
            } else {
                (gv - wv).abs() <= 1e-5 * wv.abs().max(1e-3)
            };
            assert!(
                ok,
                "{what} step {} {k}: palign {gv} vs reference {wv}",
                w["step"]
            );
        }
    }
    // Final adapter: distance to the reference within 1e-4 of the update's norm.
    let a0 = adapter(&init);
    let want = adapter(&t.join(format!("expected/{prefix}{method}_final_adapter")));
    let got = adapter(&out);
    // AdamW's first steps move each weight by about lr·sign(g), so an element whose
    // gradient sits at f32 noise level (|g| ≲ 1e-7) may step either way in either
    // implementation. At most 1 in 5000 elements may be such a coin flip (its difference
    // still bounded by the 3 steps' 2·lr each); all others must meet 1e-4 of the update.
    let update = (0..a0.len())
        .map(|i| ((want[i] - a0[i]) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let mut diffs: Vec<f64> = (0..a0.len())
        .map(|i| (got[i] - want[i]).abs() as f64)
        .collect();
    diffs.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let flips = diffs.iter().take_while(|&&d| d > 1e-4 * update).count();
    assert!(
        flips <= a0.len() / 5000,
        "{what}: {flips} elements differ by more than 1e-4 of the update"
    );
    assert!(
        diffs[0] <= 6e-3,
        "{what}: an element differs by {} (more than 3 steps of 2·lr)",
        diffs[0]
    );
    let diff = diffs[flips..].iter().map(|d| d * d).sum::<f64>().sqrt();
    assert!(update > 1e-3, "{what}: the reference update is empty");
    assert!(
        diff <= 1e-4 * update,
        "{what}: |palign − reference| = {diff:e}, update norm {update:e}"
    );
}

#[test]
fn sft_lora_matches_peft() {
    check("tiny-llama", "sft", "lora", "tiny-llama");
    check("tiny-mistral", "sft", "lora", "tiny-mistral");
}

#[test]
fn dpo_lora_matches_trl_formula() {
    check("tiny-llama", "dpo", "lora", "tiny-llama");
    check("tiny-mistral", "dpo", "lora", "tiny-mistral");
}

#[test]
fn sft_qlora_matches_peft_on_bnb_4bit() {
    check("tiny-llama", "sft", "qlora", "tiny-llama-bnb-4bit");
    check("tiny-mistral", "sft", "qlora", "tiny-mistral-bnb-4bit");
    // quantized at load from the f32 weights: the same NF4 base
    check("tiny-llama", "sft", "qlora", "tiny-llama");
}

#[test]
fn dpo_qlora_matches_trl_formula_on_bnb_4bit() {
    check("tiny-llama", "dpo", "qlora", "tiny-llama-bnb-4bit");
    check("tiny-mistral", "dpo", "qlora", "tiny-mistral");
}

/// 6 steps straight and 3 + `--resume` 3 give byte-identical adapters (two epochs of
/// shuffled data, dropout on, cosine schedule with warm-up).
#[test]
fn resume_continues_exactly() {
    let t = fx().join("train/tiny-mistral");
    let d = tempfile::tempdir().unwrap();
    let data = format!("jsonl:{}", t.join("sft_rows.jsonl").display());
    let model = fx().join("tiny-mistral");
    let run = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "sft",
            "--quiet",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend([
            "--peft",
            "qlora",
            "--rank",
            "4",
            "--targets",
            "all",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
        ]);
        a.extend([
            "--steps",
            "6",
            "--lr",
            "1e-3",
            "--scheduler",
            "cosine",
            "--warmup-steps",
            "2",
            "--dropout",
            "0.1",
            "--seed",
            "3",
        ]);
        a.extend(extra);
        palign(&a);
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run(&a, &[]);
    run(&b, &["--save-every", "3", "--stop-after", "3"]);
    assert!(
        !b.join("adapter_model.safetensors").exists(),
        "an interrupted run has no final adapter"
    );
    run(&b, &["--resume"]);
    let fa = std::fs::read(a.join("adapter_model.safetensors")).unwrap();
    let fb = std::fs::read(b.join("adapter_model.safetensors")).unwrap();
    assert!(fa == fb, "resumed adapter differs from the straight run");
    let ma = jsonl(&a.join("metrics.jsonl"));
    let mb = jsonl(&b.join("metrics.jsonl"));
    assert_eq!(ma.len(), 6);
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(
            (x["step"].clone(), x["loss"].clone()),
            (y["step"].clone(), y["loss"].clone())
        );
    }
    // a finished run is not overwritten
    let o = Command::new(env!("CARGO_BIN_EXE_palign"))
        .args([
            "sft",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--out",
            a.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds a run"));
}
