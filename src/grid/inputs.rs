//! `grid run`'s check of what the cells it is about to run read: model folders, data files,
//! path flags of the method and eval tables, and each evaluation's own checks of its flags,
//! so a bad spec fails at once (exit 2, one line naming the spec key) rather than cell by
//! cell. Cells that are done or not asked for are not looked at, so their (placeholder or
//! since moved) paths are never opened.

use super::cells::{self, Cell, Kind, Target};
use super::spec::{resolve_path, Method, ModelSource, Spec};
use super::state;
use crate::error::{bad, Error, Result};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use toml::Value;

/// Checks the inputs of the cells `grid run --out OUT [--cell ID]...` would run; errors
/// name the spec file and key.
pub fn check(spec: &Spec, cells: &[Cell], out: &Path, only: &[String]) -> Result<()> {
    let runs = |c: &Cell| (only.is_empty() || only.contains(&c.id)) && !state::marker_done(out, c);
    let mut models = BTreeSet::new();
    let mut datasets = BTreeSet::new();
    let mut methods = BTreeSet::new();
    // Eval index → its first cell to run (the flags but model and output are the same).
    let mut evals: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, c) in cells.iter().enumerate().filter(|(_, c)| runs(c)) {
        match (c.kind, c.target) {
            (Kind::Train, Some(Target::Run(r))) => {
                models.insert(r.model);
                datasets.insert(r.dataset);
                methods.insert(r.method);
            }
            (Kind::Merge, Some(Target::Merge(m, _))) => {
                models.insert(m);
            }
            (Kind::Eval, Some(t)) => {
                match t {
                    Target::Base(m) => {
                        models.insert(m);
                    }
                    Target::Run(r) => {
                        models.insert(r.model);
                    }
                    Target::Merge(..) => {}
                }
                if let Some(e) = c.eval {
                    evals.entry(e).or_insert(i);
                }
            }
            _ => {}
        }
    }
    let checked = (|| {
        for &m in &models {
            check_model(spec, m)?;
        }
        for &d in &datasets {
            check_dataset(spec, d)?;
        }
        let mut tables = BTreeSet::new();
        for &m in &methods {
            tables.extend(cells::method_tables(m).iter().copied());
        }
        for t in tables {
            check_method(spec, t)?;
        }
        for (&e, &i) in &evals {
            check_eval(spec, e, &cells[i])?;
        }
        Ok(())
    })();
    checked.map_err(|e| match e {
        Error::BadInput(m) => bad(format!("{}: {m}", spec.path.display())),
        other => other,
    })
}

fn missing(at: &str, p: &Path) -> Error {
    bad(format!("{at}: {}: no such file or folder", p.display()))
}

/// A model given as a folder: it exists and its config.json is one palign loads.
fn check_model(spec: &Spec, m: usize) -> Result<()> {
    let def = &spec.models[m];
    let ModelSource::Dir(p) = &def.source else {
        return Ok(());
    };
    let at = format!("models.{}.path", def.name);
    if !p.is_dir() {
        return Err(bad(format!("{at}: {}: no such folder", p.display())));
    }
    crate::model::config::ModelConfig::load(p)
        .map_err(|e| crate::eval::located(&format!("{at}: "), p, e))?;
    Ok(())
}

/// The file or folder of a `--data` spec (absolute after `Spec::load`).
fn data_path(s: &str) -> Result<PathBuf> {
    use crate::data::sources::{parse_spec, Spec as DataSpec};
    Ok(match parse_spec(s)? {
        DataSpec::Jsonl(p) | DataSpec::HhRlhf(p) | DataSpec::PkuSafeRlhf(p, _) => p,
    })
}

fn check_dataset(spec: &Spec, d: usize) -> Result<()> {
    let def = &spec.datasets[d];
    for (i, s) in def.data.iter().enumerate() {
        let at = if def.data.len() == 1 {
            format!("datasets.{}.data", def.name)
        } else {
            format!("datasets.{}.data[{i}]", def.name)
        };
        let p = data_path(s)?;
        if !p.exists() {
            return Err(missing(&at, &p));
        }
    }
    Ok(())
}

/// Path values of a flag table (`--flag` arguments typed as paths), resolved against the
/// spec's folder as the cells get them.
fn path_values<'a>(
    cmd: &clap::Command,
    table: &'a [(String, Value)],
    spec_dir: &Path,
) -> Vec<(&'a str, PathBuf)> {
    let mut out = vec![];
    for (k, v) in table {
        let long = k.replace('_', "-");
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            continue;
        };
        if arg.get_value_parser().type_id() != std::any::TypeId::of::<PathBuf>() {
            continue;
        }
        let items = match v {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        for x in items {
            if let Value::String(s) = x {
                out.push((k.as_str(), resolve_path(spec_dir, &s)));
            }
        }
    }
    out
}

/// A method table's `eval_data` files and path flags (e.g. `ref_adapter`).
fn check_method(spec: &Spec, m: Method) -> Result<()> {
    let table = spec.args_of(m);
    let at = |k: &str| format!("methods.{}.{k}", m.name());
    for (k, v) in table {
        if k != "eval_data" {
            continue;
        }
        let specs = match v {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>(),
            Value::String(s) => vec![s.as_str()],
            _ => vec![],
        };
        for s in specs {
            let p = data_path(s).map_err(|e| bad(format!("{}: {e}", at(k))))?;
            if !p.exists() {
                return Err(missing(&at(k), &p));
            }
        }
    }
    let cmd = cells::train_command(if m == Method::Sft { "sft" } else { "dpo" });
    let spec_dir = spec.path.parent().unwrap_or(Path::new("."));
    for (k, p) in path_values(&cmd, table, spec_dir) {
        if !p.exists() {
            return Err(missing(&at(k), &p));
        }
    }
    Ok(())
}

/// An evaluation's data, its path flags, and the task's own checks of its flags (the
/// scorer of real-toxicity, the judge of alpaca-eval, ...) on the flags of `cell`.
fn check_eval(spec: &Spec, e: usize, cell: &Cell) -> Result<()> {
    use clap::FromArgMatches;
    let def = &spec.evals[e];
    if !def.data.exists() {
        return Err(missing(&format!("evals.{}.data", def.name), &def.data));
    }
    let root = cells::eval_command();
    let spec_dir = spec.path.parent().unwrap_or(Path::new("."));
    if let Some(sub) = root.find_subcommand(&def.task) {
        for (k, p) in path_values(sub, &def.args, spec_dir) {
            if !p.exists() {
                return Err(missing(&format!("evals.{}.args.{k}", def.name), &p));
            }
        }
    }
    let at = format!("evals.{}", def.name);
    let args = root
        .try_get_matches_from(&cell.args[1..])
        .ok()
        .and_then(|m| crate::commands::eval::Args::from_arg_matches(&m).ok());
    // `expand` parsed these flags already; a failure here is caught when the cell runs.
    if let Some(args) = args {
        crate::eval::check_task_flags(&args.task).map_err(|err| match err {
            Error::BadInput(m) => bad(format!("{at}: {m}")),
            other => other,
        })?;
    }
    Ok(())
}
