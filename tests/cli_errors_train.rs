//! `palign sft` / `dpo` (and `generate`'s sampling flags) on bad input: exit code 2 with
//! one line naming the flag or file at fault, never a panic, and no `--out` folder left
//! behind — so the same command with the input fixed runs. Modelled on cli_errors.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::copy_dir;

fn fixture(name: &str) -> PathBuf {
    common::fx().join(name)
}

fn s(d: &Path, p: &str) -> String {
    d.join(p).to_string_lossy().into_owned()
}

/// A tiny LoRA run into `d/run` (one step, rank 2); `extra` flags replace earlier ones
/// of the same name, or are appended.
fn train_args(d: &Path, method: &str, extra: &[&str]) -> Vec<String> {
    let rows = if method == "dpo" {
        "pairs.jsonl"
    } else {
        "rows.jsonl"
    };
    let a: Vec<String> = vec![
        method.into(),
        "--model".into(),
        s(d, "model"),
        "--data".into(),
        format!("jsonl:{}", s(d, rows)),
        "--out".into(),
        s(d, "run"),
        "--peft".into(),
        "lora".into(),
        "--rank".into(),
        "2".into(),
        "--batch-size".into(),
        "1".into(),
        "--steps".into(),
        "1".into(),
    ];
    common::with_flags(a, extra)
}

fn sft(d: &Path, extra: &[&str]) -> Vec<String> {
    train_args(d, "sft", extra)
}

fn dpo(d: &Path, extra: &[&str]) -> Vec<String> {
    train_args(d, "dpo", extra)
}

fn generate(d: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "generate".to_string(),
        "--model".into(),
        s(d, "model"),
        "--prompts".into(),
        s(d, "rows.jsonl"),
        "--out".into(),
        s(d, "run"),
        "--max-new-tokens".into(),
        "2".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A temp dir with a copy of tiny-llama in `model`, SFT rows in `rows.jsonl`, DPO pairs
/// in `pairs.jsonl` and a PEFT adapter for the model in `adapter`.
fn setup() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama"), &d.path().join("model"));
    copy_dir(
        &fixture("train/tiny-llama/init_adapter"),
        &d.path().join("adapter"),
    );
    std::fs::write(
        d.path().join("rows.jsonl"),
        "{\"prompt_ids\":[5,6],\"completion_ids\":[7]}\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("pairs.jsonl"),
        "{\"prompt_ids\":[5,6],\"chosen_ids\":[7],\"rejected_ids\":[8]}\n",
    )
    .unwrap();
    // Text rows with nothing to train on: every row is dropped.
    std::fs::write(
        d.path().join("empty.jsonl"),
        "{\"prompt\":\"hi\",\"completion\":\"\"}\n",
    )
    .unwrap();
    d
}

fn palign(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .env("RUST_BACKTRACE", "1")
        .args(args)
        .args(["--threads", "1", "--quiet"])
        .output()
        .unwrap()
}

/// Why `o` is not a proper bad-input answer containing `expect`, if it is not.
fn bad_input_problem(o: &Output, expect: &str) -> Option<String> {
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let ok = o.status.code() == Some(2)
        && stderr.contains(expect)
        && !stderr.contains("panicked")
        && !stderr.contains("backtrace")
        && lines.len() == 1;
    (!ok).then(|| format!("exit {:?}, stderr: {stderr}", o.status.code()))
}

struct Case {
    name: &'static str,
    args: fn(&Path) -> Vec<String>,
    expect: &'static str,
}

const CASES: &[Case] = &[
    // Non-finite and out-of-range numbers (NaN/inf used to train to NaN weights, or
    // store `null` in run.json so --resume failed).
    Case {
        name: "weight decay NaN",
        args: |d| sft(d, &["--weight-decay", "NaN"]),
        expect: "--weight-decay must be",
    },
    Case {
        name: "weight decay inf",
        args: |d| sft(d, &["--weight-decay", "inf"]),
        expect: "--weight-decay must be",
    },
    Case {
        name: "adam eps inf",
        args: |d| sft(d, &["--adam-eps", "inf"]),
        expect: "--adam-eps must be",
    },
    Case {
        name: "adam eps zero",
        args: |d| sft(d, &["--adam-eps", "0"]),
        expect: "--adam-eps must be",
    },
    Case {
        name: "adam beta1 NaN",
        args: |d| sft(d, &["--adam-beta1", "NaN"]),
        expect: "--adam-beta1 must be",
    },
    Case {
        name: "adam beta2 one",
        args: |d| sft(d, &["--adam-beta2", "1"]),
        expect: "--adam-beta2 must be",
    },
    Case {
        name: "sft alpha inf",
        args: |d| sft(d, &["--alpha", "inf"]),
        expect: "--alpha must be",
    },
    Case {
        name: "dpo alpha inf",
        args: |d| dpo(d, &["--alpha", "inf"]),
        expect: "--alpha must be",
    },
    Case {
        name: "alpha overflowing f32",
        args: |d| sft(d, &["--alpha", "1e39"]),
        expect: "--alpha must be",
    },
    Case {
        name: "lr inf",
        args: |d| sft(d, &["--lr", "inf"]),
        expect: "--lr must be",
    },
    Case {
        name: "lr NaN",
        args: |d| sft(d, &["--lr", "NaN"]),
        expect: "--lr must be",
    },
    Case {
        name: "max grad norm inf",
        args: |d| sft(d, &["--max-grad-norm", "inf"]),
        expect: "--max-grad-norm must be",
    },
    Case {
        name: "dpo beta NaN",
        args: |d| dpo(d, &["--beta", "NaN"]),
        expect: "--beta must be",
    },
    Case {
        name: "label smoothing NaN",
        args: |d| dpo(d, &["--label-smoothing", "NaN"]),
        expect: "--label-smoothing must be",
    },
    // Negative numbers written with a space reach the flag's own check.
    Case {
        name: "negative lr with a space",
        args: |d| sft(d, &["--lr", "-1"]),
        expect: "--lr must be",
    },
    Case {
        name: "negative dropout with a space",
        args: |d| sft(d, &["--dropout", "-0.1"]),
        expect: "--dropout must be",
    },
    Case {
        name: "negative weight decay with a space",
        args: |d| sft(d, &["--weight-decay", "-0.01"]),
        expect: "--weight-decay must be",
    },
    Case {
        name: "negative beta with a space",
        args: |d| dpo(d, &["--beta", "-1"]),
        expect: "--beta must be",
    },
    Case {
        name: "negative label smoothing with a space",
        args: |d| dpo(d, &["--label-smoothing", "-0.1"]),
        expect: "--label-smoothing must be",
    },
    Case {
        name: "minus infinity with a space",
        args: |d| sft(d, &["--weight-decay", "-inf"]),
        expect: "--weight-decay must be",
    },
    Case {
        name: "negative step count with a space",
        args: |d| sft(d, &["--steps", "-1"]),
        expect: "--steps",
    },
    Case {
        name: "negative temperature with a space",
        args: |d| generate(d, &["--temperature", "-1"]),
        expect: "--temperature must be",
    },
    Case {
        name: "negative top-p with a space",
        args: |d| generate(d, &["--top-p", "-0.5"]),
        expect: "--top-p must be",
    },
    Case {
        name: "NaN temperature",
        args: |d| generate(d, &["--temperature", "-NaN"]),
        expect: "--temperature must be",
    },
    // Inputs checked before --out is created.
    Case {
        name: "missing model",
        args: |d| sft(d, &["--model", &s(d, "nomodel")]),
        expect: "nomodel",
    },
    Case {
        name: "missing data file",
        args: |d| sft(d, &["--data", &format!("jsonl:{}", s(d, "missing.jsonl"))]),
        expect: "missing.jsonl",
    },
    Case {
        name: "zero max length",
        args: |d| sft(d, &["--max-length", "0"]),
        expect: "--max-length",
    },
    Case {
        name: "zero max prompt length",
        args: |d| dpo(d, &["--max-prompt-length", "0"]),
        expect: "--max-prompt-length",
    },
    Case {
        name: "unknown recompute plan",
        args: |d| sft(d, &["--recompute", "bogus"]),
        expect: "--recompute",
    },
    Case {
        name: "missing init adapter",
        args: |d| sft(d, &["--init-adapter", &s(d, "nonexist")]),
        expect: "nonexist",
    },
    Case {
        name: "missing reference adapter",
        args: |d| dpo(d, &["--ref-adapter", &s(d, "nonexist")]),
        expect: "nonexist",
    },
    // --eval-data errors name --eval-data.
    Case {
        name: "unknown eval dataset kind",
        args: |d| sft(d, &["--eval-data", "bogus:x", "--eval-every", "1"]),
        expect: "--eval-data `bogus:x`: unknown dataset kind",
    },
    Case {
        name: "missing eval file",
        args: |d| {
            let spec = format!("jsonl:{}", s(d, "missing.jsonl"));
            sft(d, &["--eval-data", &spec, "--eval-every", "1"])
        },
        expect: "--eval-data `jsonl:",
    },
    Case {
        name: "eval file without usable rows",
        args: |d| {
            let spec = format!("jsonl:{}", s(d, "empty.jsonl"));
            sft(d, &["--eval-data", &spec, "--eval-every", "1"])
        },
        expect: "--eval-data: no usable rows",
    },
];

#[test]
fn bad_training_input_exits_2_with_one_line_and_leaves_no_out_folder() {
    let mut failures = Vec::new();
    for case in CASES {
        let d = setup();
        let o = palign(&(case.args)(d.path()));
        if let Some(p) = bad_input_problem(&o, case.expect) {
            failures.push(format!("{}: {p}", case.name));
        } else if d.path().join("run").exists() {
            failures.push(format!("{}: left {} behind", case.name, s(d.path(), "run")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The audit's worst case: a DPO run with a missing --ref-adapter used to leave
/// run.json behind, so the corrected command failed with "holds a run".
#[test]
fn a_failed_run_leaves_nothing_and_the_fixed_rerun_works() {
    let d = setup();
    let run = d.path().join("run");
    let o = palign(&dpo(d.path(), &["--ref-adapter", &s(d.path(), "nonexist")]));
    assert!(bad_input_problem(&o, "nonexist").is_none(), "{o:?}");
    assert!(!run.exists(), "the failed run left {}", run.display());
    let o = palign(&dpo(d.path(), &["--ref-adapter", &s(d.path(), "adapter")]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join("adapter_model.safetensors").exists());

    // A NaN weight decay used to finish with NaN weights and a run.json --resume could
    // not read; now it is refused up front and the fixed command runs.
    std::fs::remove_dir_all(&run).unwrap();
    let o = palign(&sft(d.path(), &["--weight-decay", "NaN"]));
    assert!(bad_input_problem(&o, "--weight-decay").is_none(), "{o:?}");
    assert!(!run.exists());
    let o = palign(&sft(d.path(), &["--weight-decay", "0.01"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// An --out folder that was there before (empty) stays, and stays empty; a resumable
/// run is never touched by a failing `--resume`, and resumes afterwards.
#[test]
fn failures_keep_pre_existing_folders_and_resumable_runs() {
    let d = setup();
    let run = d.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let o = palign(&dpo(d.path(), &["--ref-adapter", &s(d.path(), "nonexist")]));
    assert!(bad_input_problem(&o, "nonexist").is_none(), "{o:?}");
    assert!(run.is_dir(), "the user's empty folder was removed");
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 0);

    // A run stopped after 1 of 3 steps (a checkpoint and run.json in --out).
    let first = sft(d.path(), &["--steps", "3", "--save-every", "1"]);
    let mut stopped = first.clone();
    stopped.extend(["--stop-after".into(), "1".into()]);
    let o = palign(&stopped);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing = |p: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing(&run);
    let run_json = std::fs::read(run.join("run.json")).unwrap();
    for (extra, expect) in [
        (&["--model", "nomodel"][..], "nomodel"),
        (&["--max-length", "0"][..], "--max-length"),
        (&["--lr", "NaN"][..], "--lr"),
        (&["--recompute", "bogus"][..], "--recompute"),
        (
            &["--eval-data", "bogus:x", "--eval-every", "1"][..],
            "--eval-data",
        ),
    ] {
        let mut a = first.clone();
        a.push("--resume".into());
        let a = common::with_flags(a, extra);
        let o = palign(&a);
        assert!(bad_input_problem(&o, expect).is_none(), "{extra:?}: {o:?}");
        assert_eq!(listing(&run), before, "{extra:?} changed --out");
        assert_eq!(std::fs::read(run.join("run.json")).unwrap(), run_json);
    }
    let mut resume = first.clone();
    resume.push("--resume".into());
    let o = palign(&resume);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join("adapter_model.safetensors").exists());
}
