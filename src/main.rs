//! The `palign` command line: parses flags, calls one library function, maps errors to
//! exit codes (2: bad input, one line on stderr; 1: anything else).

use clap::{Parser, Subcommand};
use palign::commands::{self, Common};

#[derive(Parser)]
#[command(
    name = "palign",
    version,
    about = "Parameter-efficient preference alignment (LoRA/QLoRA SFT + DPO) for LLaMA/Mistral"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the tiny end-to-end demo: init-tiny, SFT, DPO, merge, held-out evaluation.
    Demo(commands::demo::Args),
    /// Writes a deterministic tiny LLaMA or Mistral model folder.
    InitTiny(commands::init_tiny::Args),
    /// Log-probabilities of each row's completion.
    Score(commands::score::Args),
    /// Continuations of prompts (greedy or sampled) with a KV cache.
    Generate(commands::generate::Args),
    /// Writes a bitsandbytes 4-bit (NF4) copy of a model folder.
    Quantize(commands::quantize::Args),
    /// Folds a LoRA adapter into its base model.
    MergeAdapter(commands::merge_adapter::Args),
    /// Merges models (slerp, linear, ties, dare_ties) from a mergekit-style YAML config.
    Merge(commands::merge::Args),
    /// Supervised fine-tuning of a LoRA/QLoRA adapter.
    Sft(palign::train::TrainArgs),
    /// Direct Preference Optimization of a LoRA/QLoRA adapter.
    Dpo(palign::train::TrainArgs),
    /// Benchmarks: mmlu, bbh, alpaca-eval, real-toxicity, dangerous-qa.
    Eval(commands::eval::Args),
    /// Experiment grids from a TOML spec: run, status, report, slurm.
    Grid(commands::grid::Args),
    /// Performance benchmarks: `bench train` / `bench generate` time training steps and
    /// batched generation of a 7B-shaped model.
    Bench(commands::bench::Args),
}

fn main() {
    palign::backend::cpu::alloc::keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version to stdout (exit 0); a usage error goes to stderr
            // as one line (exit 2).
            if !e.use_stderr() {
                let _ = e.print();
                std::process::exit(0);
            }
            eprintln!("{}", one_line_usage_error(&e));
            std::process::exit(2);
        }
    };
    // A bad PALIGN_* switch is bad input like a bad flag, refused before any work.
    let result = palign::switches::check().and_then(|()| match &cli.cmd {
        Cmd::Demo(a) => commands::demo::run(a, &cli.common),
        Cmd::InitTiny(a) => commands::init_tiny::run(a, &cli.common),
        Cmd::Score(a) => commands::score::run(a, &cli.common),
        Cmd::Bench(a) => commands::bench::run(a, &cli.common),
        Cmd::Generate(a) => commands::generate::run(a, &cli.common),
        Cmd::Quantize(a) => commands::quantize::run(a, &cli.common),
        Cmd::MergeAdapter(a) => commands::merge_adapter::run(a, &cli.common),
        Cmd::Merge(a) => commands::merge::run(a, &cli.common),
        Cmd::Sft(a) => palign::train::runner::run(a, &cli.common, palign::train::Method::Sft),
        Cmd::Dpo(a) => palign::train::runner::run(a, &cli.common, palign::train::Method::Dpo),
        Cmd::Eval(a) => commands::eval::run(a, &cli.common),
        Cmd::Grid(a) => commands::grid::run(a, &cli.common),
    });
    if let Err(e) = result {
        let msg = e.to_string().replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(if e.is_bad_input() { 2 } else { 1 });
    }
}

/// A clap usage error as one line: its first paragraph joined (the error and, for missing
/// arguments, their names), without the usage and help tails; a command missing its
/// subcommand (clap shows the whole help) becomes its usage line.
fn one_line_usage_error(e: &clap::Error) -> String {
    let text = e.to_string();
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let usage = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Usage: "))
            .unwrap_or("palign <COMMAND>");
        return format!("error: a subcommand is needed: {usage}");
    }
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    if first.is_empty() {
        "error: bad arguments (see --help)".to_string()
    } else {
        first.join(" ")
    }
}
