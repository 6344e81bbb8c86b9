//! `palign demo [--out DIR]`: the whole pipeline on the tiny model, on the CPU, in well
//! under a minute: init-tiny → SFT → DPO (continuing the SFT adapter) → merge-adapter →
//! evaluation on held-out preference pairs, with a report and a PNG/SVG of the curves.
//! The data is generated here: arithmetic questions whose chosen answer is right and
//! polite and whose rejected answer is wrong or dismissive.

use super::Common;
use crate::error::{bad, Error, Result};
use crate::lora::{fold, peft, Adapter};
use crate::model::{tiny, Arch, Model, ScoreSeq, Template, Tokenizer};
use crate::plot::{Panel, Series, COLORS};
use crate::train::{runner, Method, TrainArgs};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the demo writes its model, runs, plot and report (must not exist).
    #[arg(long, default_value = "palign-demo")]
    pub out: PathBuf,
}

/// One preference pair of the demo data.
struct Pair {
    prompt: String,
    chosen: String,
    rejected: String,
}

const DISMISSIVE: [&str; 4] = [
    "Figure it out yourself.",
    "I will not help with that.",
    "Who cares?",
    "Ask someone else.",
];

/// `n` pairs: "What is a plus b?" with the right sum vs. a wrong sum or a brush-off.
fn make_pairs(n: usize, seed: u64) -> Vec<Pair> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (a, b) = (rng.random_range(1..50u32), rng.random_range(1..50u32));
            let wrong = a + b + rng.random_range(1..9u32);
            let rejected = if rng.random::<bool>() {
                format!("{a} plus {b} is {wrong}.")
            } else {
                DISMISSIVE[rng.random_range(0..DISMISSIVE.len())].to_string()
            };
            Pair {
                prompt: format!("Q: What is {a} plus {b}?\nA:"),
                chosen: format!(" {a} plus {b} is {}.", a + b),
                rejected,
            }
        })
        .collect()
}

fn write_pairs(path: &Path, pairs: &[Pair]) -> Result<()> {
    crate::fsio::write_atomic(path, |w| {
        for p in pairs {
            writeln!(
                w,
                "{}",
                json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
            )?;
        }
        Ok(())
    })
}

/// Runs `palign sft|dpo` in-process with CLI-style flags (so the CLI's defaults apply).
fn train(method: Method, flags: &[String], common: &Common) -> Result<()> {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: TrainArgs,
    }
    let argv = std::iter::once("palign".to_string()).chain(flags.iter().cloned());
    let w = Wrap::try_parse_from(argv).map_err(|e| bad(format!("demo: {e}")))?;
    let quiet = Common {
        quiet: true,
        ..common.clone()
    };
    runner::run(&w.args, &quiet, method)
}

/// Preference accuracy and mean margin `logp(chosen) − logp(rejected)` on held-out pairs.
fn pref_eval(
    model: &Model,
    adapter: Option<&Adapter>,
    tok: &Tokenizer,
    pairs: &[Pair],
) -> Result<(f64, f64)> {
    let mut seqs = Vec::new();
    for p in pairs {
        for c in [&p.chosen, &p.rejected] {
            let (ids, prompt_len) =
                crate::data::rows::encode_rendered(tok, &Template::None.prompt(&p.prompt), c)?;
            seqs.push(ScoreSeq { ids, prompt_len });
        }
    }
    let lp = model.completion_logprobs(&seqs, adapter)?;
    let sums: Vec<f64> = lp
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).sum())
        .collect();
    let n = pairs.len() as f64;
    let acc = sums.chunks(2).filter(|c| c[0] > c[1]).count() as f64 / n;
    let margin = sums.chunks(2).map(|c| c[0] - c[1]).sum::<f64>() / n;
    Ok((acc, margin))
}

fn metrics(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn curve(rows: &[Value], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
        .collect()
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    common.setup_cpu_only("demo")?;
    let t0 = std::time::Instant::now();
    // Written in place (not staged under a temporary name) so that the paths recorded in
    // run.json and adapter_config.json are the final ones; every file is still atomic.
    if args.out.exists() {
        return Err(bad(format!(
            "{} already exists; remove it or pass --out",
            args.out.display()
        )));
    }
    std::fs::create_dir(&args.out).map_err(|e| Error::write(&args.out, e))?;
    let dir = args.out.as_path();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let model_dir = dir.join("tiny-llama");
    std::fs::create_dir(&model_dir).map_err(|e| Error::write(&model_dir, e))?;
    tiny::write_model(&model_dir, Arch::Llama, common.seed)?;
    let (train_pairs, held_out) = (
        make_pairs(256, common.seed),
        make_pairs(64, common.seed + 1),
    );
    write_pairs(&dir.join("train_pairs.jsonl"), &train_pairs)?;
    write_pairs(&dir.join("heldout_pairs.jsonl"), &held_out)?;
    println!("palign demo: tiny LLaMA (4 layers, hidden 128), 256 training pairs, 64 held out");

    let shared = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--model",
            &p("tiny-llama"),
            "--data",
            &format!("jsonl:{}", p("train_pairs.jsonl")),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(
            [
                "--peft",
                "qlora",
                "--batch-size",
                "16",
                "--max-length",
                "48",
                "--max-prompt-length",
                "24",
            ]
            .map(String::from),
        );
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    train(
        Method::Sft,
        &shared(&[
            "--out",
            &p("sft"),
            "--rank",
            "16",
            "--alpha",
            "32",
            "--lr",
            "3e-3",
            "--steps",
            "40",
            "--targets",
            "all",
        ]),
        common,
    )?;
    println!(
        "  sft: 40 QLoRA steps done ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
    train(
        Method::Dpo,
        &shared(&[
            "--out",
            &p("dpo"),
            "--init-adapter",
            &p("sft"),
            "--lr",
            "2e-3",
            "--steps",
            "40",
            "--beta",
            "0.1",
        ]),
        common,
    )?;
    println!(
        "  dpo: 40 steps on top of the SFT adapter ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
    let cfg = crate::model::ModelConfig::load(&model_dir)?;
    let dpo_adapter = peft::load(&dir.join("dpo"), &cfg)?;
    let merged = dir.join("merged");
    std::fs::create_dir(&merged).map_err(|e| Error::write(&merged, e))?;
    fold::fold_model(
        &model_dir,
        Some(&dpo_adapter),
        &merged,
        fold::output_dtype(None, &cfg)?,
    )?;
    println!(
        "  merge-adapter: DPO adapter folded into the base ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );

    // Evaluation on held-out pairs. Training ran on the NF4 base (QLoRA), so adapters
    // are evaluated on it too; the merged model is dense (NF4 dequantized + B·A).
    let base = Model::load_with(
        &model_dir,
        Some((crate::quant::DEFAULT_BLOCKSIZE, true)),
        false,
    )?;
    let tok = Tokenizer::load(&model_dir, Some(1), Some(2))?;
    let sft_adapter = peft::load(&dir.join("sft"), &cfg)?;
    let merged_model = Model::load(&merged)?;
    let rows = [
        ("base (NF4)", pref_eval(&base, None, &tok, &held_out)?),
        (
            "+ SFT adapter",
            pref_eval(&base, Some(&sft_adapter), &tok, &held_out)?,
        ),
        (
            "+ DPO adapter",
            pref_eval(&base, Some(&dpo_adapter), &tok, &held_out)?,
        ),
        (
            "merged (dense)",
            pref_eval(&merged_model, None, &tok, &held_out)?,
        ),
    ];
    let sft_m = metrics(&dir.join("sft/metrics.jsonl"))?;
    let dpo_m = metrics(&dir.join("dpo/metrics.jsonl"))?;
    let first_last = |rows: &[Value], k: &str| -> (f64, f64) {
        let c = curve(rows, k);
        (
            c.first().map_or(f64::NAN, |x| x.1),
            c.last().map_or(f64::NAN, |x| x.1),
        )
    };
    let (s0, s1) = first_last(&sft_m, "loss");
    let (d0, d1) = first_last(&dpo_m, "loss");
    let (a0, a1) = first_last(&dpo_m, "rewards/accuracies");
    let mut report = String::new();
    report += &format!("SFT loss (mean token cross-entropy): {s0:.3} -> {s1:.3}\n");
    report += &format!(
        "DPO loss: {d0:.3} -> {d1:.3}; reward accuracy on training batches: {a0:.2} -> {a1:.2}\n"
    );
    report += "held-out pairs: preference accuracy = share with logp(chosen) > logp(rejected)\n";
    for (name, (acc, margin)) in &rows {
        report += &format!("  {name:16} accuracy {acc:5.2}   mean margin {margin:8.3} nats\n");
    }
    print!("{report}");
    crate::plot::write(
        &dir.join("curves"),
        &[
            Panel {
                title: "sft loss".into(),
                x_label: "step".into(),
                series: vec![Series {
                    label: "sft".into(),
                    color: COLORS[0],
                    points: curve(&sft_m, "loss"),
                }],
            },
            Panel {
                title: "dpo".into(),
                x_label: "step".into(),
                series: vec![
                    Series {
                        label: "loss".into(),
                        color: COLORS[1],
                        points: curve(&dpo_m, "loss"),
                    },
                    Series {
                        label: "reward acc".into(),
                        color: COLORS[2],
                        points: curve(&dpo_m, "rewards/accuracies"),
                    },
                ],
            },
        ],
    )?;
    crate::fsio::write_bytes_atomic(&dir.join("report.txt"), report.as_bytes())?;
    println!(
        "done in {:.1}s: {} holds the model, runs (sft/, dpo/), merged/, curves.png, curves.svg, report.txt",
        t0.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
