//! `palign demo [--out DIR]`: the tiny end-to-end run. Until training lands it makes the
//! tiny model and scores a few shipped rows with it, printing what it did.

use super::Common;
use crate::error::Result;
use crate::fsio::StagedDir;
use crate::model::{tiny, Arch, Model, ScoreSeq, Template, Tokenizer};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the demo writes its model and outputs.
    #[arg(long, default_value = "palign-demo")]
    pub out: PathBuf,
}

/// A few prompt/completion pairs for the demo: a good answer and a bad one per prompt.
const ROWS: [(&str, &str, &str); 3] = [
    (
        "What color is the sky on a clear day?",
        "The sky is blue on a clear day.",
        "Purple bananas sing loudly.",
    ),
    (
        "How many legs does a cat have?",
        "A cat has four legs.",
        "The moon is made of paper.",
    ),
    (
        "What do plants need to grow?",
        "Plants need water, light and soil.",
        "Seven yesterday under ice.",
    ),
];

pub fn run(args: &Args, common: &Common) -> Result<()> {
    common.setup()?;
    let staged = StagedDir::new(&args.out)?;
    let model_dir = staged.path().join("tiny-llama");
    std::fs::create_dir(&model_dir).map_err(|e| crate::Error::write(&model_dir, e))?;
    tiny::write_model(&model_dir, Arch::Llama, common.seed)?;
    let model = Model::load(&model_dir)?;
    let tok = Tokenizer::load(&model_dir, Some(1), Some(2))?;
    let t0 = std::time::Instant::now();
    let mut seqs = Vec::new();
    for (p, good, bad) in ROWS {
        for c in [good, bad] {
            let (ids, prompt_len) = crate::data::encode_pair(
                &tok,
                Template::Vicuna,
                &crate::data::PairText {
                    prompt: p,
                    completion: c,
                },
            )?;
            seqs.push(ScoreSeq { ids, prompt_len });
        }
    }
    let lps = model.completion_logprobs(&seqs, None)?;
    println!(
        "palign demo: tiny LLaMA ({} layers, hidden {}), vicuna template",
        model.cfg.num_layers, model.cfg.hidden_size
    );
    for (i, (p, _, _)) in ROWS.iter().enumerate() {
        let s = |k: usize| lps[k].iter().map(|&x| x as f64).sum::<f64>();
        println!(
            "  {p:45} logp(good) {:8.3}  logp(bad) {:8.3}",
            s(2 * i),
            s(2 * i + 1)
        );
    }
    println!("scored {} sequences in {:.3}s (untrained random model: the two columns are noise until SFT/DPO land)", seqs.len(), t0.elapsed().as_secs_f64());
    staged.commit()?;
    println!("model written to {}", args.out.join("tiny-llama").display());
    Ok(())
}
