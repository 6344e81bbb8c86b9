//! Bad input answers with exit code 2 and one line naming the problem — never a panic
//! or a backtrace — and leaves no output behind. Table-driven: each case builds a broken
//! setting from the tiny fixtures and names a fragment the error must contain.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
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
        name: "cuda without a CUDA path",
        setup: |d| {
            let mut a = score_args(d);
            a.extend(["--device".into(), "cuda".into()]);
            a
        },
        expect: "--device cuda",
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
];

#[test]
fn every_bad_input_exits_2_with_one_line() {
    let mut failures = Vec::new();
    for case in CASES {
        let d = tempfile::tempdir().unwrap();
        copy_dir(&fixture("tiny-llama"), &d.path().join("model"));
        write_rows(d.path(), "{\"prompt_ids\":[5,6],\"completion_ids\":[7]}\n");
        let args = (case.setup)(d.path());
        let out = Command::new(env!("CARGO_BIN_EXE_palign"))
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
            // clap's usage errors add a usage line and a help hint; ours are one line.
            && (lines.len() == 1 || case.name == "unknown flag")
            && !d.path().join("out.jsonl").exists();
        if !ok {
            failures.push(format!(
                "{}: exit {:?}, stderr: {stderr}",
                case.name,
                out.status.code()
            ));
        }
    }
    assert!(CASES.len() >= 25);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
