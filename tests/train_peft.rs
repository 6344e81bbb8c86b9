//! `palign sft` / `palign dpo` against peft + torch + TRL's formula, step for step
//! (fixtures from tools/make_train_fixtures.py): tiny LLaMA and Mistral, a nonzero
//! initial adapter on all 7 projections, 12 token-id rows in file order, batch 4,
//! 3 AdamW steps with clipping active; LoRA on the f32 base and QLoRA on the NF4 base.

mod common;
use common::*;

use palign::model::llama::PROJ_NAMES;
use palign::model::weights::{to_f32, Weights};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

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
            let ok = if k.starts_with("rewards/") && k != "rewards/accuracies" {
                // Rewards are β·(π − r), differences of ~100-nat sequence log-probs: hold
                // them to what 1e-5 relative on those log-probs allows (β = 0.1).
                let logps = w["logps/chosen"].as_f64().unwrap().abs()
                    + w["logps/rejected"].as_f64().unwrap().abs();
                (gv - wv).abs() <= 0.1 * 1e-5 * logps
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
        .env("PALIGN_DEVICE", "cpu")
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

fn dpo_run(out: &Path, extra: &[&str]) -> Vec<Value> {
    let t = fx().join("train/tiny-llama");
    let data = format!("jsonl:{}", t.join("dpo_pairs.jsonl").display());
    dpo_run_on(out, &data, "4", extra)
}

/// The tiny-llama DPO run of these tests on `data` with `batch` pairs per step.
fn dpo_run_on(out: &Path, data: &str, batch: &str, extra: &[&str]) -> Vec<Value> {
    dpo_run_dropout(out, data, batch, "0", extra)
}

/// `dpo_run_on` with `--dropout dropout`.
fn dpo_run_dropout(
    out: &Path,
    data: &str,
    batch: &str,
    dropout: &str,
    extra: &[&str],
) -> Vec<Value> {
    let t = fx().join("train/tiny-llama");
    let model = fx().join("tiny-llama");
    let init = t.join("init_adapter");
    let mut a = vec![
        "dpo",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data,
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend([
        "--init-adapter",
        init.to_str().unwrap(),
        "--no-shuffle",
        "--dropout",
        dropout,
        "--batch-size",
        batch,
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--peft",
        "lora",
    ]);
    a.extend(extra);
    palign(&a);
    jsonl(&out.join("metrics.jsonl"))
}

/// DPO trains without dropout unless --keep-dropout, as TRL's DPOTrainer does
/// (disable_dropout): with --dropout 0.05 every metric equals the --dropout 0 run's, the
/// adapter records lora_dropout 0.05 as peft would, and --keep-dropout changes the losses.
#[test]
fn dpo_disables_dropout_like_trl_unless_kept() {
    let d = tempfile::tempdir().unwrap();
    let data = format!(
        "jsonl:{}",
        fx().join("train/tiny-llama/dpo_pairs.jsonl").display()
    );
    let off = dpo_run_dropout(&d.path().join("off"), &data, "4", "0.05", &[]);
    let zero = dpo_run_dropout(&d.path().join("zero"), &data, "4", "0", &[]);
    let kept = dpo_run_dropout(
        &d.path().join("kept"),
        &data,
        "4",
        "0.05",
        &["--keep-dropout"],
    );
    let losses =
        |m: &[Value]| -> Vec<f64> { m.iter().map(|r| r["loss"].as_f64().unwrap()).collect() };
    for (a, b) in off.iter().zip(&zero) {
        for k in ["loss", "grad_norm", "rewards/chosen", "logps/rejected"] {
            assert_eq!(a[k], b[k], "step {} {k}", a["step"]);
        }
    }
    assert_ne!(
        losses(&kept),
        losses(&zero),
        "--keep-dropout applied no dropout"
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("off/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["lora_dropout"].as_f64(), Some(0.05));
    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("off/run.json")).unwrap())
            .unwrap();
    assert_eq!(run["settings"]["keep_dropout"], Value::Bool(false));
}

/// A DPO checkpoint from before --keep-dropout (no `keep_dropout` in its settings)
/// applied dropout in training: resuming it needs --keep-dropout, and says so.
#[test]
fn dpo_checkpoints_from_before_keep_dropout_resume_with_it() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let data = format!(
        "jsonl:{}",
        fx().join("train/tiny-llama/dpo_pairs.jsonl").display()
    );
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "dpo",
            "--quiet",
            "--model",
            "",
            "--data",
            &data,
            "--out",
            "",
            "--no-shuffle",
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--peft",
            "lora",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a[3] = fx().join("tiny-llama").display().to_string();
        a[7] = out.display().to_string();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let call = |extra: &[&str]| {
        let a = args(extra);
        common::run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // An old-rule run: dropout applied in step 1, no keep_dropout in its settings.
    assert!(call(&["--stop-after", "1", "--keep-dropout"])
        .status
        .success());
    for f in ["run.json", "checkpoint/state.json"] {
        let p = out.join(f);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("keep_dropout"), "{f} has no keep_dropout");
        let mut v: Value = serde_json::from_str(&text).unwrap();
        fn strip(v: &mut Value) {
            if let Some(o) = v.as_object_mut() {
                o.remove("keep_dropout");
                o.values_mut().for_each(strip);
            }
        }
        strip(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    }
    let o = call(&["--resume"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("resume with --keep-dropout"), "{err}");
    assert!(call(&["--resume", "--keep-dropout"]).status.success());
    // The resumed run is the whole run with --keep-dropout, step for step.
    let resumed = jsonl(&out.join("metrics.jsonl"));
    std::fs::rename(&out, d.path().join("resumed")).unwrap();
    assert!(call(&["--keep-dropout"]).status.success());
    let whole = jsonl(&out.join("metrics.jsonl"));
    assert_eq!(resumed.len(), 3);
    for (a, b) in resumed.iter().zip(&whole) {
        assert_eq!(a["loss"], b["loss"], "step {}", a["step"]);
    }
}

/// With the reference = the initial adapter (TRL's default when handed a trained
/// adapter), the first step has policy = reference: zero rewards, loss log 2 (sigmoid)
/// or (1/(2β))² (IPO), whatever the data.
#[test]
fn dpo_ref_adapter_and_ipo_start_from_zero_margin() {
    let d = tempfile::tempdir().unwrap();
    let init = fx().join("train/tiny-llama/init_adapter");
    let m = dpo_run(
        &d.path().join("a"),
        &["--ref-adapter", init.to_str().unwrap()],
    );
    assert!(
        (m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        m[0]
    );
    assert!(m[0]["rewards/chosen"].as_f64().unwrap().abs() < 1e-6);
    assert!(
        m[1]["rewards/margins"].as_f64().unwrap().abs() > 1e-4,
        "the policy moves away from the reference"
    );
    let m = dpo_run(
        &d.path().join("b"),
        &[
            "--ref-adapter",
            init.to_str().unwrap(),
            "--loss",
            "ipo",
            "--beta",
            "0.1",
        ],
    );
    assert!(
        (m[0]["loss"].as_f64().unwrap() - 25.0).abs() < 1e-4,
        "{}",
        m[0]
    );
}

/// `--precompute-ref` stores the reference log-probs once and trains exactly as the
/// on-the-fly reference does; a resumed run reuses the stored file.
#[test]
fn dpo_precomputed_reference_is_the_same_reference() {
    let d = tempfile::tempdir().unwrap();
    let a = dpo_run(&d.path().join("a"), &[]);
    let out = d.path().join("b");
    let b = dpo_run(&out, &["--precompute-ref"]);
    for (x, y) in a.iter().zip(&b) {
        for k in ["loss", "logps/chosen", "rewards/margins", "grad_norm"] {
            assert!(
                (x[k].as_f64().unwrap() - y[k].as_f64().unwrap()).abs()
                    <= 1e-6 * x[k].as_f64().unwrap().abs().max(1.0),
                "{k}"
            );
        }
    }
    let refs = std::fs::read_to_string(out.join("ref_logps.jsonl")).unwrap();
    assert_eq!(refs.lines().count(), 12);
    let c = d.path().join("c");
    dpo_run(
        &c,
        &["--precompute-ref", "--save-every", "1", "--stop-after", "1"],
    );
    let stored = std::fs::read_to_string(c.join("ref_logps.jsonl")).unwrap();
    assert_eq!(stored, refs);
    // Tamper with the stored reference: the resumed run must use the file, not recompute.
    let shifted: String = stored
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!("{}\n", serde_json::json!({"chosen": v["chosen"].as_f64().unwrap() - 1.0, "rejected": v["rejected"]}))
        })
        .collect();
    std::fs::write(c.join("ref_logps.jsonl"), shifted).unwrap();
    let m = dpo_run(&c, &["--precompute-ref", "--save-every", "1", "--resume"]);
    let r2 = m[1]["rewards/chosen"].as_f64().unwrap();
    assert!(
        (r2 - b[1]["rewards/chosen"].as_f64().unwrap() - 0.1).abs() < 1e-3,
        "resume ignored the stored reference"
    );
}

/// Held-out pairs are scored against their own reference log-probs with
/// `--precompute-ref` too (the stored rows are the training pairs'): the eval metrics
/// equal those of the on-the-fly reference, with more eval pairs than training pairs.
#[test]
fn dpo_eval_with_precomputed_reference_uses_the_eval_pairs_reference() {
    let d = tempfile::tempdir().unwrap();
    let t = fx().join("train/tiny-llama");
    let all = std::fs::read_to_string(t.join("dpo_pairs.jsonl")).unwrap();
    let train: String = all.lines().take(2).map(|l| format!("{l}\n")).collect();
    let train_path = d.path().join("train.jsonl");
    std::fs::write(&train_path, train).unwrap();
    let data = format!("jsonl:{}", train_path.display());
    let eval = format!("jsonl:{}", t.join("dpo_pairs.jsonl").display());
    let run = |name: &str, extra: &[&str]| -> Vec<Value> {
        let mut a = vec!["--eval-data", eval.as_str(), "--eval-every", "1"];
        a.extend(extra);
        dpo_run_on(&d.path().join(name), &data, "2", &a)
            .into_iter()
            .filter(|r| r.get("eval_loss").is_some())
            .collect()
    };
    let fly = run("fly", &[]);
    let pre = run("pre", &["--precompute-ref"]);
    assert_eq!(fly.len(), 2, "{fly:?}");
    assert_eq!(pre.len(), fly.len());
    for (x, y) in fly.iter().zip(&pre) {
        for k in [
            "eval_loss",
            "eval_rewards/margins",
            "eval_rewards/accuracies",
        ] {
            let (a, b) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{k}: {a} vs {b}");
        }
    }
}

/// The real dataset formats train end to end with chat templates.
#[test]
fn dpo_and_sft_run_on_hh_rlhf_and_beavertails_files() {
    let d = tempfile::tempdir().unwrap();
    let model = fx().join("tiny-mistral");
    let hh = format!("hh-rlhf:{}", fx().join("datasets/hh-rlhf").display());
    let pku = format!(
        "pku-saferlhf:{}:harmless",
        fx().join("datasets/pku-saferlhf").display()
    );
    for (cmd, tpl) in [("dpo", "mistral"), ("sft", "vicuna")] {
        let out = d.path().join(cmd);
        palign(&[
            cmd,
            "--quiet",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &hh,
            "--data",
            &pku,
            "--out",
            out.to_str().unwrap(),
            "--template",
            tpl,
            "--peft",
            "qlora",
            "--rank",
            "2",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--steps",
            "2",
            "--max-length",
            "96",
            "--max-prompt-length",
            "48",
        ]);
        let m = jsonl(&out.join("metrics.jsonl"));
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|r| r["loss"].as_f64().unwrap().is_finite()));
        let run: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        assert_eq!(run["finished"], true);
        assert!(
            run["data"].to_string().contains("sha256:"),
            "data file hashes in run.json"
        );
    }
}

/// DPO resumes exactly too (cosine schedule, dropout, two epochs, accumulation).
#[test]
fn dpo_resume_continues_exactly() {
    let t = fx().join("train/tiny-llama");
    let d = tempfile::tempdir().unwrap();
    let data = format!("jsonl:{}", t.join("dpo_pairs.jsonl").display());
    let model = fx().join("tiny-llama");
    let run = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "dpo",
            "--quiet",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend([
            "--rank",
            "4",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--steps",
            "5",
            "--lr",
            "1e-3",
            "--seed",
            "9",
        ]);
        a.extend(extra);
        palign(&a);
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run(&a, &[]);
    run(&b, &["--save-every", "2", "--stop-after", "3"]);
    run(&b, &["--resume"]);
    assert!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(b.join("adapter_model.safetensors")).unwrap()
    );
}

/// `--quant nf4` on the trainers is QLoRA: the same run as `--peft qlora`.
#[test]
fn quant_nf4_flag_is_qlora() {
    let d = tempfile::tempdir().unwrap();
    let t = fx().join("train/tiny-llama");
    let data = format!("jsonl:{}", t.join("sft_rows.jsonl").display());
    let model = fx().join("tiny-llama");
    let run = |out: &Path, flag: &[&str]| {
        let mut a = vec![
            "sft",
            "--quiet",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--out",
            out.to_str().unwrap(),
            "--rank",
            "4",
            "--batch-size",
            "4",
            "--steps",
            "2",
        ];
        a.extend(flag);
        palign(&a);
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    };
    let a = run(&d.path().join("a"), &["--peft", "qlora"]);
    let b = run(&d.path().join("b"), &["--peft", "lora", "--quant", "nf4"]);
    let c = run(&d.path().join("c"), &["--peft", "lora"]);
    assert!(a == b, "--quant nf4 must train on the NF4 base");
    assert!(a != c, "LoRA on the f32 base differs from QLoRA");
}
