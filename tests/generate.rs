//! `palign generate` against transformers' `generate(do_sample=False, max_new_tokens=20)`
//! (tools/make_generate_fixtures.py: tiny LLaMA and Mistral with sliding window 8, prompts
//! of 1..24 tokens, base / PEFT adapter / bitsandbytes NF4 base / vicuna text prompts), then
//! stop strings, EOS, the token limit, seeded sampling and bad input.

use palign::model::Tokenizer;
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

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Runs `palign generate --quiet ARGS --out <tmp>`; returns the output rows.
fn generate(args: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let st = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(["generate", "--quiet"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "palign generate {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    read_jsonl(&out)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The expected rows of one fixture case.
fn expected(model: &str, case: &str) -> Vec<Value> {
    read_jsonl(
        &fixtures()
            .join("generate")
            .join(model)
            .join(format!("{case}.jsonl")),
    )
}

fn id_prompts() -> PathBuf {
    fixtures().join("generate/prompts_ids.jsonl")
}

/// Compares output ids, text and finish reason row by row.
fn assert_same(got: &[Value], want: &[Value], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            ids(&g["output_ids"]),
            ids(&w["output_ids"]),
            "{what} row {i}: output ids"
        );
        assert_eq!(g["output"], w["output"], "{what} row {i}: output text");
        let want_finish = if w["eos"].as_bool().unwrap() {
            "eos"
        } else {
            "length"
        };
        assert_eq!(g["finish_reason"], want_finish, "{what} row {i}");
    }
}

#[test]
fn greedy_matches_transformers_batched_and_alone() {
    for m in ["tiny-llama", "tiny-mistral"] {
        let model = fixtures().join(m);
        let want = expected(m, "greedy_ids");
        for bs in ["1", "3", "16"] {
            let got = generate(&[
                "--model",
                path(&model),
                "--prompts",
                path(&id_prompts()),
                "--max-new-tokens",
                "20",
                "--batch-size",
                bs,
            ]);
            assert_same(&got, &want, &format!("{m} batch {bs}"));
            // id rows are echoed
            assert_eq!(got[2]["prompt_ids"], want[2]["prompt_ids"]);
        }
    }
}

#[test]
fn greedy_with_adapter_matches_peft() {
    for m in ["tiny-llama", "tiny-mistral"] {
        let adapter = fixtures().join("train").join(m).join("init_adapter");
        let got = generate(&[
            "--model",
            path(&fixtures().join(m)),
            "--adapter",
            path(&adapter),
            "--prompts",
            path(&id_prompts()),
            "--max-new-tokens",
            "20",
            "--batch-size",
            "4",
        ]);
        let want = expected(m, "greedy_ids_adapter");
        assert_same(&got, &want, &format!("{m} + adapter"));
        // the adapter changes the outputs, so this case tests LoRA in decode
        assert_ne!(
            want[0]["output_ids"],
            expected(m, "greedy_ids")[0]["output_ids"]
        );
    }
}

#[test]
fn greedy_on_nf4_matches_bitsandbytes() {
    for m in ["tiny-llama", "tiny-mistral"] {
        let want = expected(m, "greedy_ids_nf4");
        let quantized_at_load = generate(&[
            "--model",
            path(&fixtures().join(m)),
            "--quant",
            "nf4",
            "--prompts",
            path(&id_prompts()),
            "--max-new-tokens",
            "20",
        ]);
        assert_same(&quantized_at_load, &want, &format!("{m} --quant nf4"));
        let checkpoint = generate(&[
            "--model",
            path(&fixtures().join(format!("{m}-bnb-4bit"))),
            "--prompts",
            path(&id_prompts()),
            "--max-new-tokens",
            "20",
        ]);
        assert_same(&checkpoint, &want, &format!("{m}-bnb-4bit"));
    }
}

#[test]
fn text_prompts_use_the_template_and_one_bos() {
    for m in ["tiny-llama", "tiny-mistral"] {
        let got = generate(&[
            "--model",
            path(&fixtures().join(m)),
            "--prompts",
            path(&fixtures().join("generate/prompts_text.jsonl")),
            "--template",
            "vicuna",
            "--max-new-tokens",
            "20",
        ]);
        assert_same(&got, &expected(m, "greedy_text_vicuna"), m);
        assert_eq!(got[1]["prompt"], "Tell me about the moon.");
    }
}

/// The shortest prefix of `ids` whose decoded text contains `stop`.
fn stop_prefix(tok: &Tokenizer, ids: &[u32], stop: &str) -> usize {
    (1..=ids.len())
        .find(|&n| tok.decode(&ids[..n], true).unwrap().contains(stop))
        .unwrap_or_else(|| panic!("{stop:?} never appears"))
}

#[test]
fn stop_strings_cut_the_text_and_end_the_row() {
    let model = fixtures().join("tiny-llama");
    let tok = Tokenizer::load(&model, Some(1), Some(2)).unwrap();
    let want = expected("tiny-llama", "greedy_ids");
    // row 4's text is "ghveryveryor cevery�N sp?usvery re\n re�very re"
    let full = want[4]["output"].as_str().unwrap();
    let full_ids = ids(&want[4]["output_ids"]);
    let prompts = id_prompts();
    for stops in [vec!["very"], vec!["zzz", "\n"], vec!["\n", "us"]] {
        let mut args = vec![
            "--model",
            path(&model),
            "--prompts",
            path(&prompts),
            "--max-new-tokens",
            "20",
        ];
        for s in &stops {
            args.extend(["--stop", s]);
        }
        let got = generate(&args);
        let g = &got[4];
        let cut = stops.iter().filter_map(|s| full.find(s)).min().unwrap();
        assert!(cut < full.len() - 1, "{stops:?} must stop early");
        assert_eq!(g["output"].as_str().unwrap(), &full[..cut], "{stops:?}");
        assert_eq!(g["finish_reason"], "stop");
        let n = stops
            .iter()
            .filter(|s| full.contains(**s))
            .map(|s| stop_prefix(&tok, &full_ids, s))
            .min()
            .unwrap();
        assert_eq!(ids(&g["output_ids"]), full_ids[..n], "{stops:?}");
        // rows without a stop string are untouched
        for (r, (gr, wr)) in got.iter().zip(&want).enumerate() {
            let text = wr["output"].as_str().unwrap();
            if stops.iter().all(|s| !text.contains(s)) {
                assert_eq!(gr["output_ids"], wr["output_ids"], "{stops:?} row {r}");
            }
        }
    }
}

#[test]
fn eos_ends_a_row_and_stays_in_the_ids_only() {
    let model = fixtures().join("tiny-llama");
    let want = expected("tiny-llama", "greedy_ids");
    // row 4 reaches EOS (id 2) at its 20th token: with room for 40 it still stops there
    let got = generate(&[
        "--model",
        path(&model),
        "--prompts",
        path(&id_prompts()),
        "--max-new-tokens",
        "40",
    ]);
    assert!(want[4]["eos"].as_bool().unwrap());
    assert_eq!(got[4]["output_ids"], want[4]["output_ids"]);
    assert_eq!(got[4]["finish_reason"], "eos");
    assert_eq!(got[4]["output"], want[4]["output"]);
    assert!(!got[4]["output"].as_str().unwrap().contains("</s>"));
    for r in [0, 1, 2, 3, 5, 6, 7] {
        let n = got[r]["output_ids"].as_array().unwrap().len();
        assert!(n == 40 || got[r]["finish_reason"] == "eos", "row {r}: {n}");
        assert_eq!(
            got[r]["output_ids"].as_array().unwrap()[..20],
            want[r]["output_ids"].as_array().unwrap()[..],
            "row {r}: first 20 tokens"
        );
    }

    // generation_config.json's eos ids count too: make row 4's second token (491) an EOS
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [2, 491]}"#,
    )
    .unwrap();
    let got = generate(&[
        "--model",
        path(dir.path()),
        "--prompts",
        path(&id_prompts()),
        "--max-new-tokens",
        "20",
    ]);
    assert_eq!(ids(&want[4]["output_ids"])[1], 491);
    assert_eq!(ids(&got[4]["output_ids"]), vec![383, 491]);
    assert_eq!(got[4]["finish_reason"], "eos");
}

#[test]
fn max_new_tokens_truncates_the_greedy_path() {
    for m in ["tiny-llama", "tiny-mistral"] {
        let want = expected(m, "greedy_ids");
        let got = generate(&[
            "--model",
            path(&fixtures().join(m)),
            "--prompts",
            path(&id_prompts()),
            "--max-new-tokens",
            "5",
        ]);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(ids(&g["output_ids"]), ids(&w["output_ids"])[..5]);
            assert_eq!(g["finish_reason"], "length");
        }
    }
}

fn sampled(model: &str, seed: &str, temp: &str, top_p: &str, batch: &str) -> Vec<Vec<u32>> {
    generate(&[
        "--model",
        path(&fixtures().join(model)),
        "--prompts",
        path(&id_prompts()),
        "--max-new-tokens",
        "20",
        "--temperature",
        temp,
        "--top-p",
        top_p,
        "--seed",
        seed,
        "--batch-size",
        batch,
    ])
    .iter()
    .map(|r| ids(&r["output_ids"]))
    .collect()
}

#[test]
fn sampling_is_seeded_per_row() {
    for m in ["tiny-llama", "tiny-mistral"] {
        let a = sampled(m, "5", "1", "1", "8");
        // same seed: same output, whatever rows share the batch
        assert_eq!(a, sampled(m, "5", "1", "1", "8"), "{m}: rerun");
        assert_eq!(a, sampled(m, "5", "1", "1", "1"), "{m}: batch 1");
        assert_eq!(a, sampled(m, "5", "1", "1", "3"), "{m}: batch 3");
        // another seed: other tokens (8 rows × 20 draws at temperature 1)
        let b = sampled(m, "6", "1", "1", "8");
        assert_ne!(a, b, "{m}: seeds 5 and 6");
        // sampling really samples: not the greedy path
        let greedy: Vec<Vec<u32>> = expected(m, "greedy_ids")
            .iter()
            .map(|r| ids(&r["output_ids"]))
            .collect();
        assert_ne!(a, greedy, "{m}: temperature 1 equals greedy");
        // top-p near 0 keeps only the most likely token: greedy again, any temperature
        assert_eq!(sampled(m, "5", "1", "0", "8"), greedy, "{m}: top-p 0");
        assert_eq!(
            sampled(m, "9", "0.7", "1e-6", "2"),
            greedy,
            "{m}: top-p 1e-6"
        );
    }
}

#[test]
fn top_p_narrows_the_choices() {
    // With top-p 0.3 most steps keep one or two tokens: outputs sit much closer to greedy
    // than at top-p 1 (count tokens equal to greedy at the same place, first divergence).
    let greedy: Vec<Vec<u32>> = expected("tiny-llama", "greedy_ids")
        .iter()
        .map(|r| ids(&r["output_ids"]))
        .collect();
    let agree = |outs: &[Vec<u32>]| -> usize {
        outs.iter()
            .zip(&greedy)
            .map(|(o, g)| o.iter().zip(g).take_while(|(a, b)| a == b).count())
            .sum()
    };
    let wide: usize = (0..4)
        .map(|s| agree(&sampled("tiny-llama", &s.to_string(), "1", "1", "8")))
        .sum();
    let narrow: usize = (0..4)
        .map(|s| agree(&sampled("tiny-llama", &s.to_string(), "1", "0.3", "8")))
        .sum();
    assert!(
        narrow > wide,
        "top-p 0.3: {narrow} greedy-prefix tokens, top-p 1: {wide}"
    );
}

/// Runs palign with a bad setting: exit code 2, one line naming `expect`, no output.
fn assert_bad(args: &[&str], rows: Option<&str>, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, rows.unwrap_or("{\"prompt_ids\": [5, 6]}\n")).unwrap();
    let out = dir.path().join("out.jsonl");
    let model = fixtures().join("tiny-llama");
    let st = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(["generate", "--quiet", "--model", path(&model), "--prompts"])
        .arg(&prompts)
        .arg("--out")
        .arg(&out)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert_eq!(st.status.code(), Some(2), "{args:?} {rows:?}: {err}");
    assert!(err.contains(expect), "{args:?} {rows:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists());
}

#[test]
fn bad_input_is_exit_code_2() {
    assert_bad(
        &[],
        Some("{\"prompt_ids\": [5]}\n{\"prompt_ids\": [5, 512]}\n"),
        "prompts.jsonl:2: token id 512 is outside the vocabulary",
    );
    assert_bad(
        &[],
        Some("{\"prompt_ids\": []}\n"),
        "prompts.jsonl:1: the prompt has no tokens",
    );
    assert_bad(
        &[],
        Some("{\"text\": \"hi\"}\n"),
        "prompts.jsonl:1: field `prompt` is missing",
    );
    assert_bad(&[], Some("{\"prompt_ids\": [-1]}\n"), "prompts.jsonl:1");
    assert_bad(&[], Some("not json\n"), "prompts.jsonl:1: not valid JSON");
    assert_bad(&["--top-p", "1.5"], None, "--top-p");
    assert_bad(&["--temperature=-1"], None, "--temperature");
    assert_bad(&["--max-new-tokens", "0"], None, "--max-new-tokens");
    assert_bad(&["--batch-size", "0"], None, "--batch-size");
    assert_bad(&["--quant", "int8"], None, "--quant");
    assert_bad(&["--stop", ""], None, "--stop");
    assert_bad(&["--template", "chatml"], None, "chatml");
    assert_bad(
        &["--adapter", "/nonexistent/adapter"],
        None,
        "/nonexistent/adapter",
    );
}
