//! Crash safety of training: kill -9 at arbitrary moments (inside steps and inside
//! checkpoint saves), `--resume` each time, and the run still ends with exactly the
//! adapter of an uninterrupted run. A diverging run stops and keeps its last good
//! checkpoint.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn args(out: &Path, steps: &str, extra: &[&str]) -> Vec<String> {
    args_lr(out, steps, "1e-3", extra)
}

fn args_lr(out: &Path, steps: &str, lr: &str, extra: &[&str]) -> Vec<String> {
    let t = fx().join("train/tiny-mistral");
    let mut a: Vec<String> = vec![
        "sft".into(),
        "--quiet".into(),
        "--model".into(),
        fx().join("tiny-mistral").to_string_lossy().into(),
        "--data".into(),
        format!("jsonl:{}", t.join("sft_rows.jsonl").display()),
        "--out".into(),
        out.to_string_lossy().into(),
    ];
    for s in [
        "--peft",
        "lora",
        "--rank",
        "4",
        "--targets",
        "all",
        "--batch-size",
        "4",
        "--lr",
        lr,
        "--dropout",
        "0.1",
        "--steps",
        steps,
        "--save-every",
        "1",
    ] {
        a.push(s.into());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Whether `out/run.json` records a finished run.
fn finished(out: &std::path::Path) -> bool {
    std::fs::read_to_string(out.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["finished"].as_bool() == Some(true))
}

#[test]
fn kill_9_at_random_moments_then_resume_gives_the_same_adapter() {
    let d = tempfile::tempdir().unwrap();
    let straight = d.path().join("straight");
    let st = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(args(&straight, "30", &[]))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let want = std::fs::read(straight.join("adapter_model.safetensors")).unwrap();

    let out = d.path().join("killed");
    let mut kills = 0;
    // Kill after a varying delay; the delays sweep through step and save phases.
    let mut delay_ms = 7u64;
    for attempt in 0..200 {
        let resume: &[&str] = if attempt == 0 { &[] } else { &["--resume"] };
        let mut child = Command::new(env!("CARGO_BIN_EXE_palign"))
            .env("PALIGN_DEVICE", "cpu")
            .args(args(&out, "30", resume))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        delay_ms = delay_ms * 7 % 97 + 5;
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "attempt {attempt} failed");
                if out.join("adapter_model.safetensors").exists() {
                    break;
                }
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                // The kill can land after the run wrote its last file (run.json says
                // finished) but before it exited: then there is nothing left to resume,
                // and `--resume` rightly refuses.
                if finished(&out) {
                    break;
                }
            }
        }
    }
    assert!(
        kills >= 3,
        "the runs finished too fast to be interrupted ({kills} kills)"
    );
    // Let a last resume finish whatever is left.
    if !out.join("adapter_model.safetensors").exists() {
        let st = Command::new(env!("CARGO_BIN_EXE_palign"))
            .env("PALIGN_DEVICE", "cpu")
            .args(args(&out, "30", &["--resume"]))
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    let got = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert!(
        got == want,
        "after {kills} kills the adapter differs from the uninterrupted run"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty() || kills > 0, "{leftovers:?}");
}

/// A run that fails after it started writing, before any checkpoint, keeps what it wrote:
/// run.json makes the folder resumable, and the metrics are the divergence's record.
#[test]
fn a_run_diverging_before_its_first_checkpoint_keeps_its_folder() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let mut args = args_lr(&out, "6", "1e30", &["--max-grad-norm", "1e30"]);
    let at = args.iter().position(|a| a == "--save-every").unwrap();
    args[at + 1] = "0".into(); // the first checkpoint would be the last step
    let o = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!out.join("checkpoint").exists(), "no checkpoint was due");
    assert!(out.join("run.json").is_file(), "run.json removed: {stderr}");
    assert!(
        out.join("metrics.jsonl").is_file(),
        "metrics removed: {stderr}"
    );
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(args_lr(&out, "6", "1e30", &["--max-grad-norm", "1e30"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("training stopped") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 1, "a good step was checkpointed");
    // the checkpoint holds finite weights
    let w = palign::model::weights::Weights::open_files(&[
        out.join("checkpoint/adapter_model.safetensors")
    ])
    .unwrap();
    for n in w.names() {
        let e = w.get(n).unwrap();
        assert!(
            palign::model::weights::to_f32(w.bytes(e), e.dtype)
                .unwrap()
                .iter()
                .all(|v| v.is_finite()),
            "{n}"
        );
    }
}
