//! `palign quantize` against the checkpoints transformers + bitsandbytes 0.50.2 wrote for
//! the same models (tests/fixtures/*-bnb-4bit, from tools/make_train_fixtures.py), and
//! 4-bit scoring against transformers' `load_in_4bit` scores (qlora_scores.jsonl).

use palign::model::weights::Weights;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const QS: &str = ".quant_state.bitsandbytes__nf4";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn palign(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(["--quiet", "--threads", "2"])
        .args(args)
        .output()
        .expect("palign runs")
}

fn ok(args: &[&str]) -> Output {
    let out = palign(args);
    assert!(
        out.status.success(),
        "palign {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every tensor of a model folder: name → (dtype, shape, bytes).
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn tensors(dir: &Path) -> Tensors {
    let w = Weights::open_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    w.names()
        .map(|n| {
            let e = w.get(n).unwrap();
            (
                n.clone(),
                (
                    format!("{:?}", e.dtype),
                    e.shape.clone(),
                    w.bytes(e).to_vec(),
                ),
            )
        })
        .collect()
}

fn json_file(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn quantize(model: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["quantize", "--model", s(model), "--out", s(out)];
    args.extend_from_slice(extra);
    String::from_utf8(ok(&args).stderr).unwrap()
}

/// The projection weight names of a 2-layer model.
fn projection_names() -> Vec<String> {
    let mut v = vec![];
    for l in 0..2 {
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            v.push(format!("model.layers.{l}.self_attn.{p}.weight"));
        }
        for p in ["gate_proj", "up_proj", "down_proj"] {
            v.push(format!("model.layers.{l}.mlp.{p}.weight"));
        }
    }
    v
}

#[test]
fn quantized_tensors_equal_bitsandbytes_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for base in ["tiny-llama", "tiny-mistral"] {
        let input = fixtures().join(base);
        let bnb_dir = fixtures().join(format!("{base}-bnb-4bit"));
        let out = tmp.path().join(base);
        let log = quantize(&input, &out, &[]);
        assert!(log.contains("quantized 14 projections"), "{log}");

        let ours = tensors(&out);
        let bnb = tensors(&bnb_dir);
        let orig = tensors(&input);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            bnb.keys().collect::<Vec<_>>(),
            "{base}: tensor names"
        );
        let projections = projection_names();
        let mut groups = 0;
        for (name, (dtype, shape, bytes)) in &ours {
            let (bdtype, bshape, bbytes) = &bnb[name];
            assert_eq!((dtype, shape), (bdtype, bshape), "{base}: {name}");
            if let Some(prefix) = name.strip_suffix(QS) {
                // bnb writes json.dumps of the quant state; compare it parsed and as bytes.
                let a: Value = serde_json::from_slice(bytes).unwrap();
                let b: Value = serde_json::from_slice(bbytes).unwrap();
                assert_eq!(a, b, "{base}: {name}");
                assert_eq!(bytes, bbytes, "{base}: {name} bytes");
                assert!(projections.iter().any(|p| p == prefix), "{name}");
                groups += 1;
            } else {
                assert!(bytes == bbytes, "{base}: {name} differs from bitsandbytes");
            }
            let is_quantized = projections.iter().any(|p| name.starts_with(p.as_str()));
            if is_quantized {
                if projections.contains(name) {
                    assert_eq!(dtype, "U8", "{name}: packed codes");
                }
            } else {
                // Not quantized: exactly the stored input tensor.
                let o = &orig[name];
                assert_eq!((&o.0, &o.1), (dtype, shape), "{name}");
                assert!(&o.2 == bytes, "{base}: {name} changed");
            }
        }
        let kept = orig.keys().filter(|n| !projections.contains(n)).count();
        assert_eq!(ours.len(), kept + 14 * 6, "{base}");
        assert_eq!(groups, 14, "{base}");
        for p in &projections {
            for suffix in [
                "",
                ".absmax",
                ".quant_map",
                ".nested_absmax",
                ".nested_quant_map",
            ] {
                assert!(ours.contains_key(&format!("{p}{suffix}")), "{p}{suffix}");
            }
        }
        // config.json: the input's fields plus bnb's quantization_config, as transformers wrote it.
        let cfg = json_file(&out.join("config.json"));
        assert_eq!(cfg, json_file(&bnb_dir.join("config.json")), "{base}");
        let mut without = cfg.clone();
        without
            .as_object_mut()
            .unwrap()
            .remove("quantization_config");
        assert_eq!(without, json_file(&input.join("config.json")));
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(input.join(f)).unwrap(),
                "{f}"
            );
        }
        // The input was sharded for mistral; the 4-bit copy fits one file.
        assert!(out.join("model.safetensors").is_file());
        assert!(!out.join("model.safetensors.index.json").exists());
    }
}

#[test]
fn small_shards_hold_the_same_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixtures().join("tiny-llama");
    let one = tmp.path().join("one");
    let many = tmp.path().join("many");
    quantize(&input, &one, &[]);
    let log = quantize(&input, &many, &["--max-shard-bytes", "60000"]);
    assert!(!many.join("model.safetensors").exists());
    let index = json_file(&many.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let files: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() >= 4, "{files:?}");
    assert!(
        log.contains(&format!("{} safetensors files", files.len())),
        "{log}"
    );
    let ours = tensors(&many);
    assert_eq!(ours, tensors(&one));
    let total: usize = ours.values().map(|t| t.2.len()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    // A bitsandbytes group never straddles two shards.
    for p in projection_names() {
        let file = &map[&p];
        for (name, f) in map {
            if name.starts_with(&format!("{p}.")) {
                assert_eq!(f, file, "{name}");
            }
        }
    }
}

#[test]
fn bf16_input_keeps_its_dtype_and_matches_load_time_quantization() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixtures().join("tiny-llama-bf16");
    let out = tmp.path().join("q");
    quantize(&input, &out, &[]);
    let cfg = json_file(&out.join("config.json"));
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_compute_dtype"],
        "bfloat16"
    );
    let ours = tensors(&out);
    let qs: Value =
        serde_json::from_slice(&ours[&format!("model.layers.1.mlp.up_proj.weight{QS}")].2).unwrap();
    assert_eq!(qs["dtype"], "bfloat16");
    for (name, t) in tensors(&input) {
        if !projection_names().contains(&name) {
            assert_eq!(t.0, "BF16");
            assert!(ours[&name] == t, "{name}");
        }
    }
    // Quantizing the file and quantizing at load time give the same model.
    let data = fixtures().join("data/score_ids.jsonl");
    let a = tmp.path().join("a.jsonl");
    let b = tmp.path().join("b.jsonl");
    ok(&[
        "score",
        "--model",
        s(&out),
        "--data",
        s(&data),
        "--out",
        s(&a),
    ]);
    ok(&[
        "score",
        "--model",
        s(&input),
        "--quant",
        "nf4",
        "--data",
        s(&data),
        "--out",
        s(&b),
    ]);
    assert_eq!(
        std::fs::read_to_string(&a).unwrap(),
        std::fs::read_to_string(&b).unwrap()
    );
}

#[test]
fn blocksize_and_plain_absmax_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixtures().join("tiny-mistral");
    let out = tmp.path().join("q");
    let log = quantize(&input, &out, &["--blocksize", "128", "--no-double-quant"]);
    assert!(log.contains("blocksize 128"), "{log}");
    let cfg = json_file(&out.join("config.json"));
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_use_double_quant"],
        false
    );
    let ours = tensors(&out);
    let orig = tensors(&input);
    for p in projection_names() {
        assert!(!ours.contains_key(&format!("{p}.nested_absmax")), "{p}");
        let qs: Value = serde_json::from_slice(&ours[&format!("{p}{QS}")].2).unwrap();
        assert_eq!(qs["blocksize"], 128);
        assert!(qs.get("nested_offset").is_none());
        // f32 absmax: one per 128 values, and each is the block's max |w| (full blocks).
        let (dtype, shape, am) = &ours[&format!("{p}.absmax")];
        let w: Vec<f32> = orig[&p]
            .2
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(dtype, "F32");
        assert_eq!(shape, &vec![w.len().div_ceil(128)]);
        for (b, c) in am.chunks_exact(4).enumerate() {
            let want = w[b * 128..((b + 1) * 128).min(w.len())]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(
                f32::from_le_bytes(c.try_into().unwrap()),
                want,
                "{p} block {b}"
            );
        }
    }
    // palign reads it back and scores it.
    let scores = tmp.path().join("s.jsonl");
    ok(&[
        "score",
        "--model",
        s(&out),
        "--data",
        s(&fixtures().join("data/score_ids.jsonl")),
        "--out",
        s(&scores),
    ]);
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Largest |logp| and per-token difference between two score files.
fn max_diffs(got: &Path, want: &Path) -> (f64, f64) {
    let (g, w) = (read_jsonl(got), read_jsonl(want));
    assert_eq!(g.len(), w.len());
    let (mut seq, mut tok) = (0.0f64, 0.0f64);
    for (a, b) in g.iter().zip(&w) {
        assert_eq!(a["n_tokens"], b["n_tokens"]);
        seq = seq.max((a["logp"].as_f64().unwrap() - b["logp"].as_f64().unwrap()).abs());
        for (x, y) in floats(&a["token_logps"])
            .iter()
            .zip(floats(&b["token_logps"]))
        {
            tok = tok.max((x - y).abs());
        }
    }
    (seq, tok)
}

#[test]
fn four_bit_scores_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures().join("data/score_ids.jsonl");
    for base in ["tiny-llama", "tiny-mistral"] {
        let want = fixtures().join(format!("train/{base}/expected/qlora_scores.jsonl"));
        let q = tmp.path().join(base);
        let f32_dir = fixtures().join(base);
        let bnb_dir = fixtures().join(format!("{base}-bnb-4bit"));
        quantize(&f32_dir, &q, &[]);
        let runs: [(&str, Vec<&str>); 3] = [
            ("own quantized folder", vec!["--model", s(&q)]),
            (
                "--quant nf4 at load",
                vec!["--model", s(&f32_dir), "--quant", "nf4"],
            ),
            (
                "bnb folder with --quant nf4",
                vec!["--model", s(&bnb_dir), "--quant", "nf4"],
            ),
        ];
        for (i, (what, model_args)) in runs.into_iter().enumerate() {
            let got = tmp.path().join(format!("{base}-{i}.jsonl"));
            let mut args = vec!["score", "--data", s(&data), "--out", s(&got)];
            args.extend(model_args);
            ok(&args);
            let (seq, tok) = max_diffs(&got, &want);
            eprintln!("{base} {what}: max |logp diff| {seq:.2e}, per token {tok:.2e}");
            assert!(seq < 1e-3 && tok < 1e-3, "{base} {what}: {seq} {tok}");
        }
    }
}

/// Runs palign expecting exit code 2 and one line on stderr containing `expect`.
fn expect_bad(args: &[&str], expect: &str) {
    let out = palign(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(expect), "{args:?}: want `{expect}` in {err}");
}

#[test]
fn bad_input_exits_2_with_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = fixtures().join("tiny-llama");
    let out = tmp.path().join("out");
    for bs in ["48", "16", "8192", "0"] {
        expect_bad(
            &[
                "quantize",
                "--model",
                s(&llama),
                "--out",
                s(&out),
                "--blocksize",
                bs,
            ],
            "blocksize",
        );
    }
    // Not a number: clap's usage error, also exit 2.
    let st = palign(&[
        "quantize",
        "--model",
        s(&llama),
        "--out",
        s(&out),
        "--blocksize",
        "x",
    ]);
    assert_eq!(st.status.code(), Some(2));
    for already in ["tiny-llama-bnb-4bit", "tiny-mistral-bnb-4bit"] {
        expect_bad(
            &[
                "quantize",
                "--model",
                s(&fixtures().join(already)),
                "--out",
                s(&out),
            ],
            "already quantized",
        );
    }
    expect_bad(
        &[
            "quantize",
            "--model",
            s(&tmp.path().join("nope")),
            "--out",
            s(&out),
        ],
        "config.json",
    );
    // A tensor copied as it is (not quantized) that the model could not load: the
    // embedding against a config with another vocabulary.
    let odd = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&llama).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), odd.path().join(f.file_name())).unwrap();
    }
    let mut cfg = json_file(&odd.path().join("config.json"));
    cfg["vocab_size"] = (cfg["vocab_size"].as_u64().unwrap() + 1).into();
    std::fs::write(odd.path().join("config.json"), cfg.to_string()).unwrap();
    expect_bad(
        &["quantize", "--model", s(odd.path()), "--out", s(&out)],
        "model.embed_tokens.weight",
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "left files behind"
    );

    // An existing output folder is never overwritten.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    expect_bad(
        &["quantize", "--model", s(&llama), "--out", s(&out)],
        "already exists",
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    let data = fixtures().join("data/score_ids.jsonl");
    let scores = tmp.path().join("s.jsonl");
    expect_bad(
        &[
            "score",
            "--model",
            s(&llama),
            "--quant",
            "int8",
            "--data",
            s(&data),
            "--out",
            s(&scores),
        ],
        "--quant",
    );
    assert!(!scores.exists());
}
