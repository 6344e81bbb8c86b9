//! `palign bench train` and `bench generate` on the CPU (`--shape tiny`): the machine lines
//! tools/gpu-check.sh parses, and losses (or token counts) that mean the real step ran.

mod common;

use common::{palign, run};

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

fn bench(method: &str, peft: &str) -> (String, Vec<f64>) {
    let o = palign(&[
        "bench",
        "train",
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--method",
        method,
        "--peft",
        peft,
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--warmup",
        "1",
        "--steps",
        "2",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let line = out
        .lines()
        .find(|l| l.starts_with("BENCH_TRAIN "))
        .unwrap_or_else(|| panic!("no BENCH_TRAIN line: {out}"))
        .to_string();
    let losses = err
        .lines()
        .find_map(|l| l.strip_prefix("loss per step: "))
        .unwrap_or_else(|| panic!("no loss line: {err}"))
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (line, losses)
}

#[test]
fn bench_train_prints_the_line_and_trains() {
    let (line, losses) = bench("sft", "lora");
    assert_eq!(field(&line, "impl"), "palign");
    assert_eq!(field(&line, "shape"), "tiny");
    assert_eq!(field(&line, "batch"), "2");
    assert_eq!(field(&line, "seq"), "32");
    assert!(field(&line, "tokens_per_s").parse::<f64>().unwrap() > 0.0);
    assert_eq!(field(&line, "mfu"), "nan");
    assert_eq!(field(&line, "mfu_run"), "nan");
    assert_eq!(field(&line, "gpu"), "\"cpu\"");
    // 1 warm-up + 2 timed steps; random weights on a 512-token vocabulary start near
    // ln 512 and the loss moves with training.
    assert_eq!(losses.len(), 3);
    assert!((losses[0] - 512f64.ln()).abs() < 0.2, "{losses:?}");
    assert!(losses[2] < losses[0], "{losses:?}");

    // DPO on an NF4 base: the policy starts equal to the reference (B = 0), so the first
    // loss is exactly ln 2.
    let (line, losses) = bench("dpo", "qlora");
    assert_eq!(field(&line, "peft"), "qlora");
    // Each pair's 16-token prompt is computed once in both passes: DPO trains without
    // dropout (as TRL does), so the policy pass shares too.
    assert_eq!(field(&line, "shared_tokens"), "32+32");
    assert!((losses[0] - 2f64.ln()).abs() < 1e-4, "{losses:?}");
    assert!(losses[2] < losses[0], "{losses:?}");
}

/// Runs `bench generate` on the tiny shape, whatever the outcome.
fn bench_generate(extra: &[&str]) -> std::process::Output {
    let mut args = vec!["bench", "generate", "--device", "cpu", "--shape", "tiny"];
    args.extend(extra);
    run(&args)
}

#[test]
fn bench_generate_prints_the_line_and_counts_the_steps() {
    let o = bench_generate(&[
        "--batch-size",
        "3",
        "--prompt-len",
        "8",
        "--new-tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let line = out
        .lines()
        .find(|l| l.starts_with("BENCH_GENERATE "))
        .unwrap_or_else(|| panic!("no BENCH_GENERATE line: {out}"));
    assert_eq!(field(line, "impl"), "palign");
    assert_eq!(field(line, "peft"), "qlora");
    assert_eq!(field(line, "rank"), "16");
    // Every prompt gets all 5 tokens (no EOS): the first from the prefill, then 4 decode
    // steps feeding the 3 sequences together.
    assert_eq!(field(line, "generated"), "15");
    assert_eq!(field(line, "decode_steps"), "4");
    for key in [
        "tokens_per_s",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    ] {
        assert!(
            field(line, key).parse::<f64>().unwrap() > 0.0,
            "{key}: {line}"
        );
    }
    assert_eq!(field(line, "peak_mem_gib"), "nan");
    assert_eq!(field(line, "gpu"), "\"cpu\"");

    // One new token is the prefill alone: no decode figures, and no adapter with rank 0.
    let o = bench_generate(&[
        "--batch-size",
        "2",
        "--prompt-len",
        "4",
        "--new-tokens",
        "1",
        "--rank",
        "0",
        "--peft",
        "lora",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let line = out
        .lines()
        .find(|l| l.starts_with("BENCH_GENERATE "))
        .unwrap();
    assert_eq!(field(line, "generated"), "2");
    assert_eq!(field(line, "decode_steps"), "0");
    assert_eq!(field(line, "decode_tokens_per_s"), "nan");
    assert_eq!(field(line, "decode_step_ms"), "nan");
}

/// `--vary` with more prompts than slots: row r ends after lo + (r · 2654435761 mod span)
/// tokens (lo = N/8; the formula tools/bench_hf.py repeats), and the slots refill.
#[test]
fn bench_generate_vary_ends_rows_at_their_lengths() {
    let o = bench_generate(&[
        "--batch-size",
        "4",
        "--prompts",
        "10",
        "--vary",
        "--prompt-len",
        "8",
        "--new-tokens",
        "16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let line = out
        .lines()
        .find(|l| l.starts_with("BENCH_GENERATE "))
        .unwrap();
    let want: u64 = (0..10u64).map(|r| 2 + r * 2_654_435_761 % 15).sum();
    assert_eq!(field(line, "generated"), want.to_string());
    assert_eq!(field(line, "prompts"), "10");
    assert_eq!(field(line, "vary"), "true");
    // the longest row (16 tokens) takes 15 decode steps at least
    assert!(
        field(line, "decode_steps").parse::<usize>().unwrap() >= 15,
        "{line}"
    );
}

#[test]
fn bench_generate_refuses_bad_input_in_one_line() {
    for (args, says) in [
        (&["--new-tokens", "0"][..], "--new-tokens"),
        (&["--peft", "dora"][..], "--peft"),
        (&["--targets", "x_proj"][..], "x_proj"),
        (&["--top-p", "2"][..], "--top-p"),
        (&["--prompts", "0"][..], "--prompts"),
    ] {
        let o = bench_generate(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let o = run(&["bench", "generate", "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("GPU only"));
}
