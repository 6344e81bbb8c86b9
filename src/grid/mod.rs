//! `palign grid`: the paper's study (models × datasets × methods × PEFT × seeds, merges,
//! evaluations) from one TOML spec, run locally cell by cell or on Slurm, then reported as
//! the paper's tables and figures.
//!
//! - `spec`: the TOML file, checked and with paths resolved
//! - `cells`: the expansion into cells (id = folder under `--out`, command, dependencies)
//! - `state`: a cell's state from its folder (the command's own finished marker, a record, a lock)
//! - `inputs`: the files a run's cells read, and their flags, checked before any runs
//! - `runner`: `grid run` (dependency order, retries, parallel slots, kill-safe)
//! - `report`: aggregation over seeds, tables (CSV, markdown) and figures
//! - `slurm`: sbatch array scripts per stage, chained with dependencies

pub mod cells;
pub mod inputs;
pub mod report;
pub mod runner;
pub mod slurm;
pub mod spec;
pub mod state;

use crate::error::Result;
use cells::{Cell, Kind};
use serde_json::Value as Json;
use state::State;
use std::path::Path;

/// A cell's headline number, for `grid status`: a run's last logged loss (and DPO reward
/// accuracy), an evaluation's metric.
pub fn key_metric(out: &Path, c: &Cell, st: &State) -> String {
    let o = out.join(c.out());
    match c.kind {
        Kind::Train => {
            let text = std::fs::read_to_string(o.join("metrics.jsonl")).unwrap_or_default();
            let Some(row) = text
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Json>(l).ok())
            else {
                return String::new();
            };
            let mut s = String::new();
            if *st != State::Done {
                if let Some(k) = row["step"].as_u64() {
                    s += &format!("step {k} ");
                }
            }
            if let Some(l) = row["loss"].as_f64() {
                s += &format!("loss {l:.4}");
            }
            if let Some(a) = row["rewards/accuracies"].as_f64() {
                s += &format!(" acc {a:.2}");
            }
            s
        }
        Kind::Eval => {
            let Some(v) = std::fs::read_to_string(o.join("results.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Json>(&t).ok())
            else {
                return String::new();
            };
            match v["value"].as_f64() {
                Some(x) => format!(
                    "{} {}",
                    v["metric"].as_str().unwrap_or("value"),
                    report::fmt_num(x)
                ),
                None => format!("{} -", v["metric"].as_str().unwrap_or("value")),
            }
        }
        Kind::Model | Kind::Merge => String::new(),
    }
}

/// One row of `grid status`.
pub struct StatusRow {
    pub id: String,
    pub kind: &'static str,
    pub state: String,
    pub metric: String,
}

/// Every cell's state; a cell waiting on a failed dependency shows as `blocked`.
pub fn status(out: &Path, cells: &[Cell]) -> Vec<StatusRow> {
    let mut states: Vec<State> = Vec::with_capacity(cells.len());
    let mut blocked = vec![false; cells.len()];
    let mut rows = Vec::with_capacity(cells.len());
    for (i, c) in cells.iter().enumerate() {
        let st = state::state(out, c);
        blocked[i] = matches!(st, State::Pending | State::Partial)
            && c.deps
                .iter()
                .any(|&d| blocked[d] || matches!(states[d], State::Failed(_)));
        let name = if blocked[i] {
            "blocked".to_string()
        } else {
            st.name().to_string()
        };
        let metric = match &st {
            State::Failed(e) => e.chars().take(80).collect(),
            State::Running(who) => format!("{who} {}", key_metric(out, c, &st)),
            _ => key_metric(out, c, &st),
        };
        rows.push(StatusRow {
            id: c.id.clone(),
            kind: c.kind.name(),
            state: name,
            metric: metric.trim().to_string(),
        });
        states.push(st);
    }
    rows
}

/// The status table as text, with a count per state at the end.
pub fn status_table(rows: &[StatusRow]) -> String {
    let w = rows.iter().map(|r| r.id.len()).max().unwrap_or(2).max(2);
    let mut s = format!("{:<w$}  {:<5}  {:<8}  metric\n", "id", "kind", "state");
    for r in rows {
        let line = format!("{:<w$}  {:<5}  {:<8}  {}", r.id, r.kind, r.state, r.metric);
        s += line.trim_end();
        s.push('\n');
    }
    let mut counts: Vec<(String, usize)> = vec![];
    for r in rows {
        match counts.iter_mut().find(|(k, _)| *k == r.state) {
            Some(c) => c.1 += 1,
            None => counts.push((r.state.clone(), 1)),
        }
    }
    let order = ["done", "running", "partial", "failed", "blocked", "pending"];
    counts.sort_by_key(|(k, _)| order.iter().position(|o| o == k));
    s += &format!(
        "{} cells: {}\n",
        rows.len(),
        counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s
}

/// Loads and expands a spec.
pub fn load(spec_path: &Path) -> Result<(spec::Spec, Vec<Cell>)> {
    let spec = spec::Spec::load(spec_path)?;
    let cells = cells::expand(&spec)?;
    Ok((spec, cells))
}
