//! `palign score`: per-token log-probabilities of each row's completion (CLI.md).
//! Output rows, same order as input: `{"logp", "n_tokens", "token_logps"}`.

use super::Common;
use crate::data::jsonl::{ids_field, read_objects, str_field};
use crate::data::{encode_pair, PairText};
use crate::error::{bad, Result};
use crate::lora::Adapter;
use crate::model::{Model, ScoreSeq, Template, Tokenizer};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter folder applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL rows: {"prompt","completion"} or {"prompt_ids","completion_ids"}.
    #[arg(long)]
    pub data: String,
    /// Output JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// Chat template for text rows: none, vicuna, mistral.
    #[arg(long, default_value = "none")]
    pub template: String,
    /// Tokens per forward batch (memory vs. speed).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Quantize the decoder projections at load time: nf4 (bitsandbytes, blocksize 64,
    /// double quant). A 4-bit checkpoint is used as it is.
    #[arg(long)]
    pub quant: Option<String>,
}

/// Reads score rows into sequences; the tokenizer is loaded only if a text row needs it.
pub fn load_rows(
    path: &Path,
    model_dir: &Path,
    model: &Model,
    template: Template,
) -> Result<Vec<ScoreSeq>> {
    let rows = read_objects(path)?;
    let mut tok: Option<Tokenizer> = None;
    let mut seqs = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let seq = if row.contains_key("prompt_ids") || row.contains_key("completion_ids") {
            let p = ids_field(&row, "prompt_ids", path, line)?;
            let c = ids_field(&row, "completion_ids", path, line)?;
            if p.is_empty() {
                return Err(bad(format!(
                    "{}:{line}: `prompt_ids` is empty (the first completion token needs context)",
                    path.display()
                )));
            }
            if c.is_empty() {
                return Err(bad(format!(
                    "{}:{line}: `completion_ids` is empty",
                    path.display()
                )));
            }
            let prompt_len = p.len();
            ScoreSeq {
                ids: [p, c].concat(),
                prompt_len,
            }
        } else {
            let prompt = str_field(&row, "prompt", path, line)?;
            let completion = str_field(&row, "completion", path, line)?;
            if tok.is_none() {
                let t = Tokenizer::load(
                    model_dir,
                    model.cfg.bos_token_id,
                    model.cfg.eos_token_ids.first().copied(),
                )?;
                if t.vocab_size() > model.cfg.vocab_size {
                    return Err(bad(format!(
                        "{}: tokenizer has {} tokens but vocab_size is {}",
                        model_dir.display(),
                        t.vocab_size(),
                        model.cfg.vocab_size
                    )));
                }
                tok = Some(t);
            }
            let t = tok.as_ref().expect("loaded above");
            let (ids, prompt_len) = encode_pair(t, template, &PairText { prompt, completion })?;
            if prompt_len == 0 {
                return Err(bad(format!(
                    "{}:{line}: the prompt encodes to no tokens",
                    path.display()
                )));
            }
            ScoreSeq { ids, prompt_len }
        };
        if let Some(&id) = seq
            .ids
            .iter()
            .find(|&&i| i as usize >= model.cfg.vocab_size)
        {
            return Err(bad(format!(
                "{}:{line}: token id {id} is outside the vocabulary (size {})",
                path.display(),
                model.cfg.vocab_size
            )));
        }
        seqs.push(seq);
    }
    Ok(seqs)
}

/// Scores sequences in length-sorted batches of about `batch_tokens` tokens; results
/// come back in input order.
pub fn score_all(
    model: &Model,
    adapter: Option<&Adapter>,
    seqs: &[ScoreSeq],
    batch_tokens: usize,
    pb: &indicatif::ProgressBar,
) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].ids.len()));
    let mut out = vec![Vec::new(); seqs.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < order.len()
            && (end == start || tokens + seqs[order[end]].ids.len() <= batch_tokens)
        {
            tokens += seqs[order[end]].ids.len();
            end += 1;
        }
        let batch: Vec<ScoreSeq> = order[start..end].iter().map(|&i| seqs[i].clone()).collect();
        for (k, lp) in model
            .completion_logprobs(&batch, adapter)?
            .into_iter()
            .enumerate()
        {
            out[order[start + k]] = lp;
        }
        pb.inc((end - start) as u64);
        start = end;
    }
    Ok(out)
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    let device = common.setup()?;
    if args.batch_tokens == 0 {
        return Err(bad("--batch-tokens must be positive"));
    }
    let template: Template = args.template.parse()?;
    let data = PathBuf::from(args.data.strip_prefix("jsonl:").unwrap_or(&args.data));
    let (model, adapter) = super::load_model_adapter(
        &args.model,
        args.adapter.as_deref(),
        args.quant.as_deref(),
        device,
    )?;
    let seqs = load_rows(&data, &args.model, &model, template)?;
    let pb = super::progress_bar(seqs.len() as u64, common.progress(), "score");
    let t0 = std::time::Instant::now();
    let logps = score_all(&model, adapter.as_ref(), &seqs, args.batch_tokens, &pb)?;
    pb.finish_and_clear();
    crate::fsio::write_atomic(&args.out, |w| {
        for lp in &logps {
            let sum: f64 = lp.iter().map(|&x| x as f64).sum();
            let row = serde_json::json!({
                "logp": sum,
                "n_tokens": lp.len(),
                "token_logps": lp.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            });
            serde_json::to_writer(&mut *w, &row)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    let n_tok: usize = seqs.iter().map(|s| s.ids.len()).sum();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "scored {} rows ({} tokens) in {:.2}s: {:.0} rows/s; wrote {}",
        seqs.len(),
        n_tok,
        secs,
        seqs.len() as f64 / secs.max(1e-9),
        args.out.display()
    );
    Ok(())
}
