//! `palign grid run|status|report|slurm SPEC.toml --out DIR`: experiment grids (see
//! `crate::grid` and `examples/paper-grid.toml`).

use super::Common;
use crate::error::{bad, Error, Result};
use crate::grid::{self, runner, slurm, spec::SlurmSettings};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Sub,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Runs the unfinished cells in dependency order (train, merge, eval), then writes the report.
    Run(RunArgs),
    /// A table of the cells and their states (done, running, partial, failed, blocked, pending).
    Status(StatusArgs),
    /// Results over seeds (mean ± std) as CSV, markdown tables and figures in DIR/report.
    Report(PathArgs),
    /// Writes Slurm array jobs (one per stage, chained by dependencies) and submits them.
    Slurm(SlurmArgs),
}

#[derive(clap::Args, Debug)]
pub struct PathArgs {
    /// The grid spec (TOML).
    pub spec: PathBuf,
    /// The grid's output folder (one folder per cell).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub paths: PathArgs,
    /// Cells run at once.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// GPUs to spread cells over, one cell per GPU at a time (e.g. 0,1,2,3); sets --jobs.
    #[arg(long, value_delimiter = ',')]
    pub gpus: Vec<String>,
    /// Run only this cell (repeatable; its dependencies must be done). Used by Slurm jobs.
    #[arg(long)]
    pub cell: Vec<String>,
    /// Attempts after a failure (training resumes from its checkpoint).
    #[arg(long, default_value_t = 1)]
    pub retries: usize,
    /// Do not write the report at the end.
    #[arg(long)]
    pub no_report: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub paths: PathArgs,
    /// One JSON object per cell instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct SlurmArgs {
    #[command(flatten)]
    pub paths: PathArgs,
    /// Write the scripts without submitting them.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub partition: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub qos: Option<String>,
    /// e.g. gpu:1 or gpu:a100:1
    #[arg(long)]
    pub gres: Option<String>,
    /// Wall time per cell, e.g. 04:00:00.
    #[arg(long)]
    pub time: Option<String>,
    #[arg(long)]
    pub cpus_per_task: Option<u64>,
    #[arg(long)]
    pub mem: Option<String>,
    /// At most this many tasks of a stage at once.
    #[arg(long)]
    pub max_parallel: Option<u64>,
    /// afterok (a stage starts when the ones it needs all succeeded) or afterany.
    #[arg(long)]
    pub dependency: Option<String>,
    /// Most tasks per array job; larger stages are split (default 1000, Slurm's default
    /// MaxArraySize is 1001).
    #[arg(long)]
    pub array_limit: Option<u64>,
    /// The palign binary as the cluster nodes see it (default: this binary).
    #[arg(long)]
    pub palign: Option<PathBuf>,
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    // Every subcommand checks --device (and PALIGN_DEVICE): the cells and Slurm scripts
    // get it as given. The grid itself opens no device.
    common.device_choice()?;
    match &args.cmd {
        Sub::Run(a) => run_grid(a, common),
        Sub::Status(a) => status(a),
        Sub::Report(a) => report(a),
        Sub::Slurm(a) => slurm_cmd(a, common),
    }
}

fn run_grid(a: &RunArgs, common: &Common) -> Result<()> {
    if a.jobs == 0 {
        return Err(bad("--jobs must be at least 1"));
    }
    if common.threads == Some(0) {
        return Err(bad("--threads must be at least 1"));
    }
    let (spec, cells) = grid::load(&a.paths.spec)?;
    // Inputs of the cells this run would start (missing data or models, bad flag values)
    // fail here, naming the spec key, before any cell runs or --out is made.
    grid::inputs::check(&spec, &cells, &a.paths.out, &a.cell)?;
    let out = runner::out_dir(&a.paths.out)?;
    let parallel = if a.gpus.is_empty() {
        a.jobs
    } else {
        a.gpus.len()
    };
    if !common.quiet {
        eprintln!("grid: {}", grid::cells::summary(&cells));
    }
    let opts = runner::RunOpts {
        jobs: a.jobs,
        gpus: a.gpus.clone(),
        only: a.cell.clone(),
        retries: a.retries,
        runtime: runner::runtime_flags(&common.device, common.threads, parallel),
        quiet: common.quiet,
    };
    let summary = runner::run(&spec, &out, &cells, &opts)?;
    if !a.no_report && a.cell.is_empty() {
        let files = grid::report::write(&spec, &out, &cells)?;
        if !common.quiet {
            eprintln!(
                "grid: report in {} ({} files)",
                out.join("report").display(),
                files.len()
            );
        }
    }
    let secs: f64 = summary.ran.iter().map(|r| r.1).sum();
    eprintln!(
        "grid: {} already done, {} ran ({secs:.1}s of cell time), {} failed, {} skipped",
        summary.already_done,
        summary.ran.len(),
        summary.failed.len(),
        summary.skipped.len()
    );
    for (id, e) in &summary.failed {
        eprintln!("  failed  {id}: {e}");
    }
    for (id, why) in &summary.skipped {
        eprintln!("  skipped {id}: {why}");
    }
    if summary.ok() {
        Ok(())
    } else {
        Err(Error::Io {
            context: "grid run".into(),
            source: std::io::Error::other(format!(
                "{} cell(s) failed and {} were skipped; `palign grid status` shows them, \
                 their log.txt says why; rerun to retry",
                summary.failed.len(),
                summary.skipped.len()
            )),
        })
    }
}

fn status(a: &StatusArgs) -> Result<()> {
    let (_, cells) = grid::load(&a.paths.spec)?;
    let rows = grid::status(&a.paths.out, &cells);
    if a.json {
        for r in &rows {
            println!(
                "{}",
                serde_json::json!({"id": r.id, "kind": r.kind, "state": r.state, "metric": r.metric})
            );
        }
    } else {
        print!("{}", grid::status_table(&rows));
    }
    Ok(())
}

fn report(a: &PathArgs) -> Result<()> {
    let (spec, cells) = grid::load(&a.spec)?;
    if !a.out.is_dir() {
        return Err(bad(format!(
            "--out {}: no such folder (run `palign grid run` first)",
            a.out.display()
        )));
    }
    let files = grid::report::write(&spec, &a.out, &cells)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

fn slurm_cmd(a: &SlurmArgs, common: &Common) -> Result<()> {
    if let Some(d) = &a.dependency {
        if d != "afterok" && d != "afterany" {
            return Err(bad(format!("--dependency: `{d}` (afterok or afterany)")));
        }
    }
    if common.threads == Some(0) {
        return Err(bad("--threads must be at least 1"));
    }
    let (spec, cells) = grid::load(&a.paths.spec)?;
    let out = runner::out_dir(&a.paths.out)?;
    let cli = SlurmSettings {
        partition: a.partition.clone(),
        account: a.account.clone(),
        qos: a.qos.clone(),
        gres: a.gres.clone(),
        time: a.time.clone(),
        cpus_per_task: a.cpus_per_task,
        mem: a.mem.clone(),
        max_parallel: a.max_parallel,
        extra: vec![],
        setup: vec![],
        dependency: a.dependency.clone(),
        array_limit: a.array_limit,
        palign: a.palign.as_ref().map(|p| p.display().to_string()),
    };
    let mut runtime = vec![];
    if common.device != "auto" {
        runtime.extend(["--device".to_string(), common.device.clone()]);
    }
    if let Some(t) = common.threads {
        runtime.extend(["--threads".to_string(), t.to_string()]);
    }
    let (dir, stages) = slurm::write(&spec, &out, &cells, &cli, &runtime)?;
    let n: usize = stages.iter().map(|s| s.cells.len()).sum();
    println!(
        "{} stages, {n} cells to run: {}",
        stages.len(),
        stages
            .iter()
            .map(|s| format!("{} ({})", s.name, s.cells.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("scripts: {}", dir.display());
    if stages.is_empty() {
        println!("nothing to submit: every cell is done");
        return Ok(());
    }
    if a.dry_run {
        println!("dry run: submit with {}/submit.sh", dir.display());
        return Ok(());
    }
    println!("{}", slurm::submit(&dir)?);
    Ok(())
}
