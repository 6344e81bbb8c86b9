//! AlpacaEval: outputs for alpaca_eval's instructions, and a win rate.
//!
//! Data: alpaca_eval's JSON (`alpaca_eval.json`: a list of `{instruction, output, generator,
//! dataset}`; `output` is the reference answer). Each instruction is rendered with
//! `--template` and answered (greedy by default); `DIR/outputs.json` is the list of
//! `{instruction, output, generator[, dataset]}` the alpaca_eval tool reads, with
//! generator = `--name`, else the adapter's folder name, else the model's.
//!
//! Win rate = 100·mean(p − 1) over judged instructions, p ∈ [1, 2] (1: the reference wins,
//! 2: ours, 1.5: a draw), as alpaca_eval computes it. p comes from
//! - `--annotations FILE`: alpaca_eval's annotations JSON (a list of rows with
//!   `instruction` and `preference`; 0 counts as a draw (1.5), as alpaca_eval does;
//!   null/NaN or values outside [1, 2] are left out), matched by instruction; or
//! - `--judge DIR`: a local model asked which response is better (`judge_prompt`), in both
//!   orders to cancel position bias; p = 1 + mean over the orders of P(ours), where
//!   P = the two-way softmax of the log-likelihoods of ` 1` and ` 2`.
//!
//! `--limit N`: the first N instructions.

use super::judge::{self, LocalJudge};
use super::store::{Row, RunDir};
use super::{EvalArgs, GenJob};
use crate::commands::Common;
use crate::error::{bad, Result};
use crate::model::Template;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub eval: EvalArgs,
    /// The `generator` name written to outputs.json (default: adapter or model folder name).
    #[arg(long)]
    pub name: Option<String>,
    /// Most tokens generated per prompt.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// When sampling, keep only the k most likely tokens first (0: off); default as
    /// transformers: the model's generation_config.json `top_k`, else 50.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Stop when the output contains this string (repeatable); it is cut off.
    #[arg(long)]
    pub stop: Vec<String>,
    /// alpaca_eval annotations JSON with a `preference` per instruction.
    #[arg(long, conflicts_with = "judge")]
    pub annotations: Option<PathBuf>,
    /// A local LLaMA/Mistral folder that judges our output against the reference.
    #[arg(long)]
    pub judge: Option<PathBuf>,
    /// Chat template of the judge prompt: none, vicuna, mistral.
    #[arg(long, default_value = "none")]
    pub judge_template: String,
}

/// The pairwise judge prompt (palign's own wording); the verdict is ` 1` or ` 2`.
pub fn judge_prompt(instruction: &str, first: &str, second: &str) -> String {
    format!(
        "Two AI assistants answered the same instruction. Decide which response is better: \
         more helpful, correct, relevant and clear.\n\n\
         Instruction:\n{instruction}\n\n\
         Response 1:\n{first}\n\n\
         Response 2:\n{second}\n\n\
         Which response is better, 1 or 2?\nAnswer:"
    )
}

/// alpaca_eval's preference rule: 0 (old draw code) → 1.5; kept only within [1, 2].
pub fn normalize_preference(v: &Value) -> Option<f64> {
    let p = v.as_f64()?;
    let p = if p == 0.0 { 1.5 } else { p };
    (1.0..=2.0).contains(&p).then_some(p)
}

/// One instruction of the data file.
struct Item {
    instruction: String,
    reference: Option<String>,
    dataset: Option<Value>,
}

fn read_data(path: &std::path::Path) -> Result<Vec<Item>> {
    let v = super::read_json(path, "--data")?;
    let list = v.as_array().ok_or_else(|| {
        bad(format!(
            "--data {}: expected a JSON list of {{instruction, output, ...}}",
            path.display()
        ))
    })?;
    if list.is_empty() {
        return Err(bad(format!("--data {}: the list is empty", path.display())));
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            let instruction = r
                .get("instruction")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    bad(format!(
                        "{}: [{i}]: field `instruction` must be a string",
                        path.display()
                    ))
                })?;
            Ok(Item {
                instruction: instruction.to_string(),
                reference: r.get("output").and_then(Value::as_str).map(str::to_string),
                dataset: r.get("dataset").cloned(),
            })
        })
        .collect()
}

/// instruction → (preference or None, the annotated model output if given).
type Annotations = HashMap<String, (Option<f64>, Option<String>)>;

fn read_annotations(path: &std::path::Path) -> Result<Annotations> {
    let v = super::read_json(path, "--annotations")?;
    let list = v.as_array().ok_or_else(|| {
        bad(format!(
            "--annotations {}: expected alpaca_eval's JSON list of annotations",
            path.display()
        ))
    })?;
    let mut m = HashMap::new();
    for (i, r) in list.iter().enumerate() {
        let ins = r
            .get("instruction")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                bad(format!(
                    "--annotations {}: [{i}]: field `instruction` must be a string",
                    path.display()
                ))
            })?;
        let pref = r.get("preference").ok_or_else(|| {
            bad(format!(
                "--annotations {}: [{i}]: field `preference` is missing",
                path.display()
            ))
        })?;
        if !(pref.is_null() || pref.is_number()) {
            return Err(bad(format!(
                "--annotations {}: [{i}]: `preference` must be a number or null",
                path.display()
            )));
        }
        let out2 = r
            .get("output_2")
            .and_then(Value::as_str)
            .map(str::to_string);
        m.entry(ins.to_string())
            .or_insert((normalize_preference(pref), out2));
    }
    Ok(m)
}

/// The task's own flags and the files they name, before anything is generated: the
/// judge template, stop strings and the `--judge` folder (its config.json and tokenizer;
/// the weights load when judging starts). Returns the judge template.
pub fn check_flags(args: &Args) -> Result<Template> {
    let judge_template: Template = args.judge_template.parse().map_err(|_| {
        bad(format!(
            "--judge-template: unknown template `{}` (none, vicuna, mistral)",
            args.judge_template
        ))
    })?;
    if args.stop.iter().any(String::is_empty) {
        return Err(bad("--stop: a stop string must not be empty"));
    }
    if let Some(dir) = &args.judge {
        super::check_dir("--judge", dir)?;
        let named = |e| super::named("--judge", dir, e);
        let cfg = crate::model::config::ModelConfig::load(dir).map_err(named)?;
        crate::model::Tokenizer::load(dir, cfg.bos_token_id, cfg.eos_token_ids.first().copied())
            .map_err(named)?;
    }
    if let Some(p) = &args.annotations {
        if !p.is_file() {
            return Err(bad(format!("--annotations {}: no such file", p.display())));
        }
    }
    Ok(judge_template)
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    let device = common.setup()?;
    let ev = &args.eval;
    let template = ev.check()?;
    let judge_template = check_flags(args)?;
    let sampling = super::Sampling::resolve(&ev.model, args.temperature, args.top_p, args.top_k)?;
    let gen = super::gen_config(common, args.max_new_tokens, &sampling, ev.batch_size)?;
    let items = read_data(&ev.data)?;
    let n_sel = ev.limit.unwrap_or(usize::MAX).min(items.len());
    let items = &items[..n_sel];
    if args.judge.is_some() {
        if let Some(i) = items.iter().position(|it| it.reference.is_none()) {
            return Err(bad(format!(
                "--data {}: [{i}] has no reference `output` to judge against",
                ev.data.display()
            )));
        }
    }
    let annotations = args
        .annotations
        .as_deref()
        .map(read_annotations)
        .transpose()?;
    let generator = args.name.clone().unwrap_or_else(|| {
        let dir = ev.adapter.as_deref().unwrap_or(&ev.model);
        std::path::Path::new(&super::canon(dir))
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });

    let mut fixed = ev.fixed();
    for (k, v) in [
        ("max_new_tokens", json!(args.max_new_tokens)),
        ("stop", json!(args.stop)),
        ("seed", json!(common.seed)),
    ] {
        fixed.insert(k.into(), v);
    }
    sampling.record(&mut fixed);
    let run = RunDir::open(&ev.out, "alpaca-eval", &Value::Object(fixed.clone()))?;
    let mut log = run.samples()?;
    let ids: Vec<String> = (0..items.len()).map(|i| i.to_string()).collect();
    let todo: Vec<usize> = (0..items.len())
        .filter(|&i| !log.contains(&ids[i]))
        .collect();
    let (reused, computed) = (items.len() - todo.len(), todo.len());
    if !todo.is_empty() {
        let lm = ev.load_model(device)?;
        let mut jobs = Vec::with_capacity(todo.len());
        for &i in &todo {
            let p = template.prompt(&items[i].instruction);
            jobs.push(GenJob {
                id: ids[i].clone(),
                prompt_ids: lm.encode(&p)?,
                row: super::as_row(json!({
                    "index": i, "instruction": items[i].instruction, "prompt": p,
                })),
            });
        }
        let pb = crate::commands::progress_bar(jobs.len() as u64, common.progress(), "alpaca-eval");
        super::generate_jobs(
            &lm,
            jobs,
            &gen,
            ev.decode_batch,
            &args.stop,
            &mut log,
            &pb,
            |rows| {
                for r in rows {
                    let t = r["output"].as_str().unwrap_or_default().trim().to_string();
                    r.insert("output".into(), t.into());
                }
                Ok(())
            },
        )?;
        pb.finish_and_clear();
    }
    let output = |i: usize| -> String {
        let r = log.get(&ids[i]).expect("every selected sample is done");
        r.get("output")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };

    // outputs.json for the alpaca_eval tool.
    let outputs: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let mut o =
                json!({"instruction": it.instruction, "output": output(i), "generator": generator});
            if let Some(d) = &it.dataset {
                o["dataset"] = d.clone();
            }
            o
        })
        .collect();
    run.write_json("outputs.json", &Value::Array(outputs))?;

    // Preferences from annotations or a local judge.
    let mut prefs: Vec<Option<f64>> = vec![None; items.len()];
    let mut judge_info = Value::Null;
    let mut mismatch = 0;
    let mut judged_now = 0;
    if let (Some(ann), Some(path)) = (&annotations, &args.annotations) {
        for (i, it) in items.iter().enumerate() {
            if let Some((p, out2)) = ann.get(&it.instruction) {
                prefs[i] = *p;
                mismatch += out2.as_ref().is_some_and(|o| o.trim() != output(i)) as usize;
            }
        }
        if mismatch > 0 {
            eprintln!(
                "warning: {mismatch} annotations judged an `output_2` that differs from this run's output"
            );
        }
        judge_info = json!({"kind": "annotations", "path": super::canon(path)});
    }
    if let Some(dir) = &args.judge {
        let judge = LocalJudge::load(dir, judge_template, ev.batch_size, device)
            .map_err(|e| super::named("--judge", dir, e))?;
        let mut jlog = run.judgments()?;
        let pb = crate::commands::progress_bar(items.len() as u64, common.progress(), "judge");
        judged_now = judge::judge_all(
            &judge,
            &ids,
            &mut jlog,
            &[" 1", " 2"],
            &pb,
            |id| {
                let i: usize = id.parse().expect("ids are indices");
                let (ins, ours) = (&items[i].instruction, output(i));
                let reference = items[i].reference.as_deref().unwrap_or_default();
                Ok(vec![
                    judge_prompt(ins, reference, &ours),
                    judge_prompt(ins, &ours, reference),
                ])
            },
            |_, lps| {
                // Order 1: ours is response 2; order 2: ours is response 1.
                let p_ours = [judge::p_second(&lps[0]), 1.0 - judge::p_second(&lps[1])];
                json!({
                    "logprobs_reference_first": lps[0],
                    "logprobs_ours_first": lps[1],
                    "p_ours": p_ours,
                    "preference": 1.0 + (p_ours[0] + p_ours[1]) / 2.0,
                })
            },
        )?;
        pb.finish_and_clear();
        for (i, id) in ids.iter().enumerate() {
            prefs[i] = jlog
                .get(&judge::key(&judge.name, id))
                .and_then(|r| r.get("preference"))
                .and_then(normalize_preference);
        }
        judge_info =
            json!({"kind": "model", "name": judge.name, "template": judge_template.name()});
    }

    // samples.jsonl with each sample's preference under this run's judge.
    if !judge_info.is_null() {
        let rows: Vec<Row> = (0..items.len())
            .map(|i| {
                let mut r = log.get(&ids[i]).expect("done").clone();
                r.insert("judge".into(), judge_info.clone());
                r.insert("preference".into(), prefs[i].into());
                r
            })
            .collect();
        log.rewrite(&rows)?;
    }

    let judged: Vec<f64> = prefs.iter().flatten().copied().collect();
    let win_rate = super::mean(&judged).map(|m| 100.0 * (m - 1.0));
    let mut extra = Map::new();
    extra.insert("judge".into(), judge_info.clone());
    extra.insert("generator".into(), generator.into());
    extra.insert("n_judged".into(), judged.len().into());
    extra.insert(
        "n_wins".into(),
        judged.iter().filter(|&&p| p > 1.5).count().into(),
    );
    extra.insert(
        "n_draws".into(),
        judged.iter().filter(|&&p| p == 1.5).count().into(),
    );
    extra.insert(
        "n_losses".into(),
        judged.iter().filter(|&&p| p < 1.5).count().into(),
    );
    extra.insert("standard_error".into(), standard_error(&judged).into());
    extra.insert("annotation_output_mismatch".into(), mismatch.into());
    if judge_info.is_null() {
        extra.insert(
            "note".into(),
            "no judge: run alpaca_eval on outputs.json, then rerun with --annotations FILE (or use --judge DIR)".into(),
        );
    }
    extra.insert(
        "settings".into(),
        super::settings(
            &fixed,
            json!({"limit": ev.limit, "batch_size": ev.batch_size, "decode_batch": ev.decode_batch.to_string(), "name": args.name}),
        ),
    );
    let mut counts = super::run_counts(reused, computed);
    counts["judged"] = judged_now.into();
    extra.insert("run".into(), counts);
    run.write_json(
        "results.json",
        &super::results("alpaca-eval", "win_rate", win_rate, items.len(), extra),
    )?;
    super::report("alpaca-eval", reused, computed, &ev.out);
    Ok(())
}

/// 100 × the standard error of the mean of p − 1 (sample standard deviation, ddof 1).
fn standard_error(ps: &[f64]) -> Option<f64> {
    if ps.len() < 2 {
        return None;
    }
    let n = ps.len() as f64;
    let m = ps.iter().sum::<f64>() / n;
    let var = ps.iter().map(|p| (p - m).powi(2)).sum::<f64>() / (n - 1.0);
    Some(100.0 * (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_follow_alpaca_eval() {
        assert_eq!(normalize_preference(&json!(1)), Some(1.0));
        assert_eq!(normalize_preference(&json!(2.0)), Some(2.0));
        assert_eq!(normalize_preference(&json!(0)), Some(1.5));
        assert_eq!(normalize_preference(&json!(1.25)), Some(1.25));
        assert_eq!(normalize_preference(&Value::Null), None);
        assert_eq!(normalize_preference(&json!(3)), None);
        assert_eq!(normalize_preference(&json!(0.5)), None);
    }

    #[test]
    fn judge_prompt_places_both_responses() {
        let p = judge_prompt("Do X.", "first answer", "second answer");
        let a = p.find("Response 1:\nfirst answer").unwrap();
        let b = p.find("Response 2:\nsecond answer").unwrap();
        assert!(a < b && p.starts_with("Two AI") && p.ends_with("\nAnswer:"));
    }
}
