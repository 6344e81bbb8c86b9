//! `palign eval`: the paper's five benchmarks (MMLU, BBH, AlpacaEval, RealToxicityPrompts,
//! DangerousQA), each read in its published layout.
//!
//! Every task turns its data into samples with stable ids, computes the ones its output
//! folder does not hold yet (appending each to `samples.jsonl` as it finishes), then
//! recomputes `results.json` from all samples of the current selection. Tasks judged by a
//! separate model (AlpacaEval, DangerousQA) log the judge's verdicts in `judgments.jsonl`
//! under the judge's name, so judging resumes too and a new judge reuses the outputs.
//! `run.json` pins the settings the samples depend on (see `store::RunDir`).

pub mod alpaca;
pub mod bbh;
pub mod csv;
pub mod dangerous;
pub mod judge;
pub mod lm;
pub mod mmlu;
pub mod store;
pub mod toxicity;

use crate::commands::Common;
use crate::error::{bad, Error, Result};
use crate::model::generate::{row_rng, BatchChoice, GenConfig};
use crate::model::Template;
use lm::{GenText, Lm};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use store::{Row, SampleLog};

/// Flags every task takes.
#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter folder applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Quantize the decoder projections at load time: nf4. A 4-bit checkpoint is used as it is.
    #[arg(long)]
    pub quant: Option<String>,
    /// The task's data (file or folder, in the benchmark's published layout).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: results.json, samples.jsonl, run.json (created; reruns resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Evaluate at most N samples: per subject (mmlu) or per task (bbh), else in total.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Chat template the prompt is rendered with: none, vicuna, mistral.
    #[arg(long, default_value = "none")]
    pub template: String,
    /// Questions per forward (mmlu, judges); generation logs its samples in chunks of 4 ×
    /// this many prompts (sampling draws per chunk).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Sequences decoded at once: auto fills the GPU's free memory with KV-cache slots (at
    /// most 256); on the CPU auto is --batch-size.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(BatchChoice))]
    pub decode_batch: BatchChoice,
}

impl EvalArgs {
    /// Checks the flags and the inputs they name (`--data`, the config.json of `--model`,
    /// the adapter_config.json of `--adapter`) before anything is written to `--out`;
    /// returns the parsed template.
    pub fn check(&self) -> Result<Template> {
        let template = self.check_flags()?;
        check_dir("--model", &self.model)?;
        crate::model::config::ModelConfig::load(&self.model)
            .map_err(|e| named("--model", &self.model, e))?;
        if let Some(a) = &self.adapter {
            check_dir("--adapter", a)?;
            crate::lora::peft::load_config(a).map_err(|e| named("--adapter", a, e))?;
        }
        Ok(template)
    }

    /// The flags and `--data`, not the model: what `grid run` checks of an evaluation
    /// before its model (made by the grid) exists.
    pub fn check_flags(&self) -> Result<Template> {
        crate::commands::check_quant(self.quant.as_deref())?;
        if self.batch_size == 0 {
            return Err(bad("--batch-size must be at least 1"));
        }
        if self.limit == Some(0) {
            return Err(bad("--limit must be at least 1"));
        }
        if !self.data.exists() {
            return Err(bad(format!(
                "--data {}: no such file or folder",
                self.data.display()
            )));
        }
        self.template.parse()
    }

    /// The settings every sample depends on (pinned in run.json).
    pub fn fixed(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("model".into(), canon(&self.model).into());
        m.insert("adapter".into(), self.adapter.as_deref().map(canon).into());
        m.insert("quant".into(), self.quant.clone().into());
        m.insert("data".into(), canon(&self.data).into());
        m.insert("template".into(), self.template.clone().into());
        m
    }

    pub fn load_model(&self, device: crate::commands::Device) -> Result<Lm> {
        Lm::load(
            &self.model,
            self.adapter.as_deref(),
            self.quant.as_deref(),
            device,
        )
    }
}

/// Every check a task makes of its flags and their files before it loads the model (or
/// writes anything): `grid run` runs these when it loads a spec.
pub fn check_task_flags(task: &crate::commands::eval::Task) -> Result<()> {
    use crate::commands::eval::Task;
    match task {
        Task::Mmlu(a) => {
            a.eval.check_flags()?;
            mmlu::check_flags(a)
        }
        Task::Bbh(a) => a.eval.check_flags().map(drop),
        Task::AlpacaEval(a) => {
            a.eval.check_flags()?;
            alpaca::check_flags(a).map(drop)
        }
        Task::RealToxicity(a) => {
            a.eval.check_flags()?;
            toxicity::check_flags(a).map(drop)
        }
        Task::DangerousQa(a) => a.eval.check_flags().map(drop),
    }
}

/// A folder flag's value must be a folder.
pub fn check_dir(flag: &str, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else if dir.exists() {
        Err(bad(format!("{flag} {}: not a folder", dir.display())))
    } else {
        Err(bad(format!("{flag} {}: no such folder", dir.display())))
    }
}

/// A bad-input error about the file or folder given to `flag`, as `FLAG PATH: what` (the
/// path not repeated when the message starts with it).
pub fn named(flag: &str, path: &Path, e: Error) -> Error {
    located(&format!("{flag} "), path, e)
}

/// A bad-input error about `path` as `{lead}PATH: what`, the path not repeated when the
/// message starts with it (`lead`: a flag and a space, a spec key and ": ").
pub fn located(lead: &str, path: &Path, e: Error) -> Error {
    match e {
        Error::BadInput(m) => {
            let p = path.display().to_string();
            let m = m.strip_prefix(&format!("{p}: ")).unwrap_or(&m);
            bad(format!("{lead}{p}: {m}"))
        }
        other => other,
    }
}

/// A path as an absolute string when it exists (settings compare across working folders).
pub fn canon(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// A sample waiting for generation: its id, prompt ids and the fields its row starts with.
pub struct GenJob {
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub row: Row,
}

/// Generates the jobs, all through one pool of `decode` KV-cache slots (continuous
/// batching), and appends them to the log in chunks of 4 × batch size prompts, whole and
/// in order, as each chunk is done. Each row gets `output`, `n_tokens`, `finish`;
/// `finish_chunk` then adds the task's fields (answer, score...). With sampling, a row
/// draws from stream (row index in its chunk) of `seed + chunk index`, so a resumed run
/// samples its remaining rows differently from an uninterrupted one. On the CPU neither
/// greedy nor sampled outputs depend on the decode batch; on the GPU kernel choices by
/// shape can flip a near-tie.
#[allow(clippy::too_many_arguments)]
pub fn generate_jobs(
    lm: &Lm,
    jobs: Vec<GenJob>,
    cfg: &GenConfig,
    decode: BatchChoice,
    stops: &[String],
    log: &mut SampleLog,
    pb: &indicatif::ProgressBar,
    mut finish_chunk: impl FnMut(&mut [Row]) -> Result<()>,
) -> Result<()> {
    let n = jobs.len();
    if n == 0 {
        return Ok(());
    }
    let chunk = cfg.batch_size.saturating_mul(4).max(1);
    let prompts: Vec<Vec<u32>> = jobs.iter().map(|j| j.prompt_ids.clone()).collect();
    let slots = decode.resolve(&lm.model, &prompts, cfg.max_new_tokens, cfg.batch_size)?;
    let run = GenConfig {
        batch_size: slots,
        ..cfg.clone()
    };
    let rng_of = |row: usize| {
        row_rng(
            cfg.seed.wrapping_add((row / chunk) as u64),
            (row % chunk) as u64,
        )
    };
    let mut jobs: Vec<Option<GenJob>> = jobs.into_iter().map(Some).collect();
    let mut outs: Vec<Option<GenText>> = vec![None; n];
    let mut left: Vec<usize> = (0..n.div_ceil(chunk))
        .map(|k| chunk.min(n - k * chunk))
        .collect();
    let mut logged = 0;
    lm.generate_each(&prompts, &run, stops, &rng_of, |row, g| {
        pb.inc(1);
        outs[row] = Some(g);
        left[row / chunk] -= 1;
        while logged < left.len() && left[logged] == 0 {
            let mut rows: Vec<Row> = (logged * chunk..(n.min((logged + 1) * chunk)))
                .map(|i| {
                    let job = jobs[i].take().expect("logged once");
                    gen_row(job, outs[i].take().expect("finished"))
                })
                .collect();
            finish_chunk(&mut rows)?;
            for r in rows {
                log.append(r)?;
            }
            logged += 1;
        }
        Ok(())
    })
}

fn gen_row(job: GenJob, g: GenText) -> Row {
    let mut r = Map::new();
    r.insert("id".into(), job.id.into());
    r.extend(job.row);
    r.insert("output".into(), g.text.into());
    r.insert("n_tokens".into(), g.n_tokens.into());
    r.insert("finish".into(), g.finish.into());
    r
}

/// How a generating task picks tokens: `--temperature`, `--top-p`, and `--top-k`
/// (default as transformers': the model's generation_config.json `top_k`, else 50).
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
    };

    pub fn resolve(
        model: &std::path::Path,
        temperature: f32,
        top_p: f32,
        top_k: Option<usize>,
    ) -> Result<Sampling> {
        // Greedy decoding never reads it (nor the model's generation_config.json for it).
        let top_k = match top_k {
            _ if temperature == 0.0 => 0,
            Some(k) => k,
            None => crate::model::generate::default_top_k(model)?,
        };
        Ok(Sampling {
            temperature,
            top_p,
            top_k,
        })
    }

    /// Into a run's fixed settings; `top_k` only when sampling reads it (so greedy logs of
    /// versions without it still resume).
    pub fn record(&self, fixed: &mut Map<String, Value>) {
        fixed.insert("temperature".into(), json!(self.temperature));
        fixed.insert("top_p".into(), json!(self.top_p));
        if self.temperature > 0.0 {
            fixed.insert("top_k".into(), json!(self.top_k));
        }
    }
}

/// The generation settings shared by the generating tasks.
pub fn gen_config(
    common: &Common,
    max_new_tokens: usize,
    sampling: &Sampling,
    batch: usize,
) -> Result<GenConfig> {
    let cfg = GenConfig {
        max_new_tokens,
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        seed: common.seed,
        eos_ids: vec![],
        batch_size: batch,
        row_max_new_tokens: Vec::new(),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The `results.json` object: task, metric, value, n, then the task's fields.
pub fn results(
    task: &str,
    metric: &str,
    value: Option<f64>,
    n: usize,
    extra: Map<String, Value>,
) -> Value {
    let mut m = Map::new();
    m.insert("task".into(), task.into());
    m.insert("metric".into(), metric.into());
    m.insert("value".into(), value.map_or(Value::Null, Value::from));
    m.insert("n".into(), n.into());
    m.extend(extra);
    m.insert("palign_version".into(), env!("CARGO_PKG_VERSION").into());
    Value::Object(m)
}

/// Settings for results.json: the pinned ones plus the free ones of this run.
pub fn settings(fixed: &Map<String, Value>, free: Value) -> Value {
    let mut m = fixed.clone();
    if let Value::Object(f) = free {
        m.extend(f);
    }
    Value::Object(m)
}

/// One line on stderr about what a run reused and computed.
pub fn report(task: &str, reused: usize, computed: usize, out: &Path) {
    eprintln!(
        "eval {task}: {computed} samples computed, {reused} reused from {}",
        out.display()
    );
}

/// Reads a whole JSON file.
pub fn read_json(path: &Path, flag: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("{flag} {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| bad(format!("{flag} {}: not valid JSON: {e}", path.display())))
}

/// `json!` of a mean, `null` when there is nothing to average.
pub fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Counters reported in results.json.
pub fn run_counts(reused: usize, computed: usize) -> Value {
    json!({"reused": reused, "computed": computed})
}

/// A `json!` object as a log row.
pub fn as_row(v: Value) -> Row {
    match v {
        Value::Object(m) => m,
        _ => panic!("log rows are JSON objects"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::generate;

    /// One pool of decode slots over every chunk gives each chunk exactly what generating
    /// that chunk alone gave (seed + chunk index, stream = row in the chunk), sampled or
    /// greedy, for any decode batch; chunks reach `finish_chunk` and the log whole and in
    /// order. With 16 slots every row starts at once and a stop string ends rows early;
    /// greedy, the second chunk is done before the first (checked), and waits for it.
    #[test]
    fn generate_jobs_pools_chunks_without_changing_any_row() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let lm = Lm::load(&dir, None, None, crate::commands::Device::Cpu).unwrap();
        let base: Vec<Vec<u32>> = (0..11u32)
            .map(|r| {
                (0..3 + r % 5)
                    .map(|i| 3 + (r * 97 + i * 31) % 500)
                    .collect()
            })
            .collect();
        // The second chunk: prompts whose greedy outputs reach the stop within 3 tokens.
        let mut prompts = base[..8].to_vec();
        prompts.extend([base[0].clone(), base[2].clone(), base[10].clone()]);
        let stops = vec![STOP.to_string()];
        for temperature in [0.0, 1.0] {
            let cfg = GenConfig {
                max_new_tokens: 12,
                temperature,
                top_k: 0,
                top_p: 0.9,
                seed: 7,
                eos_ids: vec![],
                batch_size: 2, // chunks of 8 prompts: 8 + 3
                row_max_new_tokens: Vec::new(),
            };
            // Each chunk generated alone, as generate_jobs did before it pooled them.
            let mut want = Vec::new();
            for (k, part) in prompts.chunks(8).enumerate() {
                let c = GenConfig {
                    seed: 7 + k as u64,
                    ..cfg.clone()
                };
                want.extend(lm_generate(&lm, part, &c, &stops));
            }
            let longest = |r: std::ops::Range<usize>| want[r].iter().map(|w| w.1).max().unwrap();
            assert!(
                temperature > 0.0 || longest(0..8) > longest(8..11),
                "greedy: the second chunk must finish first for this test: {want:?}"
            );
            for decode in [
                BatchChoice::Fixed(1),
                BatchChoice::Fixed(3),
                BatchChoice::Fixed(16),
                BatchChoice::Auto,
            ] {
                let tmp = tempfile::tempdir().unwrap();
                let mut log = SampleLog::open(&tmp.path().join("s.jsonl")).unwrap();
                let jobs = prompts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| GenJob {
                        id: format!("q{i}"),
                        prompt_ids: p.clone(),
                        row: Map::new(),
                    })
                    .collect();
                let mut chunks = Vec::new();
                let pb = indicatif::ProgressBar::hidden();
                generate_jobs(&lm, jobs, &cfg, decode, &stops, &mut log, &pb, |rows| {
                    chunks.push(
                        rows.iter()
                            .map(|r| r["id"].as_str().unwrap().to_string())
                            .collect::<Vec<_>>(),
                    );
                    Ok(())
                })
                .unwrap();
                let ids =
                    |r: std::ops::Range<usize>| r.map(|i| format!("q{i}")).collect::<Vec<_>>();
                assert_eq!(chunks, vec![ids(0..8), ids(8..11)], "{decode:?}");
                let text = std::fs::read_to_string(tmp.path().join("s.jsonl")).unwrap();
                let rows: Vec<Value> = text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                assert_eq!(rows.len(), 11);
                for (i, (row, (out, n))) in rows.iter().zip(&want).enumerate() {
                    let at = format!("t={temperature} {decode:?} row {i}");
                    assert_eq!(row["id"], format!("q{i}"));
                    assert_eq!(row["output"].as_str().unwrap(), out, "{at}");
                    assert_eq!(row["n_tokens"], *n, "{at}");
                }
            }
        }
    }

    /// A stop string the tiny model's outputs reach at different lengths.
    const STOP: &str = "e";

    /// (text cut at the stop, tokens) of each prompt by the plain `generate`.
    fn lm_generate(
        lm: &Lm,
        prompts: &[Vec<u32>],
        cfg: &GenConfig,
        stops: &[String],
    ) -> Vec<(String, usize)> {
        let cfg = GenConfig {
            eos_ids: lm.eos.clone(),
            ..cfg.clone()
        };
        let stopper = generate::Stopper {
            tokenizer: &lm.tok,
            stops,
        };
        generate::generate(&lm.model, None, prompts, &cfg, Some(&stopper), |_| {})
            .unwrap()
            .into_iter()
            .map(|g| {
                let text = lm.tok.decode(&g.ids, true).unwrap();
                (generate::cut_at_stop(&text, stops).to_string(), g.ids.len())
            })
            .collect()
    }
}
