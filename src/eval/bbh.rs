//! BIG-Bench Hard (Suzgun et al.), 3-shot chain of thought.
//!
//! Data: `DATA/bbh/{task}.json` (`{"examples": [{"input", "target"}]}`) and
//! `DATA/cot-prompts/{task}.txt` (canary line(s), a `-----` line, then the task description
//! and three `Q: …\nA: Let's think step by step. … So the answer is X.` exemplars).
//! CoT prompt = the text after `-----` (trailing whitespace trimmed) + `\n\nQ: {input}\nA:
//! Let's think step by step.`; greedy, stopped at `\n\nQ:`; the answer is the reference's
//! first match of `(?<=the answer is )(.*)(?=.)` (see `extract_answer`), compared exactly
//! with the target; the score is the macro average of per-task accuracy.
//!
//! `--no-cot` (answer-only, as the BBH paper's AO prompting): the same description and
//! exemplars with each exemplar's chain replaced by its final answer, `Q: {input}\nA:
//! {answer}` joined by blank lines, the test question ending in `A:`; generation stops at
//! the first newline and the answer is the output trimmed. `--shots N` keeps the first N
//! exemplars. `--limit N`: the first N examples of each task.

use super::store::RunDir;
use super::{EvalArgs, GenJob};
use crate::commands::Common;
use crate::error::{bad, Error, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Exemplars kept from each prompt file (default: all, i.e. 3).
    #[arg(long)]
    pub shots: Option<usize>,
    /// Answer directly (answer-only exemplars) instead of chain of thought.
    #[arg(long)]
    pub no_cot: bool,
    /// Only these tasks (comma separated); default: every `bbh/*.json`.
    #[arg(long)]
    pub tasks: Option<String>,
    /// Most tokens generated per question (default 256 with CoT, 32 with --no-cot).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
}

/// The reference's answer extraction: the first `(?<=the answer is )(.*)(?=.)` match, i.e.
/// after the first "the answer is " whose line continues, the rest of that line minus its
/// last character (the sentence's full stop). `None` when nothing matches.
pub fn extract_answer(text: &str) -> Option<&str> {
    const KEY: &str = "the answer is ";
    let mut from = 0;
    while let Some(i) = text[from..].find(KEY) {
        let start = from + i + KEY.len();
        let rest = &text[start..];
        // `.` does not match a newline: the match ends with the line.
        let line = &rest[..rest.find('\n').unwrap_or(rest.len())];
        if let Some((last, _)) = line.char_indices().last() {
            return Some(&line[..last]);
        }
        from += i + 1;
    }
    None
}

/// A parsed CoT prompt file.
#[derive(Clone, Debug)]
pub struct FewShot {
    /// Everything after the `-----` line, trailing whitespace trimmed.
    pub raw: String,
    /// The task description before the first exemplar.
    pub description: String,
    /// (input, chain-of-thought answer after `A: `) per exemplar.
    pub exemplars: Vec<(String, String)>,
}

impl FewShot {
    pub fn parse(text: &str, what: &str) -> Result<FewShot> {
        let text = text.replace("\r\n", "\n");
        let mut after = None;
        let mut pos = 0;
        for line in text.split_inclusive('\n') {
            pos += line.len();
            if line.trim_end() == "-----" {
                after = Some(&text[pos..]);
                break;
            }
        }
        let raw = after
            .ok_or_else(|| bad(format!("{what}: no `-----` line after the canary")))?
            .trim_end()
            .to_string();
        // Exemplars start at `Q: ` lines that follow a blank line (or open the text).
        let mut starts = Vec::new();
        if raw.starts_with("Q: ") {
            starts.push(0);
        }
        let mut from = 0;
        while let Some(i) = raw[from..].find("\n\nQ: ") {
            starts.push(from + i + 2);
            from += i + 2;
        }
        if starts.is_empty() {
            return Err(bad(format!("{what}: no `Q: ` exemplar after `-----`")));
        }
        let description = raw[..starts[0]].trim_end().to_string();
        let mut exemplars = Vec::new();
        for (k, &s) in starts.iter().enumerate() {
            let end = starts.get(k + 1).map_or(raw.len(), |&e| e - 2);
            let block = &raw[s + 3..end];
            let (input, answer) = block
                .split_once("\nA: ")
                .ok_or_else(|| bad(format!("{what}: exemplar {} has no `\\nA: ` line", k + 1)))?;
            exemplars.push((input.to_string(), answer.trim_end().to_string()));
        }
        Ok(FewShot {
            raw,
            description,
            exemplars,
        })
    }

    /// The few-shot block with the first `shots` exemplars (all: the file's text as is).
    pub fn block(&self, shots: usize, cot: bool, what: &str) -> Result<String> {
        if cot && shots >= self.exemplars.len() {
            return Ok(self.raw.clone());
        }
        let mut parts = Vec::new();
        if !self.description.is_empty() {
            parts.push(self.description.clone());
        }
        for (i, (input, answer)) in self.exemplars.iter().take(shots).enumerate() {
            let a = if cot {
                answer.clone()
            } else {
                extract_answer(answer)
                    .ok_or_else(|| {
                        bad(format!(
                            "{what}: exemplar {} has no final answer (\"the answer is X.\") for --no-cot",
                            i + 1
                        ))
                    })?
                    .to_string()
            };
            parts.push(format!("Q: {input}\nA: {a}"));
        }
        Ok(parts.join("\n\n"))
    }
}

/// The full prompt of one question.
pub fn prompt(block: &str, input: &str, cot: bool) -> String {
    let tail = if cot {
        format!("Q: {input}\nA: Let's think step by step.")
    } else {
        format!("Q: {input}\nA:")
    };
    if block.is_empty() {
        tail
    } else {
        format!("{block}\n\n{tail}")
    }
}

/// (input, target) examples of one task file.
fn read_examples(path: &Path) -> Result<Vec<(String, String)>> {
    let v = super::read_json(path, "--data")?;
    let ex = v
        .get("examples")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("{}: no `examples` list", path.display())))?;
    ex.iter()
        .enumerate()
        .map(|(i, e)| {
            let field = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        bad(format!(
                            "{}: examples[{i}]: field `{k}` must be a string",
                            path.display()
                        ))
                    })
            };
            Ok((field("input")?, field("target")?))
        })
        .collect()
}

fn list_tasks(data: &Path) -> Result<Vec<String>> {
    let dir = data.join("bbh");
    let rd = std::fs::read_dir(&dir).map_err(|e| {
        bad(format!(
            "--data {}: cannot read bbh/ ({e}); expected bbh/{{task}}.json and cot-prompts/{{task}}.txt",
            data.display()
        ))
    })?;
    let mut tasks = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::read(&dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(t) = name.strip_suffix(".json") {
            tasks.push(t.to_string());
        }
    }
    tasks.sort();
    if tasks.is_empty() {
        return Err(bad(format!("{}: no task .json files", dir.display())));
    }
    Ok(tasks)
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    let device = common.setup()?;
    let ev = &args.eval;
    let template = ev.check()?;
    let cot = !args.no_cot;
    let max_new = args.max_new_tokens.unwrap_or(if cot { 256 } else { 32 });
    let gen = super::gen_config(common, max_new, &super::Sampling::GREEDY, ev.batch_size)?;
    let mut tasks = list_tasks(&ev.data)?;
    if let Some(list) = &args.tasks {
        let want: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
        for w in &want {
            if !tasks.contains(w) {
                return Err(bad(format!(
                    "--tasks: no bbh/{w}.json in {}",
                    ev.data.display()
                )));
            }
        }
        tasks.retain(|t| want.contains(t));
    }

    // (id, task, index, input, target, prompt) of every selected example.
    let mut selected = Vec::new();
    for t in &tasks {
        let pp = ev.data.join("cot-prompts").join(format!("{t}.txt"));
        let text = std::fs::read_to_string(&pp).map_err(|e| Error::read(&pp, e))?;
        let what = pp.display().to_string();
        let fs = FewShot::parse(&text, &what)?;
        let shots = args.shots.unwrap_or(fs.exemplars.len());
        if shots > fs.exemplars.len() {
            return Err(bad(format!(
                "--shots {shots}: {what} has {} exemplars",
                fs.exemplars.len()
            )));
        }
        let block = fs.block(shots, cot, &what)?;
        let examples = read_examples(&ev.data.join("bbh").join(format!("{t}.json")))?;
        let take = ev.limit.unwrap_or(usize::MAX);
        for (i, (input, target)) in examples.into_iter().take(take).enumerate() {
            let p = template.prompt(&prompt(&block, &input, cot));
            selected.push((format!("{t}/{i}"), t.clone(), i, input, target, p));
        }
    }

    let mut fixed = ev.fixed();
    fixed.insert("cot".into(), cot.into());
    fixed.insert("shots".into(), args.shots.into());
    fixed.insert("max_new_tokens".into(), max_new.into());
    let run = RunDir::open(&ev.out, "bbh", &Value::Object(fixed.clone()))?;
    let mut log = run.samples()?;
    let todo: Vec<_> = selected.iter().filter(|s| !log.contains(&s.0)).collect();
    let (reused, computed) = (selected.len() - todo.len(), todo.len());
    if !todo.is_empty() {
        let lm = ev.load_model(device)?;
        let mut jobs = Vec::with_capacity(todo.len());
        for (id, task, i, input, target, p) in todo {
            jobs.push(GenJob {
                id: id.clone(),
                prompt_ids: lm.encode(p)?,
                row: super::as_row(json!({
                    "task": task, "index": i, "input": input, "target": target, "prompt": p,
                })),
            });
        }
        let stops: Vec<String> = if cot {
            vec!["\n\nQ:".into()]
        } else {
            vec!["\n\nQ:".into(), "\n".into()]
        };
        let pb = crate::commands::progress_bar(jobs.len() as u64, common.progress(), "bbh");
        super::generate_jobs(
            &lm,
            jobs,
            &gen,
            ev.decode_batch,
            &stops,
            &mut log,
            &pb,
            |rows| {
                for r in rows {
                    let out = r["output"].as_str().unwrap_or_default();
                    let answer = if cot {
                        extract_answer(out).map(str::to_string)
                    } else {
                        Some(out.trim().to_string())
                    };
                    let correct = answer.as_deref() == r["target"].as_str();
                    r.insert("answer".into(), answer.into());
                    r.insert("correct".into(), correct.into());
                }
                Ok(())
            },
        )?;
        pb.finish_and_clear();
    }

    let mut per: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut no_answer = 0;
    for (id, task, ..) in &selected {
        let r = log.get(id).expect("every selected sample is done");
        let ok = r.get("correct").and_then(Value::as_bool).unwrap_or(false);
        no_answer += r.get("answer").is_none_or(Value::is_null) as usize;
        let e = per.entry(task).or_default();
        e.0 += ok as usize;
        e.1 += 1;
    }
    let (right, n) = per.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let accs: Vec<f64> = per.values().map(|(c, n)| *c as f64 / *n as f64).collect();
    let subsets: Map<String, Value> = per
        .iter()
        .map(|(t, (c, n))| {
            (
                t.to_string(),
                json!({"accuracy": *c as f64 / *n as f64, "n": n}),
            )
        })
        .collect();
    let mut extra = Map::new();
    extra.insert(
        "micro_accuracy".into(),
        ((n > 0).then(|| right as f64 / n as f64)).into(),
    );
    extra.insert("no_answer".into(), no_answer.into());
    extra.insert("subsets".into(), Value::Object(subsets));
    extra.insert(
        "settings".into(),
        super::settings(
            &fixed,
            json!({"limit": ev.limit, "tasks": args.tasks, "batch_size": ev.batch_size, "decode_batch": ev.decode_batch.to_string()}),
        ),
    );
    extra.insert("run".into(), super::run_counts(reused, computed));
    run.write_json(
        "results.json",
        &super::results("bbh", "accuracy", super::mean(&accs), n, extra),
    )?;
    super::report("bbh", reused, computed, &ev.out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_follows_the_reference_regex() {
        // (?<=the answer is )(.*)(?=.): the rest of the line minus its last character.
        assert_eq!(extract_answer("So the answer is (B)."), Some("(B)"));
        assert_eq!(
            extract_answer("So the answer is True.\n\nmore"),
            Some("True")
        );
        // No full stop: the last character is still dropped.
        assert_eq!(extract_answer("the answer is 42"), Some("4"));
        assert_eq!(extract_answer("the answer is x"), Some(""));
        // Trailing space stays part of the line.
        assert_eq!(extract_answer("the answer is No. "), Some("No."));
        // An empty line after the key cannot match: the next occurrence is used.
        assert_eq!(
            extract_answer("the answer is \nthe answer is Yes."),
            Some("Yes")
        );
        // The first match wins; case matters; nothing found is None.
        assert_eq!(
            extract_answer("the answer is A. Or the answer is B."),
            Some("A. Or the answer is B")
        );
        assert_eq!(extract_answer("The answer is A."), None);
        assert_eq!(extract_answer("no answer here"), None);
        assert_eq!(extract_answer("the answer is "), None);
        // Multi-byte last characters are cut on a character boundary.
        assert_eq!(extract_answer("the answer is café。"), Some("café"));
    }

    const FILE: &str = "canary: do not train\n-----\nSay the word.\n\nQ: first?\nA: Let's think step by step.\nIt is one. So the answer is one.\n\nQ: second\nline two?\nA: Let's think step by step.\nSo the answer is (B).\n";

    #[test]
    fn prompt_file_parses_into_description_and_exemplars() {
        let f = FewShot::parse(FILE, "t.txt").unwrap();
        assert_eq!(f.description, "Say the word.");
        assert_eq!(f.exemplars.len(), 2);
        assert_eq!(f.exemplars[1].0, "second\nline two?");
        assert_eq!(
            f.exemplars[1].1,
            "Let's think step by step.\nSo the answer is (B)."
        );
        assert!(f.raw.starts_with("Say the word.\n\nQ: first?") && f.raw.ends_with("(B)."));
        assert_eq!(f.block(2, true, "t").unwrap(), f.raw);
        assert_eq!(f.block(5, true, "t").unwrap(), f.raw);
        assert_eq!(
            f.block(1, true, "t").unwrap(),
            "Say the word.\n\nQ: first?\nA: Let's think step by step.\nIt is one. So the answer is one."
        );
        assert_eq!(
            f.block(2, false, "t").unwrap(),
            "Say the word.\n\nQ: first?\nA: one\n\nQ: second\nline two?\nA: (B)"
        );
        assert_eq!(
            prompt(&f.block(0, true, "t").unwrap(), "x", true),
            "Say the word.\n\nQ: x\nA: Let's think step by step."
        );
        assert_eq!(prompt("", "x", false), "Q: x\nA:");
    }

    #[test]
    fn malformed_prompt_files_are_bad_input() {
        for t in [
            "no dashes\nQ: a\nA: b",
            "-----\nonly text",
            "-----\nQ: no answer line",
        ] {
            assert!(FewShot::parse(t, "t").unwrap_err().is_bad_input(), "{t}");
        }
        let f = FewShot::parse("-----\nQ: a\nA: no final", "t").unwrap();
        assert!(f.block(1, false, "t").unwrap_err().is_bad_input());
    }
}
