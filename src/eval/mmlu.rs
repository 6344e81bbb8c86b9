//! MMLU (Hendrycks et al.) in lm-evaluation-harness's format.
//!
//! Data: `DATA/test/{subject}_test.csv` and `DATA/dev/{subject}_dev.csv`, no header,
//! columns question,A,B,C,D,answer. Prompt (lm-eval `mmlu` default task): the header
//! `The following are multiple choice questions (with answers) about {subject with
//! spaces}.\n\n`, then the first `--shots` dev questions as `{question.strip()}\nA. …\nB.
//! …\nC. …\nD. …\nAnswer: X` joined by blank lines, a blank line, and the test question
//! ending in `Answer:`. Prediction: the choice among ` A`..` D` with the highest summed
//! log-likelihood (lm-eval's continuation rule, see `Lm::encode_continuation`).
//! Shots are dropped from the end while context + longest answer exceeds `--max-length`
//! tokens (hendrycks/test `evaluate.py`'s rule at 2048). `--limit N`: the first N test
//! questions of each subject, as lm-eval's `--limit` per subject task.

use super::lm::{argmax, sum, ChoiceItem, Lm};
use super::store::RunDir;
use super::EvalArgs;
use crate::commands::Common;
use crate::error::{bad, Error, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Few-shot examples: the first N questions of the subject's dev file.
    #[arg(long, default_value_t = 5)]
    pub shots: usize,
    /// Only these subjects (comma separated); default: every `test/*_test.csv`.
    #[arg(long)]
    pub subjects: Option<String>,
    /// Drop shots while context + longest answer is longer than this many tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
}

/// One MMLU question.
#[derive(Clone, Debug)]
pub struct Question {
    pub question: String,
    pub choices: [String; 4],
    /// 0..4 (A..D).
    pub answer: usize,
}

/// Reads one subject file.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let mut out = Vec::new();
    for (line, rec) in super::csv::read(path)? {
        let at = || format!("{}:{line}", path.display());
        if rec.len() != 6 {
            return Err(bad(format!(
                "{}: expected 6 columns (question,A,B,C,D,answer), got {}",
                at(),
                rec.len()
            )));
        }
        let answer = LETTERS
            .iter()
            .position(|l| *l == rec[5].trim())
            .ok_or_else(|| {
                bad(format!(
                    "{}: answer must be A, B, C or D, got {:?}",
                    at(),
                    rec[5]
                ))
            })?;
        let mut it = rec.into_iter();
        let question = it.next().expect("6 columns");
        let choices = [(); 4].map(|_| it.next().expect("6 columns"));
        out.push(Question {
            question,
            choices,
            answer,
        });
    }
    Ok(out)
}

/// `question.strip()` and the four choices, ending in `Answer:` (+ ` X` for a shot).
pub fn format_question(q: &Question, with_answer: bool) -> String {
    let mut s = q.question.trim().to_string();
    for (l, c) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("\n{l}. {c}"));
    }
    s.push_str("\nAnswer:");
    if with_answer {
        s.push(' ');
        s.push_str(LETTERS[q.answer]);
    }
    s
}

/// The lm-eval context of a test question with the given shots.
pub fn context(subject: &str, shots: &[Question], q: &Question) -> String {
    let mut s = format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.replace('_', " ")
    );
    for shot in shots {
        s.push_str(&format_question(shot, true));
        s.push_str("\n\n");
    }
    s.push_str(&format_question(q, false));
    s
}

/// Subjects with a test file, sorted.
fn list_subjects(data: &Path) -> Result<Vec<String>> {
    let test = data.join("test");
    let rd = std::fs::read_dir(&test).map_err(|e| {
        bad(format!(
            "--data {}: cannot read test/ ({e}); expected Hendrycks' layout test/{{subject}}_test.csv",
            data.display()
        ))
    })?;
    let mut subjects = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::read(&test, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(s) = name.strip_suffix("_test.csv") {
            subjects.push(s.to_string());
        }
    }
    subjects.sort();
    if subjects.is_empty() {
        return Err(bad(format!("{}: no *_test.csv files", test.display())));
    }
    Ok(subjects)
}

/// The task's own flags (`EvalArgs::check_flags` checks the shared ones).
pub fn check_flags(args: &Args) -> Result<()> {
    if args.max_length == 0 {
        return Err(bad("--max-length must be at least 1"));
    }
    Ok(())
}

/// A test question to score and where it came from.
struct Task {
    id: String,
    subject: String,
    index: usize,
    q: Question,
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    let device = common.setup()?;
    let ev = &args.eval;
    let template = ev.check()?;
    check_flags(args)?;
    let mut subjects = list_subjects(&ev.data)?;
    if let Some(list) = &args.subjects {
        let want: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
        for w in &want {
            if !subjects.contains(w) {
                return Err(bad(format!(
                    "--subjects: no test file for `{w}` in {}",
                    ev.data.join("test").display()
                )));
            }
        }
        subjects.retain(|s| want.contains(s));
    }
    let mut dev: BTreeMap<String, Vec<Question>> = BTreeMap::new();
    let mut selected = Vec::new();
    for s in &subjects {
        let path = ev.data.join("test").join(format!("{s}_test.csv"));
        let qs = read_questions(&path)?;
        if qs.is_empty() {
            return Err(bad(format!(
                "{}: no questions (an empty test file)",
                path.display()
            )));
        }
        let take = ev.limit.unwrap_or(usize::MAX).min(qs.len());
        for (i, q) in qs.into_iter().take(take).enumerate() {
            selected.push(Task {
                id: format!("{s}/{i}"),
                subject: s.clone(),
                index: i,
                q,
            });
        }
        if args.shots > 0 {
            let p = ev.data.join("dev").join(format!("{s}_dev.csv"));
            let d = read_questions(&p)?;
            if d.len() < args.shots {
                return Err(bad(format!(
                    "{}: --shots {} but the file holds {} questions",
                    p.display(),
                    args.shots,
                    d.len()
                )));
            }
            dev.insert(s.clone(), d.into_iter().take(args.shots).collect());
        }
    }

    let mut fixed = ev.fixed();
    fixed.insert("shots".into(), args.shots.into());
    fixed.insert("max_length".into(), args.max_length.into());
    let run = RunDir::open(&ev.out, "mmlu", &Value::Object(fixed.clone()))?;
    let mut log = run.samples()?;
    let todo: Vec<&Task> = selected.iter().filter(|t| !log.contains(&t.id)).collect();
    let (reused, computed) = (selected.len() - todo.len(), todo.len());

    if !todo.is_empty() {
        let lm = ev.load_model(device)?;
        let pb = crate::commands::progress_bar(todo.len() as u64, common.progress(), "mmlu");
        for chunk in todo.chunks(ev.batch_size) {
            let mut items = Vec::with_capacity(chunk.len());
            let mut meta = Vec::with_capacity(chunk.len());
            for t in chunk {
                let shots = dev.get(&t.subject).map_or(&[][..], Vec::as_slice);
                let (text, item, k) =
                    build(&lm, template, &t.subject, shots, &t.q, args.max_length)?;
                items.push(item);
                meta.push((text, k));
            }
            let lps = lm.choice_logprobs(&items)?;
            for ((t, (text, k)), (lp, item)) in chunk.iter().zip(meta).zip(lps.iter().zip(&items)) {
                let ll: Vec<f64> = lp.iter().map(|x| sum(x)).collect();
                let pred = argmax(&ll);
                let row = json!({
                    "id": t.id,
                    "subject": t.subject,
                    "index": t.index,
                    "shots": k,
                    "prompt": text,
                    "n_prompt_tokens": item.context.len(),
                    "logprobs": ll,
                    "pred": LETTERS[pred],
                    "answer": LETTERS[t.q.answer],
                    "correct": pred == t.q.answer,
                });
                log.append(super::as_row(row))?;
                pb.inc(1);
            }
        }
        pb.finish_and_clear();
    }

    // Results from every selected sample.
    let mut per: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for t in &selected {
        let r = log.get(&t.id).expect("every selected sample is done");
        let ok = r.get("correct").and_then(Value::as_bool).ok_or_else(|| {
            bad(format!(
                "{}: sample {} has no `correct`",
                run.dir.join("samples.jsonl").display(),
                t.id
            ))
        })?;
        let e = per.entry(&t.subject).or_default();
        e.0 += ok as usize;
        e.1 += 1;
    }
    let (right, n) = per.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let subsets: Map<String, Value> = per
        .iter()
        .map(|(s, (c, n))| {
            (
                s.to_string(),
                json!({"accuracy": *c as f64 / *n as f64, "n": n}),
            )
        })
        .collect();
    let macro_acc = super::mean(
        &per.values()
            .map(|(c, n)| *c as f64 / *n as f64)
            .collect::<Vec<_>>(),
    );
    let mut extra = Map::new();
    extra.insert("macro_accuracy".into(), macro_acc.into());
    extra.insert("subsets".into(), Value::Object(subsets));
    extra.insert(
        "settings".into(),
        super::settings(
            &fixed,
            json!({"limit": ev.limit, "subjects": args.subjects, "batch_size": ev.batch_size}),
        ),
    );
    extra.insert("run".into(), super::run_counts(reused, computed));
    let acc = (n > 0).then(|| right as f64 / n as f64);
    run.write_json(
        "results.json",
        &super::results("mmlu", "accuracy", acc, n, extra),
    )?;
    super::report("mmlu", reused, computed, &ev.out);
    Ok(())
}

/// The context (with as many shots as fit `max_length`), its choice item and the shots used.
fn build(
    lm: &Lm,
    template: crate::model::Template,
    subject: &str,
    shots: &[Question],
    q: &Question,
    max_length: usize,
) -> Result<(String, ChoiceItem, usize)> {
    let choices: Vec<String> = LETTERS.iter().map(|l| format!(" {l}")).collect();
    let refs: Vec<&str> = choices.iter().map(String::as_str).collect();
    let mut k = shots.len();
    loop {
        let text = template.prompt(&context(subject, &shots[..k], q));
        let item = lm.choice_item(&text, &refs)?;
        let longest = item.choices.iter().map(Vec::len).max().unwrap_or(0);
        if k == 0 || item.context.len() + longest <= max_length {
            return Ok((text, item, k));
        }
        k -= 1;
    }
}
