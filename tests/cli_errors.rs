//! Bad input answers with exit code 2 and one line naming the problem — never a panic
//! or a backtrace — and leaves no output behind. Table-driven: each case builds a broken
//! setting from the tiny fixtures and names a fragment the error must contain.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::copy_dir;

fn fixture(name: &str) -> PathBuf {
    common::fx().join(name)
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

struct Case {
    name: &'static str,
    /// Prepares files in the temp dir `d` (holding a copy of tiny-llama in `d/model`
    /// and valid rows in `d/rows.jsonl`) and returns the palign arguments.
    setup: fn(&Path) -> Vec<String>,
    expect: &'static str,
}

fn score_args(d: &Path) -> Vec<String> {
    [
        "score",
        "--model",
        &d.join("model").to_string_lossy(),
        "--data",
        &d.join("rows.jsonl").to_string_lossy(),
        "--out",
        &d.join("out.jsonl").to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn write_rows(d: &Path, text: &str) {
    std::fs::write(d.join("rows.jsonl"), text).unwrap();
}

const CASES: &[Case] = &[
    Case {
        name: "missing model folder",
        setup: |d| {
            std::fs::remove_dir_all(d.join("model")).unwrap();
            score_args(d)
        },
        expect: "config.json",
    },
    Case {
        name: "config is not JSON",
        setup: |d| {
            std::fs::write(d.join("model/config.json"), "{oops").unwrap();
            score_args(d)
        },
        expect: "not valid JSON",
    },
    Case {
        name: "unknown architecture",
        setup: |d| {
            edit_json(&d.join("model/config.json"), |v| {
                v["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
            });
            score_args(d)
        },
        expect: "GPT2LMHeadModel",
    },
    Case {
        name: "unsupported rope scaling",
        setup: |d| {
            edit_json(&d.join("model/config.json"), |v| {
                v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
            });
            score_args(d)
        },
        expect: "yarn",
    },
    Case {
        name: "config/weights shape mismatch",
        setup: |d| {
            edit_json(&d.join("model/config.json"), |v| {
                v["intermediate_size"] = serde_json::json!(100)
            });
            score_args(d)
        },
        expect: "mlp.gate_proj.weight",
    },
    Case {
        name: "fewer layers in weights than config",
        setup: |d| {
            edit_json(&d.join("model/config.json"), |v| {
                v["num_hidden_layers"] = serde_json::json!(3)
            });
            score_args(d)
        },
        expect: "model.layers.2",
    },
    Case {
        name: "no weights file",
        setup: |d| {
            std::fs::remove_file(d.join("model/model.safetensors")).unwrap();
            score_args(d)
        },
        expect: "no model.safetensors",
    },
    Case {
        name: "truncated safetensors",
        setup: |d| {
            let p = d.join("model/model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            score_args(d)
        },
        expect: "not a valid safetensors",
    },
    Case {
        name: "safetensors header lies about offsets",
        setup: |d| {
            let p = d.join("model/model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let h = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
            let i = h
                .find("\"data_offsets\":[0,")
                .expect("first tensor at offset 0");
            let fake = h[..i].to_string() + "\"data_offsets\":[8," + &h[i + 18..];
            b.splice(8..8 + n, fake.bytes().take(n));
            std::fs::write(&p, b).unwrap();
            score_args(d)
        },
        expect: "not a valid safetensors",
    },
    Case {
        name: "weights stored as integers",
        setup: |d| {
            let p = d.join("model/model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let h = String::from_utf8(b[8..8 + n].to_vec())
                .unwrap()
                .replacen("\"F32\"", "\"I32\"", 1);
            b.splice(8..8 + n, h.bytes());
            std::fs::write(&p, b).unwrap();
            score_args(d)
        },
        expect: "not a float type",
    },
    Case {
        name: "malformed JSONL names the line",
        setup: |d| {
            write_rows(
                d,
                "{\"prompt_ids\":[5],\"completion_ids\":[6]}\n{\"prompt_ids\":[5],\n",
            );
            score_args(d)
        },
        expect: "rows.jsonl:2",
    },
    Case {
        name: "empty data file",
        setup: |d| {
            write_rows(d, "\n");
            score_args(d)
        },
        expect: "no rows",
    },
    Case {
        name: "row missing a field",
        setup: |d| {
            write_rows(d, "{\"prompt_ids\":[5,6]}\n");
            score_args(d)
        },
        expect: "completion_ids",
    },
    Case {
        name: "text row missing completion",
        setup: |d| {
            write_rows(d, "{\"prompt\":\"hi\"}\n");
            score_args(d)
        },
        expect: "`completion` is missing",
    },
    Case {
        name: "ids not integers",
        setup: |d| {
            write_rows(d, "{\"prompt_ids\":[5,-1],\"completion_ids\":[6]}\n");
            score_args(d)
        },
        expect: "non-negative integers",
    },
    Case {
        name: "id outside the vocabulary",
        setup: |d| {
            write_rows(d, "{\"prompt_ids\":[5],\"completion_ids\":[6]}\n{\"prompt_ids\":[5],\"completion_ids\":[512]}\n");
            score_args(d)
        },
        expect: "rows.jsonl:2: token id 512",
    },
    Case {
        name: "empty completion ids",
        setup: |d| {
            write_rows(d, "{\"prompt_ids\":[5],\"completion_ids\":[]}\n");
            score_args(d)
        },
        expect: "completion_ids",
    },
    Case {
        name: "missing tokenizer for text rows",
        setup: |d| {
            std::fs::remove_file(d.join("model/tokenizer.json")).unwrap();
            write_rows(d, "{\"prompt\":\"hi\",\"completion\":\"there\"}\n");
            score_args(d)
        },
        expect: "tokenizer.json is missing",
    },
    Case {
        name: "unknown template",
        setup: |d| {
            let mut a = score_args(d);
            a.extend(["--template".into(), "chatml".into()]);
            a
        },
        expect: "chatml",
    },
    Case {
        name: "output folder does not exist",
        setup: |d| {
            let mut a = score_args(d);
            let n = a.len();
            a[n - 1] = d.join("nope/out.jsonl").to_string_lossy().into();
            a
        },
        expect: "does not exist",
    },
    Case {
        name: "zero threads",
        setup: |d| {
            let mut a = score_args(d);
            a.extend(["--threads".into(), "0".into()]);
            a
        },
        expect: "--threads",
    },
    Case {
        name: "unknown device",
        setup: |d| {
            let mut a = score_args(d);
            a.extend(["--device".into(), "tpu".into()]);
            a
        },
        expect: "tpu",
    },
    Case {
        name: "cuda for a CPU-only command",
        setup: |d| {
            vec![
                "init-tiny".into(),
                "--arch".into(),
                "llama".into(),
                "--out".into(),
                d.join("tiny").to_string_lossy().into(),
                "--device".into(),
                "cuda".into(),
            ]
        },
        expect: "--device cuda",
    },
    Case {
        name: "unknown recompute plan",
        setup: |d| {
            let mut a = score_args(d);
            a[0] = "sft".into();
            a[4] = format!("jsonl:{}", d.join("rows.jsonl").display());
            a[6] = d.join("run").to_string_lossy().into();
            a.extend(["--recompute".into(), "some".into()]);
            a
        },
        expect: "--recompute",
    },
    Case {
        name: "bench shape",
        setup: |_| {
            ["bench", "train", "--shape", "gpt-9", "--device", "cpu"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        },
        expect: "gpt-9",
    },
    Case {
        name: "generate batch size neither auto nor a number",
        setup: |d| {
            write_rows(d, "{\"prompt_ids\":[5,6]}\n");
            [
                "generate",
                "--model",
                &d.join("model").to_string_lossy(),
                "--prompts",
                &d.join("rows.jsonl").to_string_lossy(),
                "--out",
                &d.join("out.jsonl").to_string_lossy(),
                "--batch-size",
                "0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        },
        expect: "--batch-size",
    },
    Case {
        name: "eval decode batch neither auto nor a number",
        setup: |d| {
            [
                "eval",
                "dangerous-qa",
                "--model",
                &d.join("model").to_string_lossy(),
                "--data",
                &d.join("rows.jsonl").to_string_lossy(),
                "--out",
                &d.join("out.jsonl").to_string_lossy(),
                "--cou-template",
                &d.join("rows.jsonl").to_string_lossy(),
                "--decode-batch",
                "many",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        },
        expect: "--decode-batch",
    },
    Case {
        name: "missing required flags are named",
        setup: |_| vec!["generate".to_string()],
        expect: "--model <MODEL> --prompts <PROMPTS> --out <OUT>",
    },
    Case {
        name: "missing subcommand",
        setup: |_| vec!["eval".to_string()],
        expect: "a subcommand is needed: palign eval",
    },
    Case {
        name: "unknown flag",
        setup: |d| {
            let mut a = score_args(d);
            a.push("--bogus".into());
            a
        },
        expect: "--bogus",
    },
    Case {
        name: "init-tiny into a non-empty folder",
        setup: |d| {
            vec![
                "init-tiny".into(),
                "--out".into(),
                d.join("model").to_string_lossy().into(),
            ]
        },
        expect: "already exists",
    },
    Case {
        name: "init-tiny unknown arch",
        setup: |d| {
            vec![
                "init-tiny".into(),
                "--arch".into(),
                "gpt2".into(),
                "--out".into(),
                d.join("m2").to_string_lossy().into(),
            ]
        },
        expect: "gpt2",
    },
    Case {
        name: "unknown target module",
        setup: |d| sft_args(d, &["--targets", "q_proj,lm_head"]),
        expect: "lm_head",
    },
    Case {
        name: "zero steps",
        setup: |d| sft_args(d, &["--steps", "0"]),
        expect: "--steps",
    },
    Case {
        name: "negative learning rate",
        setup: |d| sft_args(d, &["--lr=-1"]),
        expect: "--lr",
    },
    Case {
        name: "zero batch size",
        setup: |d| sft_args(d, &["--batch-size", "0"]),
        expect: "--batch-size",
    },
    Case {
        name: "warm-up with the constant schedule",
        setup: |d| sft_args(d, &["--scheduler", "constant", "--warmup-steps", "3"]),
        expect: "constant_with_warmup",
    },
    Case {
        name: "dropout of one",
        setup: |d| sft_args(d, &["--dropout", "1"]),
        expect: "--dropout",
    },
    Case {
        name: "--keep-dropout on sft",
        setup: |d| sft_args(d, &["--keep-dropout"]),
        expect: "--keep-dropout are for `palign dpo`",
    },
    Case {
        name: "infinite DPO beta",
        setup: |d| {
            let mut a = sft_args(d, &["--beta", "inf"]);
            a[0] = "dpo".into();
            a
        },
        expect: "--beta must be a positive number",
    },
    Case {
        name: "unknown dataset kind",
        setup: |d| {
            let mut a = sft_args(d, &[]);
            let i = a.iter().position(|x| x == "--data").unwrap();
            a[i + 1] = "parquet:x".into();
            a
        },
        expect: "parquet",
    },
    Case {
        name: "empty completion text is all there is",
        setup: |d| {
            write_rows(d, "{\"prompt\":\"hi\",\"completion\":\"\"}\n");
            sft_args(d, &[])
        },
        expect: "1 empty response",
    },
    Case {
        name: "output folder holds a finished run",
        setup: |d| {
            let mut a = sft_args(d, &[]);
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_palign"))
                .env("PALIGN_DEVICE", "cpu")
                .args(&a)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            a.push("--quiet".into());
            a
        },
        expect: "holds a run",
    },
    Case {
        name: "output under a file (unwritable place)",
        setup: |d| {
            std::fs::write(d.join("afile"), b"x").unwrap();
            let mut a = score_args(d);
            let n = a.len();
            a[n - 1] = d.join("afile/out.jsonl").to_string_lossy().into();
            a
        },
        expect: "afile",
    },
    Case {
        name: "adapter rank mismatch",
        setup: |d| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/train/tiny-llama/init_adapter");
            copy_dir(&src, &d.join("adapter"));
            edit_json(&d.join("adapter/adapter_config.json"), |v| {
                v["r"] = serde_json::json!(8)
            });
            let mut a = score_args(d);
            a.extend([
                "--adapter".into(),
                d.join("adapter").to_string_lossy().into(),
            ]);
            a
        },
        expect: "r = 8",
    },
    Case {
        name: "adapter for another model",
        setup: |d| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/train/tiny-mistral/init_adapter");
            let mut a = score_args(d);
            a.extend(["--adapter".into(), src.to_string_lossy().into()]);
            a
        },
        expect: "k_proj",
    },
    Case {
        name: "malformed merge YAML",
        setup: |d| {
            std::fs::write(d.join("m.yaml"), "merge_method: [slerp\n").unwrap();
            vec![
                "merge".into(),
                "--config".into(),
                d.join("m.yaml").to_string_lossy().into(),
                "--out".into(),
                d.join("merged").to_string_lossy().into(),
            ]
        },
        expect: "m.yaml",
    },
    Case {
        name: "wrong dtype in a merge",
        setup: |d| {
            std::fs::write(d.join("m.yaml"), format!("merge_method: linear\ndtype: int4\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n", d.join("model").display())).unwrap();
            vec![
                "merge".into(),
                "--config".into(),
                d.join("m.yaml").to_string_lossy().into(),
                "--out".into(),
                d.join("merged").to_string_lossy().into(),
            ]
        },
        expect: "int4",
    },
    Case {
        name: "quantize checks --device",
        setup: |d| cpu_only_args(d, "quantize"),
        expect: "--device: unknown device `bogus`",
    },
    Case {
        name: "merge-adapter checks --device",
        setup: |d| cpu_only_args(d, "merge-adapter"),
        expect: "--device: unknown device `bogus`",
    },
    Case {
        name: "merge checks --device",
        setup: |d| cpu_only_args(d, "merge"),
        expect: "--device: unknown device `bogus`",
    },
    Case {
        name: "init-tiny checks --device",
        setup: |d| cpu_only_args(d, "init-tiny"),
        expect: "--device: unknown device `bogus`",
    },
    Case {
        name: "demo checks --device",
        setup: |d| cpu_only_args(d, "demo"),
        expect: "--device: unknown device `bogus`",
    },
    Case {
        name: "grid status checks --device",
        setup: |d| cpu_only_args(d, "grid-status"),
        expect: "--device: unknown device `bogus`",
    },
    Case {
        name: "eval mmlu with an empty test file",
        setup: |d| {
            std::fs::create_dir_all(d.join("mmlu/test")).unwrap();
            std::fs::write(d.join("mmlu/test/x_test.csv"), "").unwrap();
            eval_args(d, "mmlu", &d.join("mmlu"), &["--shots", "0"])
        },
        expect: "x_test.csv: no questions",
    },
    Case {
        name: "eval into a model folder",
        setup: |d| {
            let mut a = eval_args(d, "mmlu", &fixture("eval/mmlu"), &["--shots", "0"]);
            let i = a.iter().position(|x| x == "--out").unwrap();
            a[i + 1] = d.join("model").to_string_lossy().into();
            a
        },
        expect: "has no run.json",
    },
    Case {
        name: "alpaca-eval judge folder missing",
        setup: |d| {
            let judge = d.join("nonexist").to_string_lossy().into_owned();
            let data = fixture("eval/alpaca_eval/alpaca_eval.json");
            eval_args(d, "alpaca-eval", &data, &["--judge", &judge])
        },
        expect: "nonexist: no such folder",
    },
    Case {
        name: "real-toxicity scorer max length below its special tokens",
        setup: |d| {
            let scorer = fixture("roberta/model").to_string_lossy().into_owned();
            let data = fixture("eval/rtp/prompts.jsonl");
            let flags = ["--scorer", &scorer, "--scorer-max-length", "1"];
            eval_args(d, "real-toxicity", &data, &flags)
        },
        expect: "--scorer-max-length 1",
    },
    Case {
        name: "real-toxicity scorer is a llama folder",
        setup: |d| {
            let scorer = d.join("model").to_string_lossy().into_owned();
            let data = fixture("eval/rtp/prompts.jsonl");
            eval_args(d, "real-toxicity", &data, &["--scorer", &scorer])
        },
        expect: "/model: config.json: model_type is \"llama\"",
    },
];

/// A CPU-only command (or `grid-status`) with `--device bogus`.
fn cpu_only_args(d: &Path, cmd: &str) -> Vec<String> {
    let p = |x: &str| d.join(x).to_string_lossy().into_owned();
    let (model, q, yaml, toml) = (p("model"), p("q"), p("m.yaml"), p("g.toml"));
    let adapter = fixture("train/tiny-llama/init_adapter")
        .to_string_lossy()
        .into_owned();
    std::fs::write(d.join("m.yaml"), "merge_method: linear\n").unwrap();
    std::fs::write(d.join("g.toml"), "[models.m]\npath = \"init-tiny:llama\"\n").unwrap();
    let mut a: Vec<String> = match cmd {
        "quantize" => vec!["quantize", "--model", &model, "--out", &q],
        "merge-adapter" => vec![
            "merge-adapter",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--out",
            &q,
        ],
        "merge" => vec!["merge", "--config", &yaml, "--out", &q],
        "init-tiny" => vec!["init-tiny", "--arch", "llama", "--out", &q],
        "demo" => vec!["demo", "--out", &q],
        _ => vec!["grid", "status", &toml, "--out", &q],
    }
    .into_iter()
    .map(String::from)
    .collect();
    a.extend(["--device".into(), "bogus".into()]);
    a
}

/// `palign eval TASK --model d/model --data DATA --out d/ev FLAGS...`.
fn eval_args(d: &Path, task: &str, data: &Path, flags: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "eval".into(),
        task.into(),
        "--model".into(),
        d.join("model").to_string_lossy().into(),
        "--data".into(),
        data.to_string_lossy().into(),
        "--out".into(),
        d.join("ev").to_string_lossy().into(),
    ];
    a.extend(flags.iter().map(|s| s.to_string()));
    a
}

fn sft_args(d: &Path, extra: &[&str]) -> Vec<String> {
    let a: Vec<String> = [
        "sft",
        "--model",
        &d.join("model").to_string_lossy(),
        "--data",
        &format!("jsonl:{}", d.join("rows.jsonl").display()),
        "--out",
        &d.join("run").to_string_lossy(),
        "--peft",
        "lora",
        "--rank",
        "2",
        "--batch-size",
        "1",
        "--steps",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    common::with_flags(a, extra) // later flags replace earlier ones of the same name
}

#[test]
fn every_bad_input_exits_2_with_one_line() {
    let mut failures = Vec::new();
    for case in CASES {
        let d = tempfile::tempdir().unwrap();
        copy_dir(&fixture("tiny-llama"), &d.path().join("model"));
        write_rows(d.path(), "{\"prompt_ids\":[5,6],\"completion_ids\":[7]}\n");
        let args = (case.setup)(d.path());
        let out = Command::new(env!("CARGO_BIN_EXE_palign"))
            .env("PALIGN_DEVICE", "cpu")
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let ok = out.status.code() == Some(2)
            && stderr.contains(case.expect)
            && !stderr.contains("panicked")
            && !stderr.contains("backtrace")
            // clap's usage errors too: main keeps their first line.
            && lines.len() == 1
            && !d.path().join("out.jsonl").exists();
        if !ok {
            failures.push(format!(
                "{}: exit {:?}, stderr: {stderr}",
                case.name,
                out.status.code()
            ));
        }
    }
    assert!(CASES.len() >= 38);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `PALIGN_DEVICE` stands in for `--device auto`: a bad value is exit 2 with one line
/// naming the variable, in every command (CPU-only ones and grid included).
#[test]
fn bad_palign_device_is_named() {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama"), &d.path().join("model"));
    write_rows(d.path(), "{\"prompt_ids\":[5,6],\"completion_ids\":[7]}\n");
    let mut cases = vec![score_args(d.path())];
    for cmd in ["quantize", "init-tiny", "grid-status"] {
        let mut a = cpu_only_args(d.path(), cmd);
        a.truncate(a.len() - 2); // no --device: the variable decides
        cases.push(a);
    }
    for args in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_palign"))
            .env("PALIGN_DEVICE", "bogus")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("PALIGN_DEVICE: unknown device `bogus`"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!d.path().join("out.jsonl").exists() && !d.path().join("q").exists());
    }
}
