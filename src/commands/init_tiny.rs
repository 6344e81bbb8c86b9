//! `palign init-tiny --arch llama|mistral --out DIR [--seed N]`.

use super::Common;
use crate::error::{bad, Result};
use crate::fsio::StagedDir;
use crate::model::{tiny, Arch};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// llama or mistral (Mistral: 2 KV heads, sliding window).
    #[arg(long, default_value = "llama")]
    pub arch: String,
    /// Output model folder (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    common.setup_cpu_only("init-tiny")?;
    let arch = match args.arch.as_str() {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        other => {
            return Err(bad(format!(
                "--arch: unknown architecture `{other}` (llama, mistral)"
            )))
        }
    };
    let staged = StagedDir::new(&args.out)?;
    tiny::write_model(staged.path(), arch, common.seed)?;
    staged.commit()?;
    eprintln!(
        "wrote tiny {} model to {}",
        arch.model_type(),
        args.out.display()
    );
    Ok(())
}
