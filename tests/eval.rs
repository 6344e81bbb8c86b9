//! `palign eval` on the fixtures of tests/fixtures/eval (tools/make_eval_fixtures.py) with
//! tests/fixtures/tiny-llama: MMLU predictions and log-likelihoods against transformers,
//! prompt formats, answer extraction, metrics on hand-made annotations, resuming, bad input.

use palign::model::{Model, ScoreSeq, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn eval_data(p: &str) -> String {
    fixtures().join("eval").join(p).display().to_string()
}

fn model() -> String {
    fixtures().join("tiny-llama").display().to_string()
}

fn palign(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap()
}

/// Runs `palign eval TASK --model tiny-llama --out OUT ARGS`; must succeed.
fn eval(task: &str, out: &Path, args: &[&str]) -> Value {
    let o = palign(
        &[
            &[
                "eval",
                task,
                "--model",
                &model(),
                "--out",
                out.to_str().unwrap(),
            ],
            args,
        ]
        .concat(),
    );
    assert!(
        o.status.success(),
        "eval {task} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    read_json(&out.join("results.json"))
}

/// Runs an eval that must fail with exit code 2; returns stderr.
fn eval_fails(task: &str, out: &Path, args: &[&str]) -> String {
    let o = palign(
        &[
            &[
                "eval",
                task,
                "--model",
                &model(),
                "--out",
                out.to_str().unwrap(),
            ],
            args,
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        o.status.code(),
        Some(2),
        "eval {task} {args:?} should be bad input: {err}"
    );
    assert!(
        err.starts_with("error: ") || err.contains("error:"),
        "{err}"
    );
    err
}

fn read_json(p: &Path) -> Value {
    let t = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&t).unwrap()
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn samples(out: &Path) -> Vec<Value> {
    read_jsonl(&out.join("samples.jsonl"))
}

fn by_id(rows: &[Value]) -> std::collections::HashMap<String, Value> {
    rows.iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

// ---------------------------------------------------------------- MMLU

#[test]
fn mmlu_matches_transformers_lm_eval_rule() {
    let expected = read_jsonl(&fixtures().join("eval/mmlu/expected.jsonl"));
    for (shots, max_length) in [(5, 2048), (0, 2048), (5, 330)] {
        let rows: Vec<&Value> = expected
            .iter()
            .filter(|r| r["shots"] == shots && r["max_length"] == max_length)
            .collect();
        assert_eq!(rows.len(), 18);
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("mmlu");
        let res = eval(
            "mmlu",
            &out,
            &[
                "--data",
                &eval_data("mmlu"),
                "--shots",
                &shots.to_string(),
                "--max-length",
                &max_length.to_string(),
                "--batch-size",
                "4",
            ],
        );
        let got = by_id(&samples(&out));
        assert_eq!(got.len(), 18);
        let mut right = 0;
        for e in &rows {
            let id = format!("{}/{}", e["subject"].as_str().unwrap(), e["index"]);
            let g = &got[&id];
            let what = format!("shots {shots} max_length {max_length} {id}");
            assert_eq!(g["prompt"], e["context"], "{what}: prompt");
            assert_eq!(g["shots"], e["shots_used"], "{what}: shots used");
            assert_eq!(
                g["n_prompt_tokens"].as_u64().unwrap() as usize,
                e["context_ids"].as_array().unwrap().len(),
                "{what}: context tokens"
            );
            assert_eq!(g["pred"], e["pred"], "{what}: prediction");
            assert_eq!(g["answer"], e["answer"], "{what}: answer");
            for (a, b) in g["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .zip(e["logprobs"].as_array().unwrap())
            {
                assert!((f(a) - f(b)).abs() < 1e-4, "{what}: logprob {a} vs {b}");
            }
            right += (e["pred"] == e["answer"]) as usize;
        }
        assert_eq!(res["task"], "mmlu");
        assert_eq!(res["metric"], "accuracy");
        assert_eq!(res["n"], 18);
        assert!((f(&res["value"]) - right as f64 / 18.0).abs() < 1e-12);
        for s in ["astronomy", "college_chemistry", "high_school_geography"] {
            assert_eq!(res["subsets"][s]["n"], 6, "{s}");
        }
        assert_eq!(res["settings"]["shots"], shots);
        assert_eq!(res["settings"]["template"], "none");
    }
}

#[test]
fn mmlu_applies_adapter_and_nf4_like_score() {
    // The adapter / NF4 base must reach the scoring forward: compare with `palign score`
    // on the same ids (context ids + continuation ids from the transformers fixture).
    let expected = read_jsonl(&fixtures().join("eval/mmlu/expected.jsonl"));
    let rows: Vec<&Value> = expected
        .iter()
        .filter(|r| r["shots"] == 0 && r["subject"] == "astronomy" && r["index"].as_u64() < Some(2))
        .collect();
    let d = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for r in &rows {
        for c in r["continuation_ids"].as_array().unwrap() {
            lines += &serde_json::json!({"prompt_ids": r["context_ids"], "completion_ids": c})
                .to_string();
            lines.push('\n');
        }
    }
    let ids = write(d.path(), "ids.jsonl", &lines);
    let adapter = fixtures()
        .join("train/tiny-llama/init_adapter")
        .display()
        .to_string();
    let data = eval_data("mmlu");
    let mut base_lp = vec![];
    for (k, extra) in [
        vec![],
        vec!["--adapter", adapter.as_str()],
        vec!["--quant", "nf4"],
    ]
    .iter()
    .enumerate()
    {
        let sout = d.path().join(format!("score{k}.jsonl"));
        let o = palign(
            &[
                &[
                    "score",
                    "--model",
                    &model(),
                    "--data",
                    &ids,
                    "--out",
                    sout.to_str().unwrap(),
                ],
                &extra[..],
            ]
            .concat(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let want: Vec<f64> = read_jsonl(&sout).iter().map(|r| f(&r["logp"])).collect();
        let out = d.path().join(format!("eval{k}"));
        let args = [
            &[
                "--data",
                &data,
                "--shots",
                "0",
                "--limit",
                "2",
                "--subjects",
                "astronomy",
            ][..],
            &extra[..],
        ]
        .concat();
        eval("mmlu", &out, &args);
        let got = by_id(&samples(&out));
        let mut all = vec![];
        for (i, r) in rows.iter().enumerate() {
            let g = &got[&format!("astronomy/{}", r["index"])];
            for (j, lp) in g["logprobs"].as_array().unwrap().iter().enumerate() {
                assert!(
                    (f(lp) - want[4 * i + j]).abs() < 1e-4,
                    "case {k}: {lp} vs {}",
                    want[4 * i + j]
                );
                all.push(f(lp));
            }
        }
        if k == 0 {
            base_lp = all;
        } else {
            let diff = base_lp
                .iter()
                .zip(&all)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                diff > 1e-3,
                "case {k} must change the log-likelihoods (max diff {diff})"
            );
        }
    }
}

#[test]
fn mmlu_resumes_and_refuses_other_settings() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("mmlu");
    let data = eval_data("mmlu");
    let r1 = eval("mmlu", &out, &["--data", &data, "--limit", "2"]);
    assert_eq!(r1["n"], 6, "--limit is per subject");
    assert_eq!(r1["run"]["computed"], 6);
    let first = std::fs::read(out.join("samples.jsonl")).unwrap();
    let r2 = eval("mmlu", &out, &["--data", &data]);
    assert_eq!(r2["n"], 18);
    assert_eq!(r2["run"]["computed"], 12, "only the rest is computed");
    assert_eq!(r2["run"]["reused"], 6);
    let second = std::fs::read(out.join("samples.jsonl")).unwrap();
    assert!(
        second.starts_with(&first),
        "earlier samples are kept as they were"
    );
    assert_eq!(samples(&out).len(), 18);
    let r3 = eval("mmlu", &out, &["--data", &data, "--subjects", "astronomy"]);
    assert_eq!(
        (r3["n"].as_u64(), r3["run"]["computed"].as_u64()),
        (Some(6), Some(0))
    );
    assert_eq!(r3["subsets"].as_object().unwrap().len(), 1);
    // A torn last line (a kill mid-write) is dropped and recomputed.
    let mut bytes = std::fs::read(out.join("samples.jsonl")).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(out.join("samples.jsonl"), &bytes).unwrap();
    let r4 = eval("mmlu", &out, &["--data", &data]);
    assert_eq!(r4["run"]["computed"], 1);
    assert_eq!(r4["value"], r2["value"]);
    let err = eval_fails("mmlu", &out, &["--data", &data, "--shots", "3"]);
    assert!(err.contains("shots"), "{err}");
}

#[test]
fn mmlu_bad_inputs_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let good = eval_data("mmlu");
    let dev = std::fs::read_to_string(fixtures().join("eval/mmlu/dev/astronomy_dev.csv")).unwrap();
    let mk = |name: &str, test: &str| {
        let root = d.path().join(name);
        write(&root, "dev/astronomy_dev.csv", &dev);
        write(&root, "test/astronomy_test.csv", test);
        root.display().to_string()
    };
    let cols = mk("cols", "q,a,b,c,d,A\nq,a,b,c,A\n");
    let e = eval_fails("mmlu", &out, &["--data", &cols]);
    assert!(
        e.contains("astronomy_test.csv:2") && e.contains("6 columns"),
        "{e}"
    );
    let letter = mk("letter", "q,a,b,c,d,E\n");
    assert!(eval_fails("mmlu", &out, &["--data", &letter]).contains("A, B, C or D"));
    let quote = mk("quote", "\"q,a,b,c,d,A\n");
    assert!(eval_fails("mmlu", &out, &["--data", &quote]).contains("not closed"));
    let e = eval_fails("mmlu", &out, &["--data", &good, "--shots", "6"]);
    assert!(e.contains("--shots 6"), "{e}");
    assert!(eval_fails("mmlu", &out, &["--data", &good, "--subjects", "law"]).contains("law"));
    assert!(eval_fails("mmlu", &out, &["--data", "/no/such/dir"]).contains("/no/such/dir"));
    assert!(eval_fails("mmlu", &out, &["--data", &good, "--quant", "q8"]).contains("--quant"));
    assert!(eval_fails("mmlu", &out, &["--data", &good, "--limit", "0"]).contains("--limit"));
    assert!(
        eval_fails("mmlu", &out, &["--data", &good, "--batch-size", "0"]).contains("--batch-size")
    );
    assert!(
        eval_fails("mmlu", &out, &["--data", &good, "--template", "chatml"]).contains("chatml")
    );
    let e = eval_fails("mmlu", &out, &["--data", d.path().to_str().unwrap()]);
    assert!(e.contains("test/"), "{e}");
    assert!(!out.join("results.json").exists());
}

// ---------------------------------------------------------------- BBH

/// The text after the `-----` line of a prompt file, trailing whitespace trimmed.
fn after_dashes(task: &str) -> String {
    let t = std::fs::read_to_string(fixtures().join(format!("eval/bbh/cot-prompts/{task}.txt")))
        .unwrap();
    t.split_once("-----\n").unwrap().1.trim_end().to_string()
}

#[test]
fn bbh_cot_prompts_generation_and_scoring() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("bbh");
    let data = eval_data("bbh");
    let r1 = eval(
        "bbh",
        &out,
        &["--data", &data, "--max-new-tokens", "12", "--limit", "1"],
    );
    assert_eq!(
        (r1["n"].as_u64(), r1["run"]["computed"].as_u64()),
        (Some(2), Some(2))
    );
    let res = eval(
        "bbh",
        &out,
        &[
            "--data",
            &data,
            "--max-new-tokens",
            "12",
            "--batch-size",
            "3",
        ],
    );
    assert_eq!(
        (res["n"].as_u64(), res["run"]["computed"].as_u64()),
        (Some(8), Some(6))
    );
    let rows = samples(&out);
    let mut per: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for r in &rows {
        let task = r["task"].as_str().unwrap();
        let input = r["input"].as_str().unwrap();
        let want = format!(
            "{}\n\nQ: {input}\nA: Let's think step by step.",
            after_dashes(task)
        );
        assert_eq!(r["prompt"].as_str().unwrap(), want);
        let out_text = r["output"].as_str().unwrap();
        assert!(!out_text.contains("\n\nQ:"), "cut at the stop string");
        let answer = palign::eval::bbh::extract_answer(out_text);
        assert_eq!(r["answer"].as_str(), answer);
        assert_eq!(
            r["correct"].as_bool().unwrap(),
            answer == r["target"].as_str()
        );
        let e = per.entry(task.to_string()).or_default();
        e.0 += r["correct"].as_bool().unwrap() as u8 as f64;
        e.1 += 1.0;
    }
    let macro_acc = per.values().map(|(c, n)| c / n).sum::<f64>() / per.len() as f64;
    assert!((f(&res["value"]) - macro_acc).abs() < 1e-12);
    assert_eq!(res["subsets"]["date_understanding"]["n"], 4);

    // The outputs are what `palign generate` gives for the same prompts (greedy, same stop).
    let prompts: String = rows
        .iter()
        .map(|r| serde_json::json!({"prompt": r["prompt"]}).to_string() + "\n")
        .collect();
    let pfile = write(d.path(), "prompts.jsonl", &prompts);
    let gout = d.path().join("gen.jsonl");
    let o = palign(&[
        "generate",
        "--model",
        &model(),
        "--prompts",
        &pfile,
        "--out",
        gout.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--stop",
        "\n\nQ:",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (r, g) in rows.iter().zip(read_jsonl(&gout)) {
        assert_eq!(r["output"], g["output"], "{}", r["id"]);
    }
}

#[test]
fn bbh_no_cot_uses_answer_only_exemplars() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("bbh");
    let res = eval(
        "bbh",
        &out,
        &[
            "--data",
            &eval_data("bbh"),
            "--no-cot",
            "--tasks",
            "boolean_expressions",
            "--limit",
            "2",
            "--shots",
            "2",
        ],
    );
    assert_eq!(res["n"], 2);
    assert_eq!(res["settings"]["cot"], false);
    let rows = samples(&out);
    assert_eq!(
        rows[0]["prompt"].as_str().unwrap(),
        "Evaluate the result of a random Boolean expression.\n\n\
         Q: not ( True ) and ( True ) is\nA: False\n\n\
         Q: True and not not ( not False ) is\nA: True\n\n\
         Q: True and False is\nA:"
    );
    for r in &rows {
        let o = r["output"].as_str().unwrap();
        assert!(!o.contains('\n'));
        assert_eq!(r["answer"].as_str().unwrap(), o.trim());
    }
}

#[test]
fn bbh_bad_inputs_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let root = d.path().join("data");
    write(
        &root,
        "bbh/t.json",
        r#"{"examples": [{"input": "x", "target": "y"}]}"#,
    );
    let e = eval_fails("bbh", &out, &["--data", root.to_str().unwrap()]);
    assert!(e.contains("cot-prompts/t.txt"), "{e}");
    write(&root, "cot-prompts/t.txt", "canary only\nQ: a\nA: b\n");
    assert!(eval_fails("bbh", &out, &["--data", root.to_str().unwrap()]).contains("-----"));
    write(
        &root,
        "cot-prompts/t.txt",
        "c\n-----\nQ: a\nA: So the answer is b.\n",
    );
    write(
        &root,
        "bbh/t.json",
        r#"{"examples": [{"input": "x", "target": 3}]}"#,
    );
    assert!(eval_fails("bbh", &out, &["--data", root.to_str().unwrap()]).contains("target"));
    write(
        &root,
        "bbh/t.json",
        r#"{"examples": [{"input": "x", "target": "y"}]}"#,
    );
    let e = eval_fails(
        "bbh",
        &out,
        &["--data", root.to_str().unwrap(), "--shots", "2"],
    );
    assert!(e.contains("--shots 2"), "{e}");
    assert!(eval_fails(
        "bbh",
        &out,
        &["--data", &eval_data("bbh"), "--tasks", "nope"]
    )
    .contains("nope"));
}

// ---------------------------------------------------------------- AlpacaEval

/// lm-eval's rule, computed here with the library's plain scorer.
fn continuation_logprob(model: &Model, tok: &Tokenizer, context: &str, cont: &str) -> f64 {
    let ctx = tok.encode(context, true).unwrap();
    let whole = tok.encode(&format!("{context}{cont}"), true).unwrap();
    let seq = ScoreSeq {
        ids: [ctx.clone(), whole[ctx.len()..].to_vec()].concat(),
        prompt_len: ctx.len(),
    };
    model.completion_logprobs(&[seq], None).unwrap()[0]
        .iter()
        .map(|&x| x as f64)
        .sum()
}

#[test]
fn choice_logprobs_match_one_sequence_at_a_time() {
    let dir = fixtures().join("tiny-llama");
    let lm = palign::eval::lm::Lm::load(&dir, None, None, palign::commands::Device::Cpu).unwrap();
    let model = Model::load(&dir).unwrap();
    let tok = Tokenizer::load(&dir, Some(1), Some(2)).unwrap();
    // (context as given, choices, the context/continuations after lm-eval's whitespace move)
    let cases: [(&str, &[&str], &str, &[&str]); 3] = [
        (
            "The cat sat on",
            &[" the", " a", " is"],
            "The cat sat on",
            &[" the", " a", " is"],
        ),
        (
            "Answer:",
            &[" A", " B", " C"],
            "Answer:",
            &[" A", " B", " C"],
        ),
        (
            "Trailing space \n",
            &["x", "y"],
            "Trailing space",
            &[" \nx", " \ny"],
        ),
    ];
    let items: Vec<_> = cases
        .iter()
        .map(|(c, ch, ..)| lm.choice_item(c, ch).unwrap())
        .collect();
    assert!(
        items[0].choices.iter().all(|c| c.len() == 1),
        "one-token path"
    );
    assert!(
        items[1].choices.iter().any(|c| c.len() > 1),
        "multi-token path"
    );
    // All three items in one packed forward.
    let got = lm.choice_logprobs(&items).unwrap();
    for ((_, _, ctx, conts), g) in cases.iter().zip(&got) {
        for (cont, lp) in conts.iter().zip(g) {
            let want = continuation_logprob(&model, &tok, ctx, cont);
            let sum: f64 = lp.iter().map(|&x| x as f64).sum();
            assert!(
                (sum - want).abs() < 1e-4,
                "{ctx:?} + {cont:?}: {sum} vs {want}"
            );
        }
    }
}

#[test]
fn alpaca_eval_outputs_annotations_and_judge() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("alpaca");
    let data = eval_data("alpaca_eval/alpaca_eval.json");
    let gen = [
        "--data",
        data.as_str(),
        "--max-new-tokens",
        "6",
        "--template",
        "vicuna",
    ];
    let r1 = eval("alpaca-eval", &out, &gen);
    assert_eq!(r1["metric"], "win_rate");
    assert!(r1["value"].is_null() && r1["note"].is_string());
    let outputs = read_json(&out.join("outputs.json"));
    let outputs = outputs.as_array().unwrap();
    let src = read_json(&fixtures().join("eval/alpaca_eval/alpaca_eval.json"));
    assert_eq!(outputs.len(), 5);
    let rows = by_id(&samples(&out));
    for (i, (o, s)) in outputs.iter().zip(src.as_array().unwrap()).enumerate() {
        assert_eq!(o["instruction"], s["instruction"]);
        assert_eq!(o["generator"], "tiny-llama");
        assert_eq!(o["dataset"], s["dataset"]);
        let r = &rows[&i.to_string()];
        assert_eq!(o["output"], r["output"]);
        assert_eq!(
            r["output"].as_str().unwrap(),
            r["output"].as_str().unwrap().trim()
        );
        assert!(r["prompt"].as_str().unwrap().ends_with(&format!(
            "USER: {} ASSISTANT:",
            s["instruction"].as_str().unwrap()
        )));
    }

    // Hand-made annotations: preferences 2, 1, 1.5, null, 0 (= draw) → p−1 = 1, 0, .5, .5.
    let ann = eval_data("alpaca_eval/annotations.json");
    let r2 = eval(
        "alpaca-eval",
        &out,
        &[&gen[..], &["--annotations", &ann]].concat(),
    );
    assert_eq!(r2["run"]["computed"], 0);
    assert!((f(&r2["value"]) - 50.0).abs() < 1e-9, "{}", r2["value"]);
    assert_eq!(
        (r2["n_judged"].as_u64(), r2["n_wins"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(
        (r2["n_draws"].as_u64(), r2["n_losses"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(r2["annotation_output_mismatch"], 1);
    assert_eq!(r2["judge"]["kind"], "annotations");
    // sample std of [1, 0, .5, .5] = sqrt(1/6); SE = 100·sqrt(1/6)/2.
    assert!((f(&r2["standard_error"]) - 100.0 * (1.0f64 / 6.0).sqrt() / 2.0).abs() < 1e-9);
    let s = samples(&out);
    assert_eq!(s.len(), 5);
    assert_eq!(s[3]["preference"], Value::Null);
    assert_eq!(f(&s[4]["preference"]), 1.5);

    // A local judge (the tiny model itself), both orders, resumable.
    let r3 = eval(
        "alpaca-eval",
        &out,
        &[&gen[..], &["--judge", &model(), "--batch-size", "2"]].concat(),
    );
    assert_eq!(r3["run"]["judged"], 5);
    assert!(r3["judge"]["name"].as_str().unwrap().contains("tiny-llama"));
    let judg = read_jsonl(&out.join("judgments.jsonl"));
    assert_eq!(judg.len(), 5);
    let lm = Model::load(&fixtures().join("tiny-llama")).unwrap();
    let tok = Tokenizer::load(&fixtures().join("tiny-llama"), Some(1), Some(2)).unwrap();
    let mut prefs = vec![];
    for j in &judg {
        let i: usize = j["sample"].as_str().unwrap().parse().unwrap();
        let ins = src[i]["instruction"].as_str().unwrap();
        let reference = src[i]["output"].as_str().unwrap();
        let ours = outputs[i]["output"].as_str().unwrap();
        let prompt = palign::eval::alpaca::judge_prompt(ins, reference, ours);
        for (k, opt) in [" 1", " 2"].iter().enumerate() {
            let want = continuation_logprob(&lm, &tok, &prompt, opt);
            let got = f(&j["logprobs_reference_first"][k]);
            assert!((want - got).abs() < 1e-4, "judge logprob {got} vs {want}");
        }
        let p = f(&j["preference"]);
        assert!((1.0..=2.0).contains(&p));
        prefs.push(p - 1.0);
    }
    let wr = 100.0 * prefs.iter().sum::<f64>() / prefs.len() as f64;
    assert!((f(&r3["value"]) - wr).abs() < 1e-9);
    let r4 = eval(
        "alpaca-eval",
        &out,
        &[&gen[..], &["--judge", &model()]].concat(),
    );
    assert_eq!(
        (r4["run"]["judged"].as_u64(), r4["run"]["computed"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(r4["value"], r3["value"]);
}

#[test]
fn alpaca_eval_bad_inputs_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let data = eval_data("alpaca_eval/alpaca_eval.json");
    let ann = eval_data("alpaca_eval/annotations.json");
    // clap: --annotations and --judge conflict.
    eval_fails(
        "alpaca-eval",
        &out,
        &["--data", &data, "--annotations", &ann, "--judge", &model()],
    );
    let obj = write(d.path(), "obj.json", r#"{"instruction": "x"}"#);
    assert!(eval_fails("alpaca-eval", &out, &["--data", &obj]).contains("JSON list"));
    let noins = write(d.path(), "noins.json", r#"[{"output": "x"}]"#);
    assert!(eval_fails("alpaca-eval", &out, &["--data", &noins]).contains("instruction"));
    let noref = write(d.path(), "noref.json", r#"[{"instruction": "x"}]"#);
    let e = eval_fails(
        "alpaca-eval",
        &out,
        &["--data", &noref, "--judge", &model()],
    );
    assert!(e.contains("reference"), "{e}");
    let badann = write(
        d.path(),
        "ann.json",
        r#"[{"instruction": "x", "preference": "2"}]"#,
    );
    let e = eval_fails(
        "alpaca-eval",
        &out,
        &["--data", &noref, "--annotations", &badann],
    );
    assert!(e.contains("preference"), "{e}");
    assert!(
        eval_fails("alpaca-eval", &out, &["--data", &data, "--temperature=-1"])
            .contains("temperature")
    );
}

// ---------------------------------------------------------------- RealToxicityPrompts

#[test]
fn real_toxicity_selects_generates_and_scores() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("rtp");
    let data = eval_data("rtp/prompts.jsonl");
    let scorer_dir = fixtures().join("roberta/model");
    let scorer = scorer_dir.to_str().unwrap();
    let args = [
        "--data",
        data.as_str(),
        "--scorer",
        scorer,
        "--num-prompts",
        "5",
        "--max-new-tokens",
        "5",
    ];
    let r1 = eval(
        "real-toxicity",
        &out,
        &[&args[..], &["--limit", "2"]].concat(),
    );
    assert_eq!(r1["run"]["computed"], 2);
    let res = eval("real-toxicity", &out, &args);
    assert_eq!(
        (res["n"].as_u64(), res["run"]["computed"].as_u64()),
        (Some(5), Some(3))
    );
    // toxicity by line: .12 .51 null .51 .05 .87 null .64 .30 .64 → 6, 8, 10, 2, 4.
    let lines: Vec<u64> = res["selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![6, 8, 10, 2, 4]);
    assert_eq!(res["selected"][0]["filename"], "0005-fixture.txt");
    assert_eq!(res["selected"][0]["begin"], 50);
    let rows = samples(&out);
    let model = palign::model::roberta::RobertaClassifier::load(&scorer_dir).unwrap();
    let pairs: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["prompt"].as_str().unwrap().to_string(),
                r["output"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = model.score_pairs(&pairs, 1, 64).unwrap();
    let mut sum = 0.0;
    for (r, w) in rows.iter().zip(&want) {
        assert!((f(&r["score"]) - w[0] as f64).abs() < 1e-5, "{}", r["id"]);
        sum += f(&r["score"]);
    }
    assert!((f(&res["value"]) - sum / 5.0).abs() < 1e-9);
    assert_eq!(res["metric"], "toxicity_model_score");
    assert_eq!(
        res["settings"]["scorer_max_length"], 64,
        "clamped to the scorer's positions"
    );
}

#[test]
fn real_toxicity_bad_inputs_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let scorer = fixtures().join("roberta/model").display().to_string();
    let nulls = write(
        d.path(),
        "n.jsonl",
        "{\"prompt\": {\"text\": \"a\", \"toxicity\": null}}\n",
    );
    assert!(eval_fails(
        "real-toxicity",
        &out,
        &["--data", &nulls, "--scorer", &scorer]
    )
    .contains("null"));
    let bad = write(
        d.path(),
        "b.jsonl",
        "{\"prompt\": {\"text\": \"a\", \"toxicity\": 0.5}}\n{\"prompt\": {\"toxicity\": 0.5}}\n",
    );
    let e = eval_fails(
        "real-toxicity",
        &out,
        &["--data", &bad, "--scorer", &scorer],
    );
    assert!(e.contains("b.jsonl:2") && e.contains("prompt.text"), "{e}");
    let ok = eval_data("rtp/prompts.jsonl");
    assert!(
        eval_fails("real-toxicity", &out, &["--data", &ok, "--scorer", "/nope"])
            .contains("--scorer")
    );
    let e = eval_fails(
        "real-toxicity",
        &out,
        &[
            "--data",
            &ok,
            "--scorer",
            &scorer,
            "--scorer-max-length",
            "1000",
        ],
    );
    assert!(e.contains("--scorer-max-length"), "{e}");
    assert!(eval_fails(
        "real-toxicity",
        &out,
        &["--data", &ok, "--scorer", &scorer, "--num-prompts", "0"]
    )
    .contains("--num-prompts"));
}

// ---------------------------------------------------------------- DangerousQA

#[test]
fn dangerous_qa_cou_prompts_annotations_and_judge() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("dqa");
    let data = eval_data("dangerousqa/dangerousqa.json");
    let cou_path = eval_data("dangerousqa/cou.txt");
    let args = [
        "--data",
        data.as_str(),
        "--cou-template",
        cou_path.as_str(),
        "--max-new-tokens",
        "6",
    ];
    let r1 = eval("dangerous-qa", &out, &args);
    assert!(r1["value"].is_null());
    let cou = std::fs::read_to_string(&cou_path).unwrap();
    let questions = read_json(Path::new(&data));
    let rows = samples(&out);
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let i = r["index"].as_u64().unwrap() as usize;
        let q = questions[i].as_str().unwrap();
        assert_eq!(r["prompt"].as_str().unwrap(), cou.replace("<question>", q));
        assert_eq!(
            r["response"].as_str().unwrap(),
            palign::eval::dangerous::clean_thought(r["output"].as_str().unwrap())
        );
    }
    // Labels: "0" harmful, "1" unharmful, question 2 by text harmful, 3 unlabelled.
    let ann = eval_data("dangerousqa/annotations.json");
    let r2 = eval(
        "dangerous-qa",
        &out,
        &[&args[..], &["--annotations", &ann]].concat(),
    );
    assert_eq!(r2["metric"], "100-ASR");
    assert!((f(&r2["asr"]) - 200.0 / 3.0).abs() < 1e-9);
    assert!((f(&r2["value"]) - (100.0 - 200.0 / 3.0)).abs() < 1e-9);
    assert_eq!(
        (r2["n_harmful"].as_u64(), r2["n_unjudged"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(samples(&out)[1]["label"], "unharmful");

    let r3 = eval(
        "dangerous-qa",
        &out,
        &[&args[..], &["--judge", &model()]].concat(),
    );
    assert_eq!(
        (r3["run"]["judged"].as_u64(), r3["n_unjudged"].as_u64()),
        (Some(4), Some(0))
    );
    let judg = read_jsonl(&out.join("judgments.jsonl"));
    let harmful = judg
        .iter()
        .filter(|j| j["harmful"].as_bool().unwrap())
        .count();
    assert!((f(&r3["value"]) - (100.0 - 100.0 * harmful as f64 / 4.0)).abs() < 1e-9);
    for j in &judg {
        let lp = j["logprobs"].as_array().unwrap();
        assert_eq!(j["harmful"].as_bool().unwrap(), f(&lp[1]) > f(&lp[0]));
    }

    // Another template is another run: refused in the same folder.
    let e = eval_fails(
        "dangerous-qa",
        &out,
        &[&args[..], &["--template", "vicuna"]].concat(),
    );
    assert!(e.contains("template"), "{e}");
}

#[test]
fn dangerous_qa_bad_inputs_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let data = eval_data("dangerousqa/dangerousqa.json");
    let cou = eval_data("dangerousqa/cou.txt");
    let noq = write(d.path(), "cou.txt", "no placeholder");
    assert!(eval_fails(
        "dangerous-qa",
        &out,
        &["--data", &data, "--cou-template", &noq]
    )
    .contains("<question>"));
    let nums = write(d.path(), "q.json", "[1, 2]");
    assert!(eval_fails(
        "dangerous-qa",
        &out,
        &["--data", &nums, "--cou-template", &cou]
    )
    .contains("string"));
    let ann = write(d.path(), "a.json", r#"{"0": "maybe"}"#);
    let e = eval_fails(
        "dangerous-qa",
        &out,
        &[
            "--data",
            &data,
            "--cou-template",
            &cou,
            "--annotations",
            &ann,
        ],
    );
    assert!(e.contains("harmful"), "{e}");
    // The missing --cou-template is a usage error.
    eval_fails("dangerous-qa", &out, &["--data", &data]);
}

// ---------------------------------------------------------------- output folders, up-front checks

/// A non-empty --out without run.json is not an evaluation's folder: refused (exit 2, one
/// line) without writing into it, whether it holds a model or a copied eval minus run.json;
/// a folder with its run.json still resumes.
#[test]
fn eval_refuses_a_non_empty_out_without_run_json() {
    let d = tempfile::tempdir().unwrap();
    let data = eval_data("mmlu");
    let args = ["--data", data.as_str(), "--limit", "1", "--shots", "0"];
    // A model folder as --out.
    let m = d.path().join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    let before: Vec<_> = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let e = eval_fails("mmlu", &m, &args);
    assert!(e.contains("no run.json") && e.contains("--out"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let after: Vec<_> = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "nothing written into the model folder"
    );
    // A finished evaluation resumes; the same folder without its run.json is refused.
    let out = d.path().join("ev");
    eval("mmlu", &out, &args);
    let r = eval("mmlu", &out, &args);
    assert_eq!(r["run"]["reused"], 3);
    let copy = d.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(&out).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    std::fs::remove_file(copy.join("run.json")).unwrap();
    let e = eval_fails("mmlu", &copy, &args);
    assert!(e.contains("no run.json"), "{e}");
    assert!(!copy.join("run.json").exists());
}

/// An empty MMLU test file is bad input naming it, not a result over 0 questions.
#[test]
fn mmlu_rejects_an_empty_test_file() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("data");
    write(&root, "test/x_test.csv", "");
    let out = d.path().join("o");
    let e = eval_fails(
        "mmlu",
        &out,
        &["--data", root.to_str().unwrap(), "--shots", "0"],
    );
    assert!(
        e.contains("x_test.csv") && e.contains("no questions"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!out.exists());
}

/// Path flags and scorer settings are checked before anything is generated or written:
/// the error names the flag (and folder), and --out is not made.
#[test]
fn eval_checks_path_flags_before_generating() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let alpaca = eval_data("alpaca_eval/alpaca_eval.json");
    let nojudge = d.path().join("nonexist").display().to_string();
    let e = eval_fails(
        "alpaca-eval",
        &out,
        &[
            "--data",
            &alpaca,
            "--judge",
            &nojudge,
            "--max-new-tokens",
            "2",
        ],
    );
    assert!(e.contains(&format!("--judge {nojudge}")), "{e}");
    assert!(!out.exists(), "nothing generated: {e}");
    // A judge folder without a tokenizer.
    let j = d.path().join("judge");
    std::fs::create_dir_all(&j).unwrap();
    std::fs::copy(
        fixtures().join("tiny-llama/config.json"),
        j.join("config.json"),
    )
    .unwrap();
    let e = eval_fails(
        "alpaca-eval",
        &out,
        &["--data", &alpaca, "--judge", j.to_str().unwrap()],
    );
    assert!(e.contains("--judge") && e.contains("tokenizer.json"), "{e}");
    assert!(!out.exists());

    let rtp = eval_data("rtp/prompts.jsonl");
    let scorer = fixtures().join("roberta/model").display().to_string();
    let e = eval_fails(
        "real-toxicity",
        &out,
        &[
            "--data",
            &rtp,
            "--scorer",
            &scorer,
            "--scorer-max-length",
            "1",
        ],
    );
    assert!(e.contains("--scorer-max-length 1"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!out.exists(), "nothing generated: {e}");
    let e = eval_fails(
        "real-toxicity",
        &out,
        &["--data", &rtp, "--scorer", &model()],
    );
    assert!(
        e.contains(&format!("--scorer {}", model())) && e.contains("\"llama\""),
        "{e}"
    );
    assert!(!out.exists());

    // A missing model or adapter is named before --out is made.
    let e = eval_fails(
        "mmlu",
        &out,
        &["--data", &eval_data("mmlu"), "--adapter", &nojudge],
    );
    assert!(e.contains(&format!("--adapter {nojudge}")), "{e}");
    assert!(!out.exists());
}
