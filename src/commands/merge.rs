//! `palign merge --config FILE.yaml --out DIR [--seed N]`: mergekit-style merging (slerp,
//! linear, ties, dare_ties) of model folders, `DIR+ADAPTER` inputs folded first. `--seed`
//! (the global option) seeds DARE's random drop.

use super::Common;
use crate::error::Result;
use crate::fsio::StagedDir;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// mergekit-style YAML (merge_method, base_model, models or slices, parameters, dtype).
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    common.setup_cpu_only("merge")?;
    let staged = StagedDir::new(&args.out)?;
    let plan = crate::merge::merge(&args.config, staged.path(), common.seed, common.progress())?;
    staged.commit()?;
    if !common.quiet {
        eprintln!(
            "merged {} models ({} layers, {}): {}",
            plan.inputs.len(),
            plan.num_layers,
            plan.out_dtype.torch_name(),
            args.out.display()
        );
    }
    Ok(())
}
