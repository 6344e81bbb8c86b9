//! Rows → token sequences for training. Text rows go through the template and
//! `rows::encode_rendered` (one BOS, EOS after the completion); id rows are used verbatim.
//! Then CLI.md's truncation: `--max-prompt-length` drops tokens from the prompt's start,
//! `--max-length` drops tokens from the completion's end.

use super::rows::encode_rendered;
use super::sources::{DataStats, Prompt, Response, Row, Target};
use crate::error::{bad, Result};
use crate::model::{Template, Tokenizer};
use rayon::prelude::*;

/// One training sequence; tokens before `prompt_len` are never trained on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

/// A preference pair. Both sequences start with the same prompt tokens (unless the
/// tokenizer merged across the boundary, counted in `DataStats::boundary_merges`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefExample {
    pub chosen: SftExample,
    pub rejected: SftExample,
}

/// `--max-length` (whole sequence) and `--max-prompt-length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_length: usize,
    pub max_prompt_length: usize,
}

impl Limits {
    /// The limits are usable (`palign sft`/`dpo` check them before touching `--out`).
    pub fn check(&self) -> Result<()> {
        if self.max_prompt_length == 0 {
            return Err(bad("--max-prompt-length must be at least 1"));
        }
        if self.max_length < 2 {
            return Err(bad(
                "--max-length must be at least 2 (a prompt token and a completion token)",
            ));
        }
        Ok(())
    }
}

/// Everything tokenization needs. `tokenizer` may be None when all rows are token ids.
pub struct Encoder<'a> {
    pub tokenizer: Option<&'a Tokenizer>,
    pub template: Template,
    pub limits: Limits,
    /// The model's vocabulary size; larger ids are bad input.
    pub vocab_size: usize,
}

/// `prompt_text` of a text prompt. Template `none` uses the raw text (HH-RLHF: the transcript
/// prefix verbatim); chat templates render the earlier turns and the final user message.
pub fn prompt_text(prompt: &Prompt, template: Template) -> Option<String> {
    match prompt {
        Prompt::Text { raw, .. } if template == Template::None => Some(raw.clone()),
        Prompt::Text { history, user, .. } => Some(template.prompt_with_history(history, user)),
        Prompt::Ids(_) => None,
    }
}

/// `completion_text` of a text response (raw for `none`, the template's form otherwise).
pub fn completion_text(response: &Response, template: Template) -> Option<String> {
    match response {
        Response::Text { raw, .. } if template == Template::None => Some(raw.clone()),
        Response::Text { text, .. } => Some(template.completion(text)),
        Response::Ids(_) => None,
    }
}

/// One row's sequences before truncation, plus what the tokenizer did.
struct Encoded {
    seqs: Vec<SftExample>,
    /// The first token is the tokenizer's BOS and survives prompt truncation.
    keep_first: bool,
    merges: usize,
}

fn encode_row(row: &Row, responses: &[&Response], enc: &Encoder) -> Result<Encoded> {
    let origin = &row.origin;
    let mut out = Encoded {
        seqs: Vec::with_capacity(responses.len()),
        keep_first: false,
        merges: 0,
    };
    match &row.prompt {
        Prompt::Ids(p) => {
            for r in responses {
                let Response::Ids(c) = r else {
                    return Err(bad(format!(
                        "{origin}: a token-id prompt with a text response"
                    )));
                };
                out.seqs.push(SftExample {
                    ids: [p.as_slice(), c].concat(),
                    prompt_len: p.len(),
                });
            }
        }
        Prompt::Text { .. } => {
            let tok = enc.tokenizer.ok_or_else(|| {
                bad(format!(
                    "{origin}: text rows need the model's tokenizer.json"
                ))
            })?;
            let ptext = prompt_text(&row.prompt, enc.template).expect("text prompt");
            for r in responses {
                let Some(ctext) = completion_text(r, enc.template) else {
                    return Err(bad(format!(
                        "{origin}: a text prompt with a token-id response"
                    )));
                };
                let (ids, prompt_len) = encode_rendered(tok, &ptext, &ctext)?;
                if prompt_len == 0 {
                    return Err(bad(format!("{origin}: the prompt encodes to no tokens")));
                }
                out.seqs.push(SftExample { ids, prompt_len });
            }
            // Without a merge across the prompt/completion boundary both sequences start
            // with the prompt's own tokens, so a difference here means a merge.
            if let [c, r] = &out.seqs[..] {
                out.merges = (c.prompt_len != r.prompt_len
                    || c.ids[..c.prompt_len] != r.ids[..r.prompt_len])
                    as usize;
            }
            out.keep_first = tok.add_bos
                && tok.bos_id.is_some()
                && out.seqs[0].ids.first() == tok.bos_id.as_ref();
        }
    }
    for s in &out.seqs {
        if let Some(&id) = s.ids.iter().find(|&&i| i as usize >= enc.vocab_size) {
            return Err(bad(format!(
                "{origin}: token id {id} is outside the vocabulary (size {})",
                enc.vocab_size
            )));
        }
    }
    Ok(out)
}

/// CLI.md truncation of one sequence; returns whether the prompt and the completion were cut,
/// or None when no completion token is left. A leading BOS (text rows) stays: the cut starts
/// after it, so every sequence keeps exactly one BOS.
fn truncate(s: &mut SftExample, limits: Limits, keep_first: bool) -> Option<(bool, bool)> {
    let mut prompt_cut = false;
    if s.prompt_len > limits.max_prompt_length {
        let cut = s.prompt_len - limits.max_prompt_length;
        let start = keep_first as usize;
        s.ids.drain(start..start + cut);
        s.prompt_len = limits.max_prompt_length;
        prompt_cut = true;
    }
    let mut completion_cut = false;
    if s.ids.len() > limits.max_length {
        if s.prompt_len >= limits.max_length {
            return None;
        }
        s.ids.truncate(limits.max_length);
        completion_cut = true;
    }
    if s.ids.len() <= s.prompt_len {
        return None;
    }
    Some((prompt_cut, completion_cut))
}

/// Encodes and truncates every row; `pick` chooses the responses of a row.
fn build(
    rows: &[Row],
    enc: &Encoder,
    stats: &mut DataStats,
    pick: impl Fn(&Row) -> Result<Vec<&Response>> + Sync,
) -> Result<Vec<Vec<SftExample>>> {
    enc.limits.check()?;
    // Every row in parallel, then the first bad row in file order: a parallel collect
    // into Result would report whichever failing row a thread met first.
    let encoded = rows
        .par_iter()
        .map(|row| encode_row(row, &pick(row)?, enc))
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(encoded.len());
    for e in encoded {
        stats.boundary_merges += e.merges;
        let mut seqs = e.seqs;
        let mut prompt_cut = false;
        let mut completions_cut = 0;
        let mut alive = true;
        for s in &mut seqs {
            match truncate(s, enc.limits, e.keep_first) {
                Some((p, c)) => {
                    prompt_cut |= p;
                    completions_cut += c as usize;
                }
                None => alive = false,
            }
        }
        if !alive {
            stats.truncated_away += 1;
            continue;
        }
        stats.truncated_prompts += prompt_cut as usize;
        stats.truncated_completions += completions_cut;
        out.push(seqs);
    }
    stats.kept = out.len();
    Ok(out)
}

/// SFT examples: a preference row trains on its chosen response.
pub fn sft_examples(rows: &[Row], enc: &Encoder, stats: &mut DataStats) -> Result<Vec<SftExample>> {
    let seqs = build(rows, enc, stats, |row| {
        Ok(match &row.target {
            Target::Completion(c) | Target::Pair { chosen: c, .. } => vec![c],
        })
    })?;
    Ok(seqs.into_iter().map(|mut s| s.swap_remove(0)).collect())
}

/// DPO examples: chosen and rejected after the same prompt.
pub fn pref_examples(
    rows: &[Row],
    enc: &Encoder,
    stats: &mut DataStats,
) -> Result<Vec<PrefExample>> {
    let seqs = build(rows, enc, stats, |row| match &row.target {
        Target::Pair { chosen, rejected } => Ok(vec![chosen, rejected]),
        Target::Completion(_) => Err(bad(format!(
            "{}: preference training needs chosen and rejected",
            row.origin
        ))),
    })?;
    Ok(seqs
        .into_iter()
        .map(|mut s| {
            let rejected = s.pop().expect("two sequences");
            let chosen = s.pop().expect("two sequences");
            PrefExample { chosen, rejected }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(prompt: std::ops::Range<u32>, completion: std::ops::Range<u32>) -> SftExample {
        let p: Vec<u32> = prompt.collect();
        SftExample {
            prompt_len: p.len(),
            ids: [p, completion.collect()].concat(),
        }
    }

    #[test]
    fn prompt_loses_its_start_and_completion_its_end() {
        let lim = Limits {
            max_length: 9,
            max_prompt_length: 4,
        };
        let mut s = ex(10..20, 100..108);
        assert_eq!(truncate(&mut s, lim, false), Some((true, true)));
        assert_eq!(
            s,
            SftExample {
                ids: vec![16, 17, 18, 19, 100, 101, 102, 103, 104],
                prompt_len: 4
            }
        );

        // With a BOS first, the cut starts after it.
        let mut s = ex(1..8, 100..102);
        assert_eq!(truncate(&mut s, lim, true), Some((true, false)));
        assert_eq!(
            s,
            SftExample {
                ids: vec![1, 5, 6, 7, 100, 101],
                prompt_len: 4
            }
        );

        // Untouched when it fits.
        let mut s = ex(1..4, 100..106);
        assert_eq!(truncate(&mut s, lim, true), Some((false, false)));
        assert_eq!(s.ids.len(), 9);

        // Nothing left of the completion.
        let lim = Limits {
            max_length: 4,
            max_prompt_length: 4,
        };
        assert_eq!(truncate(&mut ex(0..6, 100..103), lim, false), None);
    }

    #[test]
    fn limits_are_checked() {
        assert!(Limits {
            max_length: 8,
            max_prompt_length: 0
        }
        .check()
        .unwrap_err()
        .to_string()
        .contains("--max-prompt-length"));
        assert!(Limits {
            max_length: 1,
            max_prompt_length: 1
        }
        .check()
        .unwrap_err()
        .to_string()
        .contains("--max-length"));
    }
}
