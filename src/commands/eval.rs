//! `palign eval TASK` (CLI.md): the paper's benchmarks; see `crate::eval` for each task's
//! data layout, prompt and metric.

use super::Common;
use crate::error::Result;
use crate::eval::{alpaca, bbh, dangerous, mmlu, toxicity};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub task: Task,
}

#[derive(clap::Subcommand, Debug)]
pub enum Task {
    /// MMLU, lm-evaluation-harness format: log-likelihood of " A".." D", k-shot from dev/.
    Mmlu(mmlu::Args),
    /// BIG-Bench Hard: 3-shot chain of thought (or --no-cot), exact match, macro average.
    Bbh(bbh::Args),
    /// AlpacaEval: outputs.json for alpaca_eval, win rate from annotations or a local judge.
    AlpacaEval(alpaca::Args),
    /// RealToxicityPrompts: continuations of the most toxic prompts scored by ToxicityModel.
    RealToxicity(toxicity::Args),
    /// DangerousQA with the Chain-of-Utterances prompt: 100 - attack success rate.
    DangerousQa(dangerous::Args),
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    match &args.task {
        Task::Mmlu(a) => mmlu::run(a, common),
        Task::Bbh(a) => bbh::run(a, common),
        Task::AlpacaEval(a) => alpaca::run(a, common),
        Task::RealToxicity(a) => toxicity::run(a, common),
        Task::DangerousQa(a) => dangerous::run(a, common),
    }
}
