//! Dataset specs (`--data`, CLI.md "Dataset specs") read into rows that keep text and
//! token ids apart: `jsonl:PATH`, `hh-rlhf:PATH`, `pku-saferlhf:PATH:helpful|harmless|harmless-loose`.
//! Several specs form one mixture, shuffled together with `--data-seed`.
//!
//! Dataset facts (field names, the HH prompt split, the BeaverTails helpful/harmless rules) are
//! from shared/reference/pipeline.md §1, which cites the paper's Appendix C.

use super::jsonl::{ids_field, read_objects, str_field};
use crate::error::{bad, Result};
use crate::model::template::Turn;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Names looked for, in this order, when a spec's PATH is a folder.
pub const TRAIN_FILES: [&str; 3] = ["train.jsonl.gz", "train.jsonl.xz", "train.jsonl"];

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// What the trainer needs: SFT uses a completion (a preference row gives its chosen
/// response), DPO needs chosen and rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sft,
    Pref,
}

/// How BeaverTails (PKU-SafeRLHF) pairs become preference rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkuSplit {
    /// chosen = `response_{better_response_id}`.
    Helpful,
    /// (paper) only pairs with exactly one safe response; chosen = the safe one.
    Harmless,
    /// Public code's looser rule: skip pairs where both are safe, chosen = `response_{safer_response_id}`.
    HarmlessLoose,
}

/// One parsed `--data` spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    Jsonl(PathBuf),
    HhRlhf(PathBuf),
    PkuSafeRlhf(PathBuf, PkuSplit),
}

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// `--num-samples`: keep this many rows after shuffling (all when None).
    pub num_samples: Option<usize>,
    /// `--data-seed`.
    pub data_seed: u64,
    /// False with `--no-shuffle`: file order, specs in the order given.
    pub shuffle: bool,
}

/// Where a row came from, for error messages (`file:line`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<Path>,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A prompt before the template. `raw` is what template `none` uses verbatim (for HH-RLHF
/// the transcript prefix ending in "\n\nAssistant:"); `history` + `user` feed chat templates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text {
        history: Vec<Turn>,
        user: String,
        raw: String,
    },
    Ids(Vec<u32>),
}

/// A response. For HH-RLHF `raw` keeps the leading space after "Assistant:" and `text` drops it;
/// elsewhere they are equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Text { text: String, raw: String },
    Ids(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Completion(Response),
    Pair {
        chosen: Response,
        rejected: Response,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub origin: Origin,
    pub prompt: Prompt,
    pub target: Target,
}

/// One spec's contribution, for logs and `run.json` (the file to hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStats {
    pub spec: String,
    pub file: PathBuf,
    /// Rows in the file.
    pub rows: usize,
    /// Rows it gave after the dataset's own rules and the drops below.
    pub usable: usize,
}

/// Counts of everything dropped, skipped or changed between the files and the examples.
/// `load` fills the row-level counts; `examples::*_examples` the token-level ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    pub sources: Vec<SourceStats>,
    pub rows_read: usize,
    /// Rows (or examples, after tokenization) that remain.
    pub kept: usize,
    /// Dropped: a response that is empty or only whitespace (SFT: only the completion counts).
    pub empty_responses: usize,
    /// Dropped (preference data only): chosen equals rejected.
    pub identical_pairs: usize,
    /// Dropped: HH-RLHF pairs whose transcripts share no "\n\nAssistant:" prefix.
    pub no_shared_prompt: usize,
    /// Dropped: the completion had no tokens left after `--max-length`.
    pub truncated_away: usize,
    /// Skipped by the BeaverTails harmless rules.
    pub both_safe: usize,
    pub both_unsafe: usize,
    /// Pairs with exactly one safe response where `safer_response_id` names the unsafe one.
    pub safer_id_disagreements: usize,
    /// Rows left out by `--num-samples`, and the number asked for.
    pub not_sampled: usize,
    pub num_samples: Option<usize>,
    /// Kept, but worth knowing.
    pub truncated_prompts: usize,
    pub truncated_completions: usize,
    /// HH-RLHF pairs that differ before their last turn, so responses span several turns.
    pub multi_turn_responses: usize,
    /// HH-RLHF prompts that do not read Human, Assistant, …, Human (kept: same-speaker turns
    /// are joined, a missing turn is left empty).
    pub irregular_transcripts: usize,
    /// Text preference pairs whose chosen and rejected start with different prompt tokens
    /// (the tokenizer merged across the prompt/completion boundary). Kept.
    pub boundary_merges: usize,
}

/// `1234567` → `1,234,567`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "3 empty responses, 1 prompt" from (count, singular, plural), leaving out zeros.
fn counts(items: &[(usize, &str, &str)]) -> String {
    let parts: Vec<String> = items
        .iter()
        .filter(|(n, _, _)| *n > 0)
        .map(|&(n, one, many)| format!("{} {}", thousands(n), if n == 1 { one } else { many }))
        .collect();
    parts.join(", ")
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "kept {} of {} rows",
            thousands(self.kept),
            thousands(self.rows_read)
        )?;
        let dropped = counts(&[
            (self.empty_responses, "empty response", "empty responses"),
            (
                self.identical_pairs,
                "identical chosen/rejected",
                "identical chosen/rejected",
            ),
            (
                self.no_shared_prompt,
                "HH pair without a shared prompt",
                "HH pairs without a shared prompt",
            ),
            (
                self.truncated_away,
                "completion truncated away",
                "completions truncated away",
            ),
        ]);
        if !dropped.is_empty() {
            write!(f, "; dropped: {dropped}")?;
        }
        let skipped = counts(&[
            (self.both_safe, "both safe", "both safe"),
            (self.both_unsafe, "both unsafe", "both unsafe"),
        ]);
        if !skipped.is_empty() {
            write!(f, "; skipped by the harmless rule: {skipped}")?;
        }
        let disagree = counts(&[(
            self.safer_id_disagreements,
            "safer_response_id disagreement",
            "safer_response_id disagreements",
        )]);
        if !disagree.is_empty() {
            write!(f, "; {disagree}")?;
        }
        if let Some(n) = self.num_samples {
            if self.not_sampled > 0 {
                write!(
                    f,
                    "; {} not sampled (--num-samples {})",
                    thousands(self.not_sampled),
                    thousands(n)
                )?;
            } else if n > self.kept {
                write!(
                    f,
                    "; --num-samples {} asked for more rows than there are",
                    thousands(n)
                )?;
            }
        }
        let truncated = counts(&[
            (self.truncated_prompts, "prompt", "prompts"),
            (self.truncated_completions, "completion", "completions"),
        ]);
        if !truncated.is_empty() {
            write!(f, "; truncated: {truncated}")?;
        }
        let noted = counts(&[
            (
                self.multi_turn_responses,
                "HH pair differing before its last turn",
                "HH pairs differing before their last turn",
            ),
            (
                self.irregular_transcripts,
                "irregular HH transcript",
                "irregular HH transcripts",
            ),
            (
                self.boundary_merges,
                "pair whose prompt tokens differ (a merge across the boundary)",
                "pairs whose prompt tokens differ (merges across the boundary)",
            ),
        ]);
        if !noted.is_empty() {
            write!(f, "; noted: {noted}")?;
        }
        Ok(())
    }
}

/// Parses one `--data` spec. The PKU split is the text after the last `:`, so PATH may hold colons.
pub fn parse_spec(spec: &str) -> Result<Spec> {
    parse_spec_as("--data", spec)
}

/// [`parse_spec`] for a spec given to `flag` (`--data`, `--eval-data`), which errors name.
pub fn parse_spec_as(flag: &str, spec: &str) -> Result<Spec> {
    let Some((prefix, rest)) = spec.split_once(':') else {
        return Err(bad(format!(
            "{flag} `{spec}`: expected KIND:PATH with KIND jsonl, hh-rlhf or pku-saferlhf (e.g. jsonl:{spec})"
        )));
    };
    if rest.is_empty() {
        return Err(bad(format!("{flag} `{spec}`: the path is empty")));
    }
    match prefix {
        "jsonl" => Ok(Spec::Jsonl(PathBuf::from(rest))),
        "hh-rlhf" => Ok(Spec::HhRlhf(PathBuf::from(rest))),
        "pku-saferlhf" => {
            let split = match rest.rsplit_once(':') {
                Some((path, mode)) if !path.is_empty() => match mode {
                    "helpful" => Some((path, PkuSplit::Helpful)),
                    "harmless" => Some((path, PkuSplit::Harmless)),
                    "harmless-loose" => Some((path, PkuSplit::HarmlessLoose)),
                    _ => None,
                },
                _ => None,
            };
            match split {
                Some((path, s)) => Ok(Spec::PkuSafeRlhf(PathBuf::from(path), s)),
                None => Err(bad(format!(
                    "{flag} `{spec}`: expected pku-saferlhf:PATH:helpful, :harmless or :harmless-loose"
                ))),
            }
        }
        _ => Err(bad(format!(
            "{flag} `{spec}`: unknown dataset kind `{prefix}` (jsonl, hh-rlhf, pku-saferlhf)"
        ))),
    }
}

/// A file as given, or the train file inside a folder (`TRAIN_FILES`, then the same names
/// under `subdirs`, e.g. PKU-SafeRLHF v0's `round0/`).
fn resolve(flag: &str, spec: &str, path: &Path, subdirs: &[&str]) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(bad(format!(
            "{flag} `{spec}`: {}: no such file or folder",
            path.display()
        )));
    }
    let mut dirs = vec![path.to_path_buf()];
    dirs.extend(subdirs.iter().map(|d| path.join(d)));
    for dir in &dirs {
        for name in TRAIN_FILES {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let mut looked = TRAIN_FILES.join(", ");
    for d in subdirs {
        looked.push_str(&format!(" (also under {d}/)"));
    }
    Err(bad(format!(
        "{flag} `{spec}`: folder {} holds none of {looked}",
        path.display()
    )))
}

/// Strips exactly one leading space: HH-RLHF writes "Human: text", and the template adds its own.
fn strip_one_space(s: &str) -> &str {
    s.strip_prefix(' ').unwrap_or(s)
}

fn text_response(raw: &str, text: &str) -> Response {
    Response::Text {
        text: text.to_string(),
        raw: raw.to_string(),
    }
}

fn plain_prompt(p: &str) -> Prompt {
    Prompt::Text {
        history: Vec::new(),
        user: p.to_string(),
        raw: p.to_string(),
    }
}

/// One `jsonl:` row. Id rows are recognised by `prompt_ids`.
fn jsonl_row(row: &Map<String, Value>, path: &Path, line: usize) -> Result<(Prompt, Target)> {
    if row.contains_key("prompt_ids") {
        let p = ids_field(row, "prompt_ids", path, line)?;
        if p.is_empty() {
            return Err(bad(format!(
                "{}:{line}: `prompt_ids` is empty (the first completion token needs context)",
                path.display()
            )));
        }
        let target = if row.contains_key("completion_ids") {
            Target::Completion(Response::Ids(ids_field(row, "completion_ids", path, line)?))
        } else if row.contains_key("chosen_ids") || row.contains_key("rejected_ids") {
            Target::Pair {
                chosen: Response::Ids(ids_field(row, "chosen_ids", path, line)?),
                rejected: Response::Ids(ids_field(row, "rejected_ids", path, line)?),
            }
        } else {
            return Err(bad(format!(
                "{}:{line}: a `prompt_ids` row needs `completion_ids` or `chosen_ids` + `rejected_ids`",
                path.display()
            )));
        };
        Ok((Prompt::Ids(p), target))
    } else if row.contains_key("prompt") {
        let p = str_field(row, "prompt", path, line)?;
        let target = if row.contains_key("completion") {
            let c = str_field(row, "completion", path, line)?;
            Target::Completion(text_response(c, c))
        } else if row.contains_key("chosen") || row.contains_key("rejected") {
            let c = str_field(row, "chosen", path, line)?;
            let r = str_field(row, "rejected", path, line)?;
            Target::Pair {
                chosen: text_response(c, c),
                rejected: text_response(r, r),
            }
        } else {
            return Err(bad(format!(
                "{}:{line}: a `prompt` row needs `completion` or `chosen` + `rejected`",
                path.display()
            )));
        };
        Ok((plain_prompt(p), target))
    } else {
        Err(bad(format!(
            "{}:{line}: a row needs `prompt` or `prompt_ids`",
            path.display()
        )))
    }
}

/// Byte length of the HH prompt: the common prefix of chosen and rejected, backed off to the
/// end of its last "\n\nAssistant:" (pipeline.md §1). None when the prefix has no such marker.
pub fn hh_prompt_len(chosen: &str, rejected: &str) -> Option<usize> {
    let mut common = chosen
        .bytes()
        .zip(rejected.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    while !chosen.is_char_boundary(common) {
        common -= 1;
    }
    chosen[..common]
        .rfind(ASSISTANT)
        .map(|i| i + ASSISTANT.len())
}

/// Splits an HH prompt (ending in "\n\nAssistant:") into earlier turns and the final user
/// message. Consecutive same-speaker segments are joined with "\n\n"; a missing Human or
/// Assistant part becomes empty text. The flag says whether the transcript was irregular.
pub fn hh_turns(prompt: &str) -> (Vec<Turn>, String, bool) {
    // (is_human, text) segments in order; text before the first marker counts as Human.
    let mut segs: Vec<(bool, &str)> = Vec::new();
    let mut irregular = false;
    let mut rest = prompt;
    let mut role = None;
    loop {
        let h = rest.find(HUMAN);
        let a = rest.find(ASSISTANT);
        let next = match (h, a) {
            (Some(h), Some(a)) if h < a => Some((h, HUMAN.len(), true)),
            (_, Some(a)) => Some((a, ASSISTANT.len(), false)),
            (Some(h), None) => Some((h, HUMAN.len(), true)),
            (None, None) => None,
        };
        let end = next.map_or(rest.len(), |(i, _, _)| i);
        match role {
            Some(r) => segs.push((r, &rest[..end])),
            None if end > 0 => {
                irregular = true;
                segs.push((true, &rest[..end]));
            }
            None => {}
        }
        let Some((i, len, r)) = next else { break };
        role = Some(r);
        rest = &rest[i + len..];
    }
    // The prompt ends with the Assistant marker, so the last segment is that empty answer.
    if let Some((false, "")) = segs.last() {
        segs.pop();
    } else {
        irregular = true;
    }
    // Join same-speaker runs, then pad so the list reads Human, Assistant, ..., Human.
    let mut merged: Vec<(bool, String)> = Vec::new();
    for (r, t) in segs {
        let t = strip_one_space(t);
        match merged.last_mut() {
            Some((last, text)) if *last == r => {
                irregular = true;
                text.push_str("\n\n");
                text.push_str(t);
            }
            _ => merged.push((r, t.to_string())),
        }
    }
    if merged.first().is_none_or(|(r, _)| !*r) {
        irregular = true;
        merged.insert(0, (true, String::new()));
    }
    if merged.last().is_some_and(|(r, _)| !*r) {
        irregular = true;
        merged.push((true, String::new()));
    }
    let user = merged.pop().map(|(_, t)| t).unwrap_or_default();
    let history = merged
        .chunks(2)
        .map(|c| Turn {
            user: c[0].1.clone(),
            assistant: c.get(1).map(|x| x.1.clone()).unwrap_or_default(),
        })
        .collect();
    (history, user, irregular)
}

/// Reads rows of one spec, applying the dataset's own rules (HH split, PKU splits).
fn read_spec(
    flag: &str,
    spec_text: &str,
    spec: &Spec,
    stats: &mut DataStats,
) -> Result<(PathBuf, usize, Vec<Row>)> {
    let (path, subdirs): (&Path, &[&str]) = match spec {
        Spec::Jsonl(p) | Spec::HhRlhf(p) => (p, &[]),
        Spec::PkuSafeRlhf(p, _) => (p, &["round0"]),
    };
    let file = resolve(flag, spec_text, path, subdirs)?;
    let objects = read_objects(&file)?;
    let n = objects.len();
    let shared: Arc<Path> = Arc::from(file.as_path());
    let mut rows = Vec::with_capacity(n);
    for (line, obj) in &objects {
        let origin = Origin {
            file: shared.clone(),
            line: *line,
        };
        let parsed = match spec {
            Spec::Jsonl(_) => Some(jsonl_row(obj, &file, *line)?),
            Spec::HhRlhf(_) => hh_row(obj, &file, *line, stats)?,
            Spec::PkuSafeRlhf(_, split) => pku_row(obj, &file, *line, *split, stats)?,
        };
        if let Some((prompt, target)) = parsed {
            rows.push(Row {
                origin,
                prompt,
                target,
            });
        }
    }
    Ok((file, n, rows))
}

fn hh_row(
    obj: &Map<String, Value>,
    path: &Path,
    line: usize,
    stats: &mut DataStats,
) -> Result<Option<(Prompt, Target)>> {
    let chosen = str_field(obj, "chosen", path, line)?;
    let rejected = str_field(obj, "rejected", path, line)?;
    let Some(end) = hh_prompt_len(chosen, rejected) else {
        stats.no_shared_prompt += 1;
        return Ok(None);
    };
    let raw = &chosen[..end];
    let (history, user, irregular) = hh_turns(raw);
    stats.irregular_transcripts += irregular as usize;
    let (c, r) = (&chosen[end..], &rejected[end..]);
    if c.contains(HUMAN) || r.contains(HUMAN) {
        stats.multi_turn_responses += 1;
    }
    let prompt = Prompt::Text {
        history,
        user,
        raw: raw.to_string(),
    };
    let target = Target::Pair {
        chosen: text_response(c, strip_one_space(c)),
        rejected: text_response(r, strip_one_space(r)),
    };
    Ok(Some((prompt, target)))
}

fn bool_field(obj: &Map<String, Value>, key: &str, path: &Path, line: usize) -> Result<bool> {
    match obj.get(key) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!(
            "{}:{line}: field `{key}` must be true or false",
            path.display()
        ))),
        None => Err(bad(format!(
            "{}:{line}: field `{key}` is missing",
            path.display()
        ))),
    }
}

/// `better_response_id` / `safer_response_id`: 0 or 1.
fn which_field(obj: &Map<String, Value>, key: &str, path: &Path, line: usize) -> Result<usize> {
    match obj.get(key).map(Value::as_u64) {
        Some(Some(v)) if v <= 1 => Ok(v as usize),
        Some(_) => Err(bad(format!(
            "{}:{line}: field `{key}` must be 0 or 1",
            path.display()
        ))),
        None => Err(bad(format!(
            "{}:{line}: field `{key}` is missing",
            path.display()
        ))),
    }
}

fn pku_row(
    obj: &Map<String, Value>,
    path: &Path,
    line: usize,
    split: PkuSplit,
    stats: &mut DataStats,
) -> Result<Option<(Prompt, Target)>> {
    let prompt = str_field(obj, "prompt", path, line)?;
    let resp = [
        str_field(obj, "response_0", path, line)?,
        str_field(obj, "response_1", path, line)?,
    ];
    let safe = [
        bool_field(obj, "is_response_0_safe", path, line)?,
        bool_field(obj, "is_response_1_safe", path, line)?,
    ];
    let better = which_field(obj, "better_response_id", path, line)?;
    let safer = which_field(obj, "safer_response_id", path, line)?;
    let one_safe = safe[0] != safe[1];
    let safe_id = if safe[0] { 0 } else { 1 };
    let chosen = match split {
        PkuSplit::Helpful => better,
        PkuSplit::Harmless | PkuSplit::HarmlessLoose if safe[0] && safe[1] => {
            stats.both_safe += 1;
            return Ok(None);
        }
        PkuSplit::Harmless if !one_safe => {
            stats.both_unsafe += 1;
            return Ok(None);
        }
        PkuSplit::Harmless => {
            stats.safer_id_disagreements += (safer != safe_id) as usize;
            safe_id
        }
        PkuSplit::HarmlessLoose => {
            stats.safer_id_disagreements += (one_safe && safer != safe_id) as usize;
            safer
        }
    };
    let target = Target::Pair {
        chosen: text_response(resp[chosen], resp[chosen]),
        rejected: text_response(resp[1 - chosen], resp[1 - chosen]),
    };
    Ok(Some((plain_prompt(prompt), target)))
}

fn is_empty(r: &Response) -> bool {
    match r {
        Response::Text { text, .. } => text.trim().is_empty(),
        Response::Ids(ids) => ids.is_empty(),
    }
}

/// Same content as the model would see it: texts compare after the template's strip.
fn same(a: &Response, b: &Response) -> bool {
    match (a, b) {
        (Response::Text { text: x, .. }, Response::Text { text: y, .. }) => x == y,
        (Response::Ids(x), Response::Ids(y)) => x == y,
        _ => false,
    }
}

/// Shapes a row for `kind` (SFT takes the chosen response) and drops empty / identical ones.
fn finish(row: Row, kind: Kind, stats: &mut DataStats) -> Result<Option<Row>> {
    let Row {
        origin,
        prompt,
        target,
    } = row;
    let target = match (kind, target) {
        (Kind::Sft, Target::Completion(c)) | (Kind::Sft, Target::Pair { chosen: c, .. }) => {
            if is_empty(&c) {
                stats.empty_responses += 1;
                return Ok(None);
            }
            Target::Completion(c)
        }
        (Kind::Pref, Target::Pair { chosen, rejected }) => {
            if is_empty(&chosen) || is_empty(&rejected) {
                stats.empty_responses += 1;
                return Ok(None);
            }
            if same(&chosen, &rejected) {
                stats.identical_pairs += 1;
                return Ok(None);
            }
            Target::Pair { chosen, rejected }
        }
        (Kind::Pref, Target::Completion(_)) => {
            return Err(bad(format!(
                "{origin}: preference training needs `chosen` and `rejected` (or `chosen_ids` and `rejected_ids`)"
            )))
        }
    };
    Ok(Some(Row {
        origin,
        prompt,
        target,
    }))
}

/// Fisher–Yates with ChaCha8 words, written out so the order depends only on the seed and
/// this code, not on the `rand` version's sampling algorithms (resume needs the same order).
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Reads every spec, applies the dataset rules and drops, mixes, shuffles and samples.
pub fn load(specs: &[String], kind: Kind, opts: &LoadOptions) -> Result<(Vec<Row>, DataStats)> {
    load_as("--data", specs, kind, opts)
}

/// [`load`] for specs given to `flag` (`--data`, `--eval-data`), which errors name.
pub fn load_as(
    flag: &str,
    specs: &[String],
    kind: Kind,
    opts: &LoadOptions,
) -> Result<(Vec<Row>, DataStats)> {
    if specs.is_empty() {
        return Err(bad(format!("{flag}: give at least one dataset spec")));
    }
    // Parse all specs first so a typo in the last one fails before reading big files.
    let parsed = specs
        .iter()
        .map(|s| parse_spec_as(flag, s))
        .collect::<Result<Vec<_>>>()?;
    let mut stats = DataStats::default();
    let mut rows = Vec::new();
    for (text, spec) in specs.iter().zip(&parsed) {
        let (file, n, read) = read_spec(flag, text, spec, &mut stats)?;
        let before = rows.len();
        for row in read {
            if let Some(r) = finish(row, kind, &mut stats)? {
                rows.push(r);
            }
        }
        stats.rows_read += n;
        stats.sources.push(SourceStats {
            spec: text.clone(),
            file,
            rows: n,
            usable: rows.len() - before,
        });
    }
    if opts.shuffle {
        shuffle(&mut rows, opts.data_seed);
    }
    stats.num_samples = opts.num_samples;
    if let Some(n) = opts.num_samples {
        if n == 0 {
            return Err(bad("--num-samples must be at least 1"));
        }
        stats.not_sampled = rows.len().saturating_sub(n);
        rows.truncate(n);
    }
    if rows.is_empty() {
        return Err(bad(format!(
            "{flag}: no usable rows in {} ({stats})",
            specs.join(", ")
        )));
    }
    stats.kept = rows.len();
    Ok((rows, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_backs_off_to_the_last_assistant_marker() {
        let c = "\n\nHuman: hi\n\nAssistant: Hello there";
        let r = "\n\nHuman: hi\n\nAssistant: Hello you";
        assert_eq!(
            hh_prompt_len(c, r),
            Some("\n\nHuman: hi\n\nAssistant:".len())
        );
        // A shared prefix that stops inside the marker backs off to an earlier one.
        let c = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d";
        let r = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssist";
        assert_eq!(
            hh_prompt_len(c, r),
            Some("\n\nHuman: a\n\nAssistant:".len())
        );
        assert_eq!(hh_prompt_len("\n\nHuman: x", "\n\nHuman: y"), None);
        // Multi-byte characters right at the divergence point.
        assert_eq!(
            hh_prompt_len("\n\nAssistant: é", "\n\nAssistant: è"),
            Some(ASSISTANT.len())
        );
    }

    #[test]
    fn turns_of_regular_and_irregular_transcripts() {
        let (h, u, irr) = hh_turns("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:");
        assert_eq!(
            h,
            vec![Turn {
                user: "a".into(),
                assistant: "b".into()
            }]
        );
        assert_eq!((u.as_str(), irr), ("c", false));

        let (h, u, irr) = hh_turns("\n\nHuman: a\n\nHuman: b\n\nAssistant:");
        assert!(h.is_empty());
        assert_eq!((u.as_str(), irr), ("a\n\nb", true));

        let (h, u, irr) = hh_turns("preamble\n\nAssistant: x\n\nAssistant:");
        assert_eq!(
            h,
            vec![Turn {
                user: "preamble".into(),
                assistant: "x".into()
            }]
        );
        assert_eq!((u.as_str(), irr), ("", true));

        let (h, u, irr) = hh_turns("\n\nAssistant:");
        assert!(h.is_empty());
        assert_eq!((u.as_str(), irr), ("", true));
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(
            parse_spec("jsonl:a:b.jsonl").unwrap(),
            Spec::Jsonl("a:b.jsonl".into())
        );
        assert_eq!(
            parse_spec("pku-saferlhf:x:y:harmless-loose").unwrap(),
            Spec::PkuSafeRlhf("x:y".into(), PkuSplit::HarmlessLoose)
        );
        for s in [
            "pku-saferlhf:dir",
            "pku-saferlhf:dir:safe",
            "pku-saferlhf::helpful",
            "foo:x",
            "x.jsonl",
            "jsonl:",
        ] {
            let e = parse_spec(s).unwrap_err();
            assert!(e.is_bad_input() && e.to_string().contains(s), "{s}: {e}");
        }
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        shuffle(&mut a, 7);
        shuffle(&mut b, 7);
        assert_eq!(a, b);
        let mut c: Vec<u32> = (0..50).collect();
        shuffle(&mut c, 8);
        assert_ne!(a, c);
        a.sort();
        assert_eq!(a, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn stats_line() {
        let s = DataStats {
            rows_read: 2000,
            kept: 1234,
            empty_responses: 3,
            identical_pairs: 1,
            truncated_prompts: 17,
            truncated_completions: 1,
            ..Default::default()
        };
        assert_eq!(
            s.to_string(),
            "kept 1,234 of 2,000 rows; dropped: 3 empty responses, 1 identical chosen/rejected; \
truncated: 17 prompts, 1 completion"
        );
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }
}
