//! `palign merge-adapter --model DIR --adapter DIR --out DIR [--dtype ...]`: the base
//! with the adapter folded in (`W + (alpha/r)·B·A`; an NF4 base dequantized first), as
//! an HF model folder transformers loads and palign scores.

use super::Common;
use crate::error::Result;
use crate::fsio::StagedDir;
use crate::lora::{fold, peft};
use crate::model::ModelConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// bfloat16, float16 or float32 (default: the base's dtype).
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    common.setup_cpu_only("merge-adapter")?;
    let cfg = ModelConfig::load(&args.model)?;
    let dtype = fold::output_dtype(args.dtype.as_deref(), &cfg)?;
    let adapter = peft::load(&args.adapter, &cfg)?;
    let staged = StagedDir::new(&args.out)?;
    fold::fold_model(&args.model, Some(&adapter), staged.path(), dtype)?;
    staged.commit()?;
    if !common.quiet {
        eprintln!(
            "merged {} into {} ({}): {}",
            args.adapter.display(),
            args.model.display(),
            dtype.torch_name(),
            args.out.display()
        );
    }
    Ok(())
}
