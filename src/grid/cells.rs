//! Expanding a spec into cells: one palign command each, with a stable id that is also its
//! folder under `--out`, and the cells it depends on. Ids:
//!
//! - `model/NAME`: `init-tiny` for models given as `init-tiny:ARCH`
//! - `train/MODEL/DATASET[.nN]/METHOD/PEFT/seedS`: `sft` or `dpo` (`sft-dpo` = `dpo
//!   --init-adapter` of the `sft` cell with the same model, data, PEFT and seed)
//! - `merge/MODEL/NAME/seedS`: `merge` of that seed's runs
//! - `eval/EVAL/TARGET`: `eval TASK` of `base/MODEL`, a train cell or a merge cell
//!
//! Commands run with the grid's `--out` as working folder, so every path between cells is
//! relative to it and a grid folder can be moved whole.

use super::spec::{EvalDef, Method, ModelSource, Peft, RunRef, Spec};
use crate::error::{bad, Result};
use clap::{ArgAction, Args as _};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::PathBuf;
use toml::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Model,
    Train,
    Merge,
    Eval,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Train => "train",
            Kind::Merge => "merge",
            Kind::Eval => "eval",
        }
    }
}

/// A training run without its seed: what results are averaged over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunKey {
    pub model: usize,
    pub dataset: usize,
    /// Set when a `[[train]]` block's `num_samples` list made this variant.
    pub num_samples: Option<usize>,
    pub method: Method,
    pub peft: Peft,
}

/// What an evaluation (or a result) is about, seeds aside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Base(usize),
    Run(RunKey),
    /// (model, merge index)
    Merge(usize, usize),
}

#[derive(Clone, Debug)]
pub struct Cell {
    pub id: String,
    pub kind: Kind,
    /// Indices of the cells this one needs; always smaller than this cell's index.
    pub deps: Vec<usize>,
    /// palign's arguments (without the binary), paths relative to the grid folder.
    pub args: Vec<String>,
    /// Files written into the cell folder before the command runs (name, text).
    pub files: Vec<(String, String)>,
    pub target: Option<Target>,
    pub seed: Option<u64>,
    /// Index into `spec.evals` for eval cells.
    pub eval: Option<usize>,
}

impl Cell {
    /// The command's output folder, relative to the grid folder.
    pub fn out(&self) -> String {
        out_of(&self.id)
    }

    /// The cell as recorded in its run.json.
    pub fn describe(&self, spec: &Spec) -> Json {
        let mut m = serde_json::Map::new();
        m.insert("kind".into(), self.kind.name().into());
        if let Some(t) = self.target {
            let model = match t {
                Target::Base(m) | Target::Merge(m, _) => m,
                Target::Run(r) => r.model,
            };
            m.insert("model".into(), spec.models[model].name.clone().into());
            if let Target::Run(r) = t {
                m.insert(
                    "dataset".into(),
                    spec.datasets[r.dataset].name.clone().into(),
                );
                m.insert("num_samples".into(), r.num_samples.into());
                m.insert("method".into(), r.method.name().into());
                m.insert("peft".into(), r.peft.name().into());
            }
            if let Target::Merge(_, k) = t {
                m.insert("merge".into(), spec.merges[k].name.clone().into());
            }
        }
        if let Some(s) = self.seed {
            m.insert("seed".into(), s.into());
        }
        if let Some(e) = self.eval {
            m.insert("eval".into(), spec.evals[e].name.clone().into());
            m.insert("task".into(), spec.evals[e].task.clone().into());
        }
        Json::Object(m)
    }
}

pub fn out_of(id: &str) -> String {
    format!("{id}/out")
}

/// The dataset part of a train id.
pub fn dataset_id(spec: &Spec, r: &RunKey) -> String {
    let name = &spec.datasets[r.dataset].name;
    match r.num_samples {
        Some(n) => format!("{name}.n{n}"),
        None => name.clone(),
    }
}

pub fn train_id(spec: &Spec, r: &RunKey, seed: u64) -> String {
    format!(
        "train/{}/{}/{}/{}/seed{seed}",
        spec.models[r.model].name,
        dataset_id(spec, r),
        r.method.name(),
        r.peft.name()
    )
}

pub fn target_id(spec: &Spec, t: &Target, seed: Option<u64>) -> String {
    match *t {
        Target::Base(m) => format!("base/{}", spec.models[m].name),
        Target::Run(r) => train_id(spec, &r, seed.unwrap_or(0)),
        Target::Merge(m, k) => format!(
            "merge/{}/{}/seed{}",
            spec.models[m].name,
            spec.merges[k].name,
            seed.unwrap_or(0)
        ),
    }
}

/// Flags the grid sets itself; a spec table may not.
const TRAIN_RESERVED: [&str; 9] = [
    "model",
    "data",
    "out",
    "resume",
    "init_adapter",
    "peft",
    "quant",
    "template",
    "seed",
];
const EVAL_RESERVED: [&str; 7] = [
    "model", "adapter", "quant", "data", "out", "template", "seed",
];

pub(crate) fn train_command(name: &'static str) -> clap::Command {
    crate::train::TrainArgs::augment_args(crate::commands::Common::augment_args(
        clap::Command::new(name).no_binary_name(true),
    ))
}

pub(crate) fn eval_command() -> clap::Command {
    crate::commands::eval::Args::augment_args(crate::commands::Common::augment_args(
        clap::Command::new("eval").no_binary_name(true),
    ))
}

/// Appends `--flag value` for one spec entry, as the command's argument wants it: a boolean
/// flag only when true, lists repeated for repeatable flags and comma-joined otherwise,
/// path arguments resolved against the spec's folder.
fn push_flag(
    out: &mut Vec<String>,
    cmd: &clap::Command,
    key: &str,
    v: &Value,
    spec_dir: &std::path::Path,
    at: &str,
) -> Result<()> {
    let long = key.replace('_', "-");
    let arg = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
        .ok_or_else(|| {
            bad(format!(
                "{at}.{key}: `palign {}` has no flag --{long}",
                cmd.get_name()
            ))
        })?;
    let scalar = |x: &Value| -> Result<String> {
        match x {
            Value::String(s) => Ok(s.clone()),
            Value::Integer(i) => Ok(i.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            Value::Boolean(b) => Ok(b.to_string()),
            _ => Err(bad(format!("{at}.{key}: expected a string or number"))),
        }
    };
    let is_path = arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>();
    let fix = |s: String| {
        if is_path {
            super::spec::resolve_path(spec_dir, &s)
                .display()
                .to_string()
        } else {
            s
        }
    };
    match arg.get_action() {
        ArgAction::SetTrue => match v {
            Value::Boolean(true) => out.push(format!("--{long}")),
            Value::Boolean(false) => {}
            _ => return Err(bad(format!("{at}.{key}: --{long} takes true or false"))),
        },
        ArgAction::Append => {
            let items = match v {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            for x in &items {
                push_value(out, &long, fix(scalar(x)?));
            }
        }
        _ => {
            let s = match v {
                Value::Array(a) => a.iter().map(scalar).collect::<Result<Vec<_>>>()?.join(","),
                other => scalar(other)?,
            };
            push_value(out, &long, fix(s));
        }
    }
    Ok(())
}

/// `--flag value`, or `--flag=value` for a value starting with `-` (a negative number),
/// which the parser would take for a flag of its own.
fn push_value(out: &mut Vec<String>, long: &str, value: String) {
    if value.starts_with('-') {
        out.push(format!("--{long}={value}"));
    } else {
        out.push(format!("--{long}"));
        out.push(value);
    }
}

/// Parses the built argument list with the command's own parser, so a bad value in the
/// spec is reported before anything runs.
fn check_args(cmd: clap::Command, args: &[String], id: &str) -> Result<clap::ArgMatches> {
    cmd.try_get_matches_from(args).map_err(|e| {
        let msg = e.to_string();
        let line = msg
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim_start_matches("error: ")
            .to_string();
        bad(format!("cell {id}: {line}"))
    })
}

/// The method tables a training run's flags come from, the winning one first.
pub(crate) fn method_tables(m: Method) -> &'static [Method] {
    match m {
        Method::Sft => &[Method::Sft],
        Method::Dpo => &[Method::Dpo],
        Method::SftDpo => &[Method::SftDpo, Method::Dpo],
    }
}

/// The spec key a training command's message is about: `methods.M.KEY` of the table that
/// set the flag the message names, else the run's method table.
fn train_key(spec: &Spec, method: Method, msg: &str) -> String {
    let names = |long: &str| {
        let pat = format!("--{long}");
        msg.match_indices(&pat).any(|(i, _)| {
            msg[i + pat.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-'))
        })
    };
    for &t in method_tables(method) {
        for (k, _) in spec.args_of(t) {
            if names(&k.replace('_', "-")) {
                return format!("methods.{}.{k}", t.name());
            }
        }
    }
    format!("methods.{}", method.name())
}

/// The training command's own checks of its settings (`Settings::resolve`: --steps, --lr,
/// --batch-size, ... and `--recompute`), run on the cell's parsed flags, so a bad value in
/// a method table fails when the spec loads, naming the table's key.
fn check_train_settings(
    spec: &Spec,
    key: &RunKey,
    m: &clap::ArgMatches,
    seed: u64,
    id: &str,
) -> Result<()> {
    use clap::FromArgMatches;
    let a = crate::train::TrainArgs::from_arg_matches(m)
        .map_err(|e| bad(format!("cell {id}: {}", e.to_string().trim())))?;
    let method = if key.method == Method::Sft {
        crate::train::Method::Sft
    } else {
        crate::train::Method::Dpo
    };
    let checked = crate::train::Settings::resolve(&a, method, seed).and_then(|_| {
        if a.recompute != "auto" {
            a.recompute.parse::<crate::model::llama::Recompute>()?;
        }
        Ok(())
    });
    checked.map_err(|e| match e {
        crate::Error::BadInput(msg) => bad(format!(
            "{}: {msg} (cell {id})",
            train_key(spec, key.method, &msg)
        )),
        other => other,
    })
}

/// Keys merged in order: a later table's value replaces an earlier one's.
fn merged(tables: &[&[(String, Value)]]) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    for t in tables {
        for (k, v) in t.iter() {
            match out.iter_mut().find(|(kk, _)| kk == k) {
                Some(slot) => slot.1 = v.clone(),
                None => out.push((k.clone(), v.clone())),
            }
        }
    }
    out
}

/// The whole grid in dependency order.
pub fn expand(spec: &Spec) -> Result<Vec<Cell>> {
    let mut cells: Vec<Cell> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let spec_dir = spec.path.parent().unwrap_or(std::path::Path::new("."));

    // Method tables: reserved keys and unknown flags are caught once, at their table.
    for (m, args) in &spec.method_args {
        let cmd = train_command(if *m == Method::Sft { "sft" } else { "dpo" });
        for (k, v) in args {
            let at = format!("methods.{}", m.name());
            if TRAIN_RESERVED.contains(&k.as_str()) || k == "stop_after" {
                return Err(bad(format!(
                    "{at}.{k}: the grid sets --{} itself",
                    k.replace('_', "-")
                )));
            }
            push_flag(&mut Vec::new(), &cmd, k, v, spec_dir, &at)?;
        }
    }

    // Models the grid makes itself; others are paths.
    let mut model_path: Vec<(String, Option<usize>)> = Vec::new();
    for m in &spec.models {
        match &m.source {
            ModelSource::Dir(p) => model_path.push((p.display().to_string(), None)),
            ModelSource::Tiny { arch, seed } => {
                let id = format!("model/{}", m.name);
                let args = vec![
                    "init-tiny".to_string(),
                    "--arch".into(),
                    arch.clone(),
                    "--out".into(),
                    out_of(&id),
                    "--seed".into(),
                    seed.to_string(),
                ];
                index.insert(id.clone(), cells.len());
                model_path.push((out_of(&id), Some(cells.len())));
                cells.push(Cell {
                    id,
                    kind: Kind::Model,
                    deps: vec![],
                    args,
                    files: vec![],
                    target: None,
                    seed: None,
                    eval: None,
                });
            }
        }
    }

    // Training cells, each block's cross product in order, duplicates kept once.
    for b in &spec.train {
        for &model in &b.models {
            for &dataset in &b.datasets {
                for &num_samples in &b.num_samples {
                    for &method in &b.methods {
                        for &peft in &b.peft {
                            for &seed in &b.seeds {
                                let key = RunKey {
                                    model,
                                    dataset,
                                    num_samples,
                                    method,
                                    peft,
                                };
                                add_train(spec, &mut cells, &mut index, &model_path, key, seed)?;
                            }
                        }
                    }
                }
            }
        }
    }

    // Merges: per model and seed, of that seed's runs.
    for (k, md) in spec.merges.iter().enumerate() {
        for &model in &md.models {
            for &seed in &md.seeds {
                let t = Target::Merge(model, k);
                let id = target_id(spec, &t, Some(seed));
                let mut deps = vec![];
                let mut runs = vec![];
                for r in &md.runs {
                    let key = run_key(model, r);
                    let rid = train_id(spec, &key, seed);
                    let &i = index.get(&rid).ok_or_else(|| {
                        bad(format!(
                            "merge `{}`: run {rid} is not in any [[train]] block",
                            md.name
                        ))
                    })?;
                    deps.push(i);
                    runs.push(out_of(&rid));
                }
                let (base, base_dep) = &model_path[model];
                deps.extend(base_dep.iter().copied());
                let yaml = merge_yaml(md, base, &runs)?;
                let args = vec![
                    "merge".to_string(),
                    "--config".into(),
                    format!("{id}/merge.yaml"),
                    "--out".into(),
                    out_of(&id),
                    "--seed".into(),
                    seed.to_string(),
                ];
                index.insert(id.clone(), cells.len());
                cells.push(Cell {
                    id,
                    kind: Kind::Merge,
                    deps,
                    args,
                    files: vec![("merge.yaml".into(), yaml)],
                    target: Some(t),
                    seed: Some(seed),
                    eval: None,
                });
            }
        }
    }

    // Evaluations of the base models, the runs and the merges.
    let trained_models: Vec<usize> = {
        let mut v: Vec<usize> = cells
            .iter()
            .filter_map(|c| match c.target {
                Some(Target::Run(r)) => Some(r.model),
                Some(Target::Merge(m, _)) => Some(m),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let n_before = cells.len();
    for (e, ed) in spec.evals.iter().enumerate() {
        let wants = |m: usize| ed.models.as_ref().is_none_or(|l| l.contains(&m));
        if ed.on.base {
            for m in 0..spec.models.len() {
                let used = trained_models.contains(&m) || ed.models.is_some();
                if wants(m) && used {
                    let t = Target::Base(m);
                    let deps: Vec<usize> = model_path[m].1.iter().copied().collect();
                    let c = eval_cell(spec, e, ed, t, None, &model_path, deps, None)?;
                    index.insert(c.id.clone(), cells.len());
                    cells.push(c);
                }
            }
        }
        for i in 0..n_before {
            let (t, seed) = match (cells[i].target, cells[i].seed) {
                (Some(t @ Target::Run(r)), s) if ed.on.runs && wants(r.model) => (t, s),
                (Some(t @ Target::Merge(m, _)), s) if ed.on.merges && wants(m) => (t, s),
                _ => continue,
            };
            let mut deps = vec![i];
            let model = match t {
                Target::Run(r) => r.model,
                Target::Merge(m, _) => m,
                Target::Base(m) => m,
            };
            deps.extend(model_path[model].1.iter().copied());
            deps.sort();
            deps.dedup();
            let out = cells[i].out();
            let c = eval_cell(spec, e, ed, t, seed, &model_path, deps, Some(out))?;
            index.insert(c.id.clone(), cells.len());
            cells.push(c);
        }
    }
    Ok(cells)
}

fn run_key(model: usize, r: &RunRef) -> RunKey {
    RunKey {
        model,
        dataset: r.dataset,
        num_samples: r.num_samples,
        method: r.method,
        peft: r.peft,
    }
}

fn add_train(
    spec: &Spec,
    cells: &mut Vec<Cell>,
    index: &mut HashMap<String, usize>,
    model_path: &[(String, Option<usize>)],
    key: RunKey,
    seed: u64,
) -> Result<usize> {
    let id = train_id(spec, &key, seed);
    if let Some(&i) = index.get(&id) {
        return Ok(i);
    }
    let (path, model_dep) = &model_path[key.model];
    let mut deps: Vec<usize> = model_dep.iter().copied().collect();
    // The chain's DPO starts from the SFT adapter of the same run.
    let init = if key.method == Method::SftDpo {
        let sft = RunKey {
            method: Method::Sft,
            ..key
        };
        let i = add_train(spec, cells, index, model_path, sft, seed)?;
        deps.push(i);
        Some(cells[i].out())
    } else {
        None
    };
    let m = &spec.models[key.model];
    let ds = &spec.datasets[key.dataset];
    let cmd_name = if key.method == Method::Sft {
        "sft"
    } else {
        "dpo"
    };
    let mut args = vec![cmd_name.to_string(), "--model".into(), path.clone()];
    for d in &ds.data {
        args.push("--data".into());
        args.push(d.clone());
    }
    args.extend([
        "--out".into(),
        out_of(&id),
        "--peft".into(),
        key.peft.name().into(),
        "--template".into(),
        m.template.clone(),
        "--seed".into(),
        seed.to_string(),
    ]);
    let flags = match key.method {
        Method::Sft => merged(&[spec.args_of(Method::Sft)]),
        Method::Dpo => merged(&[spec.args_of(Method::Dpo)]),
        Method::SftDpo => merged(&[spec.args_of(Method::Dpo), spec.args_of(Method::SftDpo)]),
    };
    let has = |k: &str| flags.iter().any(|(kk, _)| kk == k);
    // The seed also picks the data order unless the spec pins it.
    if !has("data_seed") {
        args.extend(["--data-seed".into(), seed.to_string()]);
    }
    let num_samples = key.num_samples.or(ds.num_samples);
    if let Some(n) = num_samples {
        args.extend(["--num-samples".into(), n.to_string()]);
    }
    if let (Some(k), false) = (spec.save_every, has("save_every")) {
        args.extend(["--save-every".into(), k.to_string()]);
    }
    let cmd = train_command(cmd_name);
    let spec_dir = spec.path.parent().unwrap_or(std::path::Path::new("."));
    for (k, v) in &flags {
        if k == "num_samples" && num_samples.is_some() {
            continue;
        }
        push_flag(
            &mut args,
            &cmd,
            k,
            v,
            spec_dir,
            &format!("methods.{}", key.method.name()),
        )?;
    }
    if let Some(init) = init {
        args.extend(["--init-adapter".into(), init]);
    }
    args.push("--resume".into());
    let matches = check_args(cmd, &args[1..], &id)?;
    check_train_settings(spec, &key, &matches, seed, &id)?;
    deps.sort();
    deps.dedup();
    index.insert(id.clone(), cells.len());
    cells.push(Cell {
        id,
        kind: Kind::Train,
        deps,
        args,
        files: vec![],
        target: Some(Target::Run(key)),
        seed: Some(seed),
        eval: None,
    });
    Ok(cells.len() - 1)
}

/// A YAML scalar: JSON's quoting is valid YAML.
fn yq(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn yaml_scalar(v: &Value, at: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(yq(s)),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(bad(format!("{at}: expected a number, string or boolean"))),
    }
}

/// The mergekit-style config of one merge: slerp between the two runs (the first is the
/// base, t = 0), linear of the runs, ties/dare_ties of the runs over the bare base.
fn merge_yaml(md: &super::spec::MergeDef, base: &str, runs: &[String]) -> Result<String> {
    let at = format!("merge `{}`", md.name);
    let refs: Vec<String> = runs.iter().map(|r| format!("{base}+{r}")).collect();
    let mut y = format!("merge_method: {}\n", md.method);
    match md.method.as_str() {
        "slerp" => y += &format!("base_model: {}\n", yq(&refs[0])),
        "linear" => {}
        _ => y += &format!("base_model: {}\n", yq(base)),
    }
    y += "models:\n";
    for (i, r) in refs.iter().enumerate() {
        y += &format!("  - model: {}\n", yq(r));
        let mut p = vec![];
        if let Some(w) = &md.weights {
            p.push(format!("weight: {}", w[i]));
        }
        if let Some(d) = &md.density {
            p.push(format!("density: {}", d[i]));
        }
        if p.is_empty() && md.method == "linear" {
            p.push(format!("weight: {}", 1.0 / refs.len() as f64));
        }
        if !p.is_empty() {
            y += &format!("    parameters: {{{}}}\n", p.join(", "));
        }
    }
    let mut top = vec![];
    if let Some(t) = md.t {
        top.push(format!("t: {t}"));
    }
    for (k, v) in &md.parameters {
        top.push(format!(
            "{k}: {}",
            yaml_scalar(v, &format!("{at}.parameters.{k}"))?
        ));
    }
    if !top.is_empty() {
        y += &format!("parameters: {{{}}}\n", top.join(", "));
    }
    if let Some(d) = &md.dtype {
        y += &format!("dtype: {d}\n");
    }
    Ok(y)
}

#[allow(clippy::too_many_arguments)]
fn eval_cell(
    spec: &Spec,
    e: usize,
    ed: &EvalDef,
    t: Target,
    seed: Option<u64>,
    model_path: &[(String, Option<usize>)],
    deps: Vec<usize>,
    target_out: Option<String>,
) -> Result<Cell> {
    let tid = target_id(spec, &t, seed);
    let id = format!("eval/{}/{tid}", ed.name);
    let (model, adapter, quant) = match t {
        Target::Base(m) => (model_path[m].0.clone(), None, false),
        Target::Run(r) => (
            model_path[r.model].0.clone(),
            target_out,
            r.peft == Peft::Qlora && spec.eval_qlora_quant,
        ),
        Target::Merge(..) => (target_out.expect("a merge's folder"), None, false),
    };
    let mi = match t {
        Target::Base(m) | Target::Merge(m, _) => m,
        Target::Run(r) => r.model,
    };
    let mut args = vec!["eval".to_string(), ed.task.clone(), "--model".into(), model];
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), a]);
    }
    if quant {
        args.extend(["--quant".into(), "nf4".into()]);
    }
    args.extend([
        "--data".into(),
        ed.data.display().to_string(),
        "--out".into(),
        out_of(&id),
        "--template".into(),
        spec.models[mi].template.clone(),
        "--seed".into(),
        seed.unwrap_or(0).to_string(),
    ]);
    let at = format!("evals.{}.args", ed.name);
    let root = eval_command();
    let sub = root
        .find_subcommand(&ed.task)
        .ok_or_else(|| bad(format!("evals.{}: unknown task `{}`", ed.name, ed.task)))?
        .clone();
    // alpaca_eval names the model in outputs.json; the cell's target says which one.
    if ed.task == "alpaca-eval" && !ed.args.iter().any(|(k, _)| k == "name") {
        args.extend(["--name".into(), tid.replace('/', "_")]);
    }
    let spec_dir = spec.path.parent().unwrap_or(std::path::Path::new("."));
    for (k, v) in &ed.args {
        if EVAL_RESERVED.contains(&k.as_str()) {
            return Err(bad(format!(
                "{at}.{k}: the grid sets --{} itself",
                k.replace('_', "-")
            )));
        }
        push_flag(&mut args, &sub, k, v, spec_dir, &at)?;
    }
    check_args(root, &args[1..], &id)?;
    Ok(Cell {
        id,
        kind: Kind::Eval,
        deps,
        args,
        files: vec![],
        target: Some(t),
        seed,
        eval: Some(e),
    })
}

/// A one-line summary of the expansion (cells per kind).
pub fn summary(cells: &[Cell]) -> String {
    let count = |k: Kind| cells.iter().filter(|c| c.kind == k).count();
    format!(
        "{} cells: {} model, {} train, {} merge, {} eval",
        cells.len(),
        count(Kind::Model),
        count(Kind::Train),
        count(Kind::Merge),
        count(Kind::Eval)
    )
}
