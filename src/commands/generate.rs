//! `palign generate` (CLI.md): continuations of prompts, greedy or sampled.
//! Input rows `{"prompt": str}` (rendered with `--template`, tokenized with one BOS) or
//! `{"prompt_ids": [int]}` (verbatim). Each output row is the input row (every field kept)
//! plus `output` (decoded text without special tokens, cut before the first stop string),
//! `output_ids` (the generated ids as transformers' `generate` returns them after the
//! prompt: an ending EOS and the tokens that completed a stop string included) and
//! `finish_reason` (`eos`, `stop` or `length`), in input order.

use super::Common;
use crate::data::jsonl::{ids_field, read_objects, str_field};
use crate::error::{bad, Result};
use crate::model::generate::{self, cut_at_stop, BatchChoice, GenConfig, Stopper};
use crate::model::{Model, Template, Tokenizer};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter folder applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Quantize the decoder projections at load time: nf4 (bitsandbytes, blocksize 64,
    /// double quant). A 4-bit checkpoint is used as it is.
    #[arg(long)]
    pub quant: Option<String>,
    /// JSONL rows: `{"prompt": str}` or `{"prompt_ids": [int]}`.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// Most tokens generated per row.
    #[arg(long, allow_negative_numbers = true, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, allow_hyphen_values = true, default_value_t = 1.0)]
    pub top_p: f32,
    /// When sampling, keep only the k most likely tokens first (0: off); default as
    /// transformers: the model's generation_config.json `top_k`, else 50.
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<usize>,
    /// Stop when the output text contains this string (repeatable); it is cut off.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Chat template for text rows: none, vicuna, mistral.
    #[arg(long, default_value = "none")]
    pub template: String,
    /// Sequences decoded at once: auto fills the GPU's free memory with KV-cache slots (at
    /// most 256); on the CPU auto is 32.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(BatchChoice))]
    pub batch_size: BatchChoice,
}

/// `--batch-size auto` on the CPU.
const CPU_BATCH: usize = 32;

/// Loads the tokenizer, checking it fits the model's vocabulary.
fn load_tokenizer(dir: &Path, model: &Model) -> Result<Tokenizer> {
    let t = Tokenizer::load(
        dir,
        model.cfg.bos_token_id,
        model.cfg.eos_token_ids.first().copied(),
    )?;
    if t.vocab_size() > model.cfg.vocab_size {
        return Err(bad(format!(
            "{}: tokenizer has {} tokens but vocab_size is {}",
            dir.display(),
            t.vocab_size(),
            model.cfg.vocab_size
        )));
    }
    Ok(t)
}

/// A prompt row as read (echoed in the output) and its prompt ids.
type PromptRow = (serde_json::Map<String, serde_json::Value>, Vec<u32>);

/// Reads the prompt rows.
fn load_prompts(
    path: &Path,
    tok: &Tokenizer,
    template: Template,
    vocab: usize,
) -> Result<Vec<PromptRow>> {
    let mut out = Vec::new();
    for (line, row) in read_objects(path)? {
        let ids = if row.contains_key("prompt_ids") {
            ids_field(&row, "prompt_ids", path, line)?
        } else {
            let prompt = str_field(&row, "prompt", path, line)?;
            tok.encode(&template.prompt(prompt), true)?
        };
        if ids.is_empty() {
            return Err(bad(format!(
                "{}:{line}: the prompt has no tokens",
                path.display()
            )));
        }
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(bad(format!(
                "{}:{line}: token id {id} is outside the vocabulary (size {vocab})",
                path.display()
            )));
        }
        out.push((row, ids));
    }
    Ok(out)
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    let device = common.setup()?;
    let template: Template = args.template.parse()?;
    super::check_quant(args.quant.as_deref())?;
    if args.stop.iter().any(String::is_empty) {
        return Err(bad("--stop: a stop string must not be empty"));
    }
    let cfg_check = GenConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: match args.top_k {
            Some(k) => k,
            None => generate::default_top_k(&args.model)?,
        },
        top_p: args.top_p,
        seed: common.seed,
        eos_ids: Vec::new(),
        batch_size: CPU_BATCH,
        row_max_new_tokens: Vec::new(),
    };
    cfg_check.validate()?;
    let (model, adapter) = super::load_model_adapter(
        &args.model,
        args.adapter.as_deref(),
        args.quant.as_deref(),
        device,
    )?;
    let tok = load_tokenizer(&args.model, &model)?;
    let rows = load_prompts(&args.prompts, &tok, template, model.cfg.vocab_size)?;
    let prompts: Vec<Vec<u32>> = rows.iter().map(|(_, ids)| ids.clone()).collect();
    let cfg = GenConfig {
        eos_ids: generate::eos_ids(&args.model, &model, Some(&tok))?,
        batch_size: args
            .batch_size
            .resolve(&model, &prompts, args.max_new_tokens, CPU_BATCH)?,
        ..cfg_check
    };
    let stopper = Stopper {
        tokenizer: &tok,
        stops: &args.stop,
    };
    let pb = super::progress_bar(rows.len() as u64, common.progress(), "generate");
    let t0 = std::time::Instant::now();
    let results = generate::generate(
        &model,
        adapter.as_ref(),
        &prompts,
        &cfg,
        Some(&stopper),
        |_| pb.inc(1),
    )?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let mut lines = Vec::with_capacity(rows.len());
    for ((row, _), g) in rows.into_iter().zip(&results) {
        let text = tok.decode(&g.ids, true)?;
        let mut row = row;
        row.insert(
            "output".into(),
            cut_at_stop(&text, &args.stop).to_string().into(),
        );
        row.insert("output_ids".into(), g.ids.clone().into());
        row.insert("finish_reason".into(), g.finish.name().into());
        lines.push(serde_json::Value::Object(row));
    }
    crate::fsio::write_atomic(&args.out, |w| {
        for l in &lines {
            serde_json::to_writer(&mut *w, l)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    let n_new: usize = results.iter().map(|g| g.ids.len()).sum();
    eprintln!(
        "generated {} rows ({} new tokens) in {:.2}s: {:.0} tokens/s; wrote {}",
        results.len(),
        n_new,
        secs,
        n_new as f64 / secs.max(1e-9),
        args.out.display()
    );
    Ok(())
}
