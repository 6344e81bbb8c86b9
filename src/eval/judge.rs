//! A local judge: any LLaMA/Mistral folder that answers a judge prompt; its verdict is the
//! option (e.g. ` 1` / ` 2`) with the higher summed log-likelihood after the prompt, scored
//! with lm-eval's continuation rule. Verdicts are logged in `judgments.jsonl` under the
//! judge's name, so judging resumes and a second judge reuses the same outputs.

use super::lm::{sum, Lm};
use super::store::{Row, SampleLog};
use crate::error::Result;
use crate::model::Template;
use serde_json::{json, Value};
use std::path::Path;

pub struct LocalJudge {
    pub lm: Lm,
    pub template: Template,
    /// Names the judge in results and judgments: folder and template.
    pub name: String,
    /// Samples judged per forward.
    pub batch: usize,
}

impl LocalJudge {
    pub fn load(
        dir: &Path,
        template: Template,
        batch: usize,
        device: crate::commands::Device,
    ) -> Result<LocalJudge> {
        let lm = Lm::load(dir, None, None, device)?;
        Ok(LocalJudge {
            lm,
            template,
            name: judge_name(dir, template),
            batch: batch.max(1),
        })
    }

    /// Summed log-likelihood of each option after each judge prompt (rendered with the
    /// judge's template), all in one forward.
    pub fn option_logprobs(&self, bodies: &[String], options: &[&str]) -> Result<Vec<Vec<f64>>> {
        let items = bodies
            .iter()
            .map(|b| self.lm.choice_item(&self.template.prompt(b), options))
            .collect::<Result<Vec<_>>>()?;
        Ok(self
            .lm
            .choice_logprobs(&items)?
            .into_iter()
            .map(|it| it.iter().map(|lp| sum(lp)).collect())
            .collect())
    }
}

/// `model:{absolute folder}` plus the template when it is not `none`.
pub fn judge_name(dir: &Path, template: Template) -> String {
    let mut s = format!("model:{}", super::canon(dir));
    if template != Template::None {
        s.push_str(&format!(" (template {})", template.name()));
    }
    s
}

/// The probability of option 2 against option 1 (a two-way softmax of log-likelihoods).
pub fn p_second(lp: &[f64]) -> f64 {
    1.0 / (1.0 + (lp[0] - lp[1]).exp())
}

/// The judgments log key of a sample under a judge.
pub fn key(judge: &str, sample: &str) -> String {
    format!("{judge}\t{sample}")
}

/// Judges every sample id not yet judged by `judge.name`, `judge.batch` samples at a time;
/// `bodies(id)` gives a sample's judge prompts, `verdict(id, logprobs per prompt)` the
/// fields logged for it. Returns how many samples were judged now.
pub fn judge_all(
    judge: &LocalJudge,
    ids: &[String],
    log: &mut SampleLog,
    options: &[&str],
    pb: &indicatif::ProgressBar,
    mut bodies: impl FnMut(&str) -> Result<Vec<String>>,
    mut verdict: impl FnMut(&str, &[Vec<f64>]) -> Value,
) -> Result<usize> {
    let todo: Vec<&String> = ids
        .iter()
        .filter(|id| !log.contains(&key(&judge.name, id)))
        .collect();
    for chunk in todo.chunks(judge.batch) {
        let mut all = Vec::new();
        let mut counts = Vec::new();
        for id in chunk {
            let b = bodies(id)?;
            counts.push(b.len());
            all.extend(b);
        }
        let lps = judge.option_logprobs(&all, options)?;
        let mut at = 0;
        for (id, n) in chunk.iter().zip(counts) {
            let mut row: Row = super::as_row(json!({
                "id": key(&judge.name, id),
                "sample": id,
                "judge": judge.name,
            }));
            if let Value::Object(v) = verdict(id, &lps[at..at + n]) {
                row.extend(v);
            }
            at += n;
            log.append(row)?;
            pb.inc(1);
        }
    }
    Ok(todo.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_way_softmax() {
        assert!((p_second(&[0.0, 0.0]) - 0.5).abs() < 1e-12);
        let p = p_second(&[-2.0, -1.0]);
        assert!((p - 1.0f64.exp() / (1.0 + 1.0f64.exp())).abs() < 1e-12);
        // Far-apart log-likelihoods do not overflow.
        assert_eq!(p_second(&[-1e4, 0.0]), 1.0);
        assert_eq!(p_second(&[0.0, -1e4]), 0.0);
    }
}
