//! The grid spec: a TOML file naming models, datasets, per-method flags, training blocks
//! (cross products of models × datasets × methods × PEFT × seeds), merges of named runs and
//! evaluations. Relative paths are relative to the spec file's folder. See
//! `examples/paper-grid.toml` for every key.

use crate::error::{bad, Error, Result};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// `sft`, `dpo`, or `sft-dpo` (DPO continuing the SFT adapter of the same model, data,
/// PEFT and seed via `--init-adapter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    Sft,
    Dpo,
    SftDpo,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Sft, Method::Dpo, Method::SftDpo];

    /// The name used in cell ids and the spec.
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::SftDpo => "sft-dpo",
        }
    }

    /// The name in tables and figures.
    pub fn label(self) -> &'static str {
        match self {
            Method::Sft => "SFT",
            Method::Dpo => "DPO",
            Method::SftDpo => "SFT→DPO",
        }
    }

    pub fn parse(s: &str, at: &str) -> Result<Method> {
        match s {
            "sft" => Ok(Method::Sft),
            "dpo" => Ok(Method::Dpo),
            "sft-dpo" | "sft→dpo" | "sft->dpo" => Ok(Method::SftDpo),
            _ => Err(bad(format!(
                "{at}: unknown method `{s}` (sft, dpo, sft-dpo)"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peft {
    Lora,
    Qlora,
}

impl Peft {
    pub fn name(self) -> &'static str {
        match self {
            Peft::Lora => "lora",
            Peft::Qlora => "qlora",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Peft::Lora => "LoRA",
            Peft::Qlora => "QLoRA",
        }
    }

    fn parse(s: &str, at: &str) -> Result<Peft> {
        match s {
            "lora" => Ok(Peft::Lora),
            "qlora" => Ok(Peft::Qlora),
            _ => Err(bad(format!("{at}: unknown peft `{s}` (lora, qlora)"))),
        }
    }
}

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face model folder (absolute).
    Dir(PathBuf),
    /// `init-tiny:ARCH[:SEED]`: made by the grid itself with `palign init-tiny`.
    Tiny { arch: String, seed: u64 },
}

#[derive(Clone, Debug)]
pub struct ModelDef {
    pub name: String,
    pub label: String,
    pub source: ModelSource,
    pub template: String,
}

#[derive(Clone, Debug)]
pub struct DatasetDef {
    pub name: String,
    pub label: String,
    /// `--data` specs with absolute paths; several make a mixture.
    pub data: Vec<String>,
    pub num_samples: Option<usize>,
    /// The collection (e.g. `HH-RLHF`) and the preference (e.g. `Harmless`), when given:
    /// the tables group rows by them as the paper does.
    pub source: Option<String>,
    pub preference: Option<String>,
}

/// One `[[train]]` block: the cross product of its lists.
#[derive(Clone, Debug)]
pub struct TrainBlock {
    pub models: Vec<usize>,
    pub datasets: Vec<usize>,
    pub methods: Vec<Method>,
    pub peft: Vec<Peft>,
    pub seeds: Vec<u64>,
    /// `None`: the dataset's own `num_samples`.
    pub num_samples: Vec<Option<usize>>,
}

/// A run named inside a merge: `DATASET[.nN]/METHOD/PEFT` of the merge's model and seed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRef {
    pub dataset: usize,
    pub num_samples: Option<usize>,
    pub method: Method,
    pub peft: Peft,
}

#[derive(Clone, Debug)]
pub struct MergeDef {
    pub name: String,
    pub label: String,
    /// mergekit's `merge_method`: slerp, linear, ties, dare_ties.
    pub method: String,
    pub models: Vec<usize>,
    pub runs: Vec<RunRef>,
    pub weights: Option<Vec<f64>>,
    pub density: Option<Vec<f64>>,
    pub t: Option<f64>,
    /// Other top-level mergekit `parameters` (lambda, normalize, rescale, ...).
    pub parameters: Table,
    pub dtype: Option<String>,
    pub seeds: Vec<u64>,
}

/// Which targets an evaluation applies to.
#[derive(Clone, Copy, Debug)]
pub struct EvalOn {
    pub base: bool,
    pub runs: bool,
    pub merges: bool,
}

#[derive(Clone, Debug)]
pub struct EvalDef {
    pub name: String,
    pub label: String,
    /// mmlu, bbh, alpaca-eval, real-toxicity, dangerous-qa.
    pub task: String,
    pub data: PathBuf,
    /// Extra `palign eval TASK` flags (key without dashes, value), paths made absolute.
    pub args: Vec<(String, Value)>,
    pub on: EvalOn,
    /// Only these models (all when `None`).
    pub models: Option<Vec<usize>>,
}

/// `[slurm]`: sbatch settings; `[slurm.STAGE]` tables override them per stage kind.
#[derive(Clone, Debug, Default)]
pub struct SlurmOpts {
    pub base: SlurmSettings,
    pub per_kind: Vec<(String, SlurmSettings)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub gres: Option<String>,
    pub time: Option<String>,
    pub cpus_per_task: Option<u64>,
    pub mem: Option<String>,
    /// `%N` on the array: at most N tasks of a stage at once.
    pub max_parallel: Option<u64>,
    /// Extra `#SBATCH` lines (e.g. `--constraint=a100`).
    pub extra: Vec<String>,
    /// Shell lines run before the cell (e.g. `module load cuda`).
    pub setup: Vec<String>,
    /// `afterok` (default) or `afterany`.
    pub dependency: Option<String>,
    /// Most tasks in one array job (Slurm's MaxArraySize is 1001 by default): bigger
    /// stages are split into parts.
    pub array_limit: Option<u64>,
    /// The palign binary on the cluster (default: this binary's path).
    pub palign: Option<String>,
}

impl SlurmSettings {
    /// `self` with the fields `over` sets replaced.
    pub fn overlay(&self, over: &SlurmSettings) -> SlurmSettings {
        let pick = |a: &Option<String>, b: &Option<String>| b.clone().or_else(|| a.clone());
        SlurmSettings {
            partition: pick(&self.partition, &over.partition),
            account: pick(&self.account, &over.account),
            qos: pick(&self.qos, &over.qos),
            gres: pick(&self.gres, &over.gres),
            time: pick(&self.time, &over.time),
            cpus_per_task: over.cpus_per_task.or(self.cpus_per_task),
            mem: pick(&self.mem, &over.mem),
            max_parallel: over.max_parallel.or(self.max_parallel),
            extra: if over.extra.is_empty() {
                self.extra.clone()
            } else {
                over.extra.clone()
            },
            setup: if over.setup.is_empty() {
                self.setup.clone()
            } else {
                over.setup.clone()
            },
            dependency: pick(&self.dependency, &over.dependency),
            array_limit: over.array_limit.or(self.array_limit),
            palign: pick(&self.palign, &over.palign),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Spec {
    /// The spec file (absolute).
    pub path: PathBuf,
    pub seeds: Vec<u64>,
    /// Evaluate QLoRA runs on the NF4-quantized base (`--quant nf4`), as they were trained.
    pub eval_qlora_quant: bool,
    /// `--save-every` of training cells unless a method table sets it.
    pub save_every: Option<u64>,
    pub models: Vec<ModelDef>,
    pub datasets: Vec<DatasetDef>,
    /// Flags for every run of a method: `[methods.sft]`, `[methods.dpo]`, and
    /// `[methods.sft-dpo]` (the chain's DPO stage, on top of `dpo`'s).
    pub method_args: Vec<(Method, Vec<(String, Value)>)>,
    pub train: Vec<TrainBlock>,
    pub merges: Vec<MergeDef>,
    pub evals: Vec<EvalDef>,
    pub slurm: SlurmOpts,
}

impl Spec {
    pub fn model(&self, name: &str) -> Option<usize> {
        self.models.iter().position(|m| m.name == name)
    }

    pub fn dataset(&self, name: &str) -> Option<usize> {
        self.datasets.iter().position(|d| d.name == name)
    }

    /// The flags of a method's table (empty when the spec has none).
    pub fn args_of(&self, m: Method) -> &[(String, Value)] {
        self.method_args
            .iter()
            .find(|(k, _)| *k == m)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }
}

/// Names appear in cell ids, folders and Slurm job names: keep them to a safe alphabet.
pub fn check_name(name: &str, at: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{at}: name `{name}` must be letters, digits, `-`, `_`, `.` or `+` (not starting with `.`)"
        )))
    }
}

/// A table's keys must all be known.
fn check_keys(t: &Table, allowed: &[&str], at: &str) -> Result<()> {
    for k in t.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(bad(format!(
                "{at}: unknown key `{k}` (known: {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

fn table<'a>(v: &'a Value, at: &str) -> Result<&'a Table> {
    v.as_table()
        .ok_or_else(|| bad(format!("{at}: expected a table, got {}", v.type_str())))
}

fn string(v: &Value, at: &str) -> Result<String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(format!("{at}: expected a string, got {}", v.type_str())))
}

fn opt_string(t: &Table, k: &str, at: &str) -> Result<Option<String>> {
    t.get(k)
        .map(|v| string(v, &format!("{at}.{k}")))
        .transpose()
}

fn uint(v: &Value, at: &str) -> Result<u64> {
    match v.as_integer() {
        Some(i) if i >= 0 => Ok(i as u64),
        _ => Err(bad(format!("{at}: expected a non-negative integer"))),
    }
}

fn float(v: &Value, at: &str) -> Result<f64> {
    match v {
        Value::Float(f) if f.is_finite() => Ok(*f),
        Value::Integer(i) => Ok(*i as f64),
        _ => Err(bad(format!("{at}: expected a number"))),
    }
}

/// A string or a list of strings.
fn strings(v: &Value, at: &str) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| string(x, &format!("{at}[{i}]")))
            .collect(),
        _ => Err(bad(format!(
            "{at}: expected a string or a list of strings, got {}",
            v.type_str()
        ))),
    }
}

/// A number or a list of numbers.
fn floats(v: &Value, at: &str) -> Result<Vec<f64>> {
    match v {
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| float(x, &format!("{at}[{i}]")))
            .collect(),
        _ => Ok(vec![float(v, at)?]),
    }
}

fn uints(v: &Value, at: &str) -> Result<Vec<u64>> {
    match v {
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| uint(x, &format!("{at}[{i}]")))
            .collect(),
        _ => Ok(vec![uint(v, at)?]),
    }
}

fn nonempty<T>(v: Vec<T>, at: &str) -> Result<Vec<T>> {
    if v.is_empty() {
        Err(bad(format!("{at}: the list is empty")))
    } else {
        Ok(v)
    }
}

/// A user path, relative to the spec's folder, with `.` and `..` folded away.
pub fn resolve_path(dir: &Path, p: &str) -> PathBuf {
    use std::path::Component;
    let p = Path::new(p);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// A `--data` spec with its path made absolute (the PKU split stays after the last `:`).
pub fn resolve_data_spec(dir: &Path, spec: &str, at: &str) -> Result<String> {
    crate::data::sources::parse_spec(spec).map_err(|e| bad(format!("{at}: {e}")))?;
    let (kind, rest) = spec.split_once(':').expect("parse_spec checked the kind");
    let (path, split) = if kind == "pku-saferlhf" {
        let (p, s) = rest.rsplit_once(':').expect("parse_spec checked the split");
        (p, Some(s))
    } else {
        (rest, None)
    };
    let abs = resolve_path(dir, path).display().to_string();
    Ok(match split {
        Some(s) => format!("{kind}:{abs}:{s}"),
        None => format!("{kind}:{abs}"),
    })
}

/// A method table's flags, in file order.
fn flag_table(v: &Value, at: &str) -> Result<Vec<(String, Value)>> {
    let t = table(v, at)?;
    let mut out = Vec::new();
    for (k, v) in t {
        if matches!(v, Value::Table(_) | Value::Datetime(_)) {
            return Err(bad(format!(
                "{at}.{k}: a flag's value is a string, number, boolean or list"
            )));
        }
        out.push((k.replace('-', "_"), v.clone()));
    }
    Ok(out)
}

impl Spec {
    /// Reads and checks a spec file.
    pub fn load(path: &Path) -> Result<Spec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        let abs = std::fs::canonicalize(path).map_err(|e| Error::read(path, e))?;
        Spec::parse(&text, &abs).map_err(|e| match e {
            Error::BadInput(m) => bad(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses spec text; `path` is the file it came from (relative paths start at its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Spec> {
        let root: Table = toml::from_str(text).map_err(|e| {
            bad(format!(
                "not valid TOML: {}",
                e.to_string().trim().replace('\n', " ")
            ))
        })?;
        check_keys(
            &root,
            &[
                "grid", "models", "datasets", "methods", "train", "merge", "evals", "slurm",
            ],
            "top level",
        )?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let empty = Value::Table(Table::new());
        let get = |k: &str| root.get(k).unwrap_or(&empty);

        let grid = table(get("grid"), "grid")?;
        check_keys(grid, &["seeds", "eval_qlora_quant", "save_every"], "grid")?;
        let seeds = match grid.get("seeds") {
            Some(v) => nonempty(uints(v, "grid.seeds")?, "grid.seeds")?,
            None => vec![0],
        };
        let eval_qlora_quant = match grid.get("eval_qlora_quant") {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad("grid.eval_qlora_quant: expected true or false"))?,
            None => true,
        };
        let save_every = grid
            .get("save_every")
            .map(|v| uint(v, "grid.save_every"))
            .transpose()?;

        let mut spec = Spec {
            path: path.to_path_buf(),
            seeds,
            eval_qlora_quant,
            save_every,
            models: vec![],
            datasets: vec![],
            method_args: vec![],
            train: vec![],
            merges: vec![],
            evals: vec![],
            slurm: SlurmOpts::default(),
        };

        for (name, v) in table(get("models"), "models")? {
            let at = format!("models.{name}");
            check_name(name, &at)?;
            let t = table(v, &at)?;
            check_keys(t, &["path", "template", "label"], &at)?;
            let p = opt_string(t, "path", &at)?
                .ok_or_else(|| bad(format!("{at}: `path` is missing")))?;
            let source = match p.strip_prefix("init-tiny:") {
                Some(rest) => {
                    let (arch, seed) = match rest.split_once(':') {
                        Some((a, s)) => (
                            a,
                            s.parse::<u64>().map_err(|_| {
                                bad(format!(
                                    "{at}.path: `{p}`: the seed after the arch must be an integer"
                                ))
                            })?,
                        ),
                        None => (rest, 0),
                    };
                    if arch != "llama" && arch != "mistral" {
                        return Err(bad(format!(
                            "{at}.path: `{p}`: init-tiny arch must be llama or mistral"
                        )));
                    }
                    ModelSource::Tiny {
                        arch: arch.to_string(),
                        seed,
                    }
                }
                None => ModelSource::Dir(resolve_path(&dir, &p)),
            };
            let template = opt_string(t, "template", &at)?.unwrap_or_else(|| "none".into());
            template
                .parse::<crate::model::Template>()
                .map_err(|e| bad(format!("{at}.template: {e}")))?;
            spec.models.push(ModelDef {
                name: name.clone(),
                label: opt_string(t, "label", &at)?.unwrap_or_else(|| name.clone()),
                source,
                template,
            });
        }
        if spec.models.is_empty() {
            return Err(bad("no [models.NAME] table"));
        }

        for (name, v) in table(get("datasets"), "datasets")? {
            let at = format!("datasets.{name}");
            check_name(name, &at)?;
            let t = table(v, &at)?;
            check_keys(
                t,
                &["data", "num_samples", "label", "source", "preference"],
                &at,
            )?;
            let raw = t
                .get("data")
                .ok_or_else(|| bad(format!("{at}: `data` is missing")))?;
            let data = nonempty(strings(raw, &format!("{at}.data"))?, &format!("{at}.data"))?
                .iter()
                .enumerate()
                .map(|(i, s)| resolve_data_spec(&dir, s, &format!("{at}.data[{i}]")))
                .collect::<Result<Vec<_>>>()?;
            let num_samples = t
                .get("num_samples")
                .map(|v| match uint(v, &format!("{at}.num_samples"))? {
                    0 => Err(bad(format!("{at}.num_samples: must be at least 1"))),
                    n => Ok(n as usize),
                })
                .transpose()?;
            let source = opt_string(t, "source", &at)?;
            let preference = opt_string(t, "preference", &at)?;
            let label = match (opt_string(t, "label", &at)?, &source, &preference) {
                (Some(l), _, _) => l,
                (None, Some(s), Some(p)) => format!("{s} {p}"),
                _ => name.clone(),
            };
            spec.datasets.push(DatasetDef {
                name: name.clone(),
                label,
                data,
                num_samples,
                source,
                preference,
            });
        }

        for (name, v) in table(get("methods"), "methods")? {
            let at = format!("methods.{name}");
            let m = Method::parse(name, "methods")?;
            let mut args = flag_table(v, &at)?;
            for (k, v) in args.iter_mut() {
                if k == "eval_data" {
                    let specs = strings(v, &format!("{at}.{k}"))?
                        .iter()
                        .map(|s| resolve_data_spec(&dir, s, &format!("{at}.{k}")))
                        .collect::<Result<Vec<_>>>()?;
                    *v = Value::Array(specs.into_iter().map(Value::String).collect());
                }
            }
            spec.method_args.push((m, args));
        }

        let blocks = match root.get("train") {
            None => vec![],
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(bad("train: write training blocks as [[train]]")),
        };
        for (i, v) in blocks.iter().enumerate() {
            let at = format!("train[{i}]");
            let t = table(v, &at)?;
            check_keys(
                t,
                &[
                    "models",
                    "datasets",
                    "methods",
                    "peft",
                    "seeds",
                    "num_samples",
                ],
                &at,
            )?;
            let list = |k: &str| -> Result<Vec<String>> {
                let v = t
                    .get(k)
                    .ok_or_else(|| bad(format!("{at}: `{k}` is missing")))?;
                nonempty(strings(v, &format!("{at}.{k}"))?, &format!("{at}.{k}"))
            };
            let models = list("models")?
                .iter()
                .map(|n| {
                    spec.model(n)
                        .ok_or_else(|| bad(format!("{at}.models: no model `{n}` in [models]")))
                })
                .collect::<Result<Vec<_>>>()?;
            let datasets = list("datasets")?
                .iter()
                .map(|n| {
                    spec.dataset(n).ok_or_else(|| {
                        bad(format!("{at}.datasets: no dataset `{n}` in [datasets]"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let methods = list("methods")?
                .iter()
                .map(|m| Method::parse(m, &format!("{at}.methods")))
                .collect::<Result<Vec<_>>>()?;
            let peft = match t.get("peft") {
                Some(v) => nonempty(strings(v, &format!("{at}.peft"))?, &format!("{at}.peft"))?
                    .iter()
                    .map(|p| Peft::parse(p, &format!("{at}.peft")))
                    .collect::<Result<Vec<_>>>()?,
                None => vec![Peft::Qlora],
            };
            let seeds = match t.get("seeds") {
                Some(v) => nonempty(uints(v, &format!("{at}.seeds"))?, &format!("{at}.seeds"))?,
                None => spec.seeds.clone(),
            };
            let num_samples = match t.get("num_samples") {
                Some(v) => nonempty(
                    uints(v, &format!("{at}.num_samples"))?,
                    &format!("{at}.num_samples"),
                )?
                .into_iter()
                .map(|n| {
                    if n == 0 {
                        Err(bad(format!("{at}.num_samples: must be at least 1")))
                    } else {
                        Ok(Some(n as usize))
                    }
                })
                .collect::<Result<Vec<_>>>()?,
                None => vec![None],
            };
            spec.train.push(TrainBlock {
                models,
                datasets,
                methods,
                peft,
                seeds,
                num_samples,
            });
        }

        let merges = match root.get("merge") {
            None => vec![],
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(bad("merge: write merges as [[merge]]")),
        };
        for (i, v) in merges.iter().enumerate() {
            let t = table(v, &format!("merge[{i}]"))?;
            let name = opt_string(t, "name", &format!("merge[{i}]"))?
                .ok_or_else(|| bad(format!("merge[{i}]: `name` is missing")))?;
            let at = format!("merge `{name}`");
            check_name(&name, &at)?;
            if spec.merges.iter().any(|m| m.name == name) {
                return Err(bad(format!("{at}: two merges share the name")));
            }
            check_keys(
                t,
                &[
                    "name",
                    "label",
                    "method",
                    "models",
                    "runs",
                    "weights",
                    "density",
                    "t",
                    "parameters",
                    "dtype",
                    "seeds",
                ],
                &at,
            )?;
            let method = opt_string(t, "method", &at)?
                .ok_or_else(|| bad(format!("{at}: `method` is missing")))?;
            if !["slerp", "linear", "ties", "dare_ties"].contains(&method.as_str()) {
                return Err(bad(format!(
                    "{at}.method: unknown method `{method}` (slerp, linear, ties, dare_ties)"
                )));
            }
            let models = nonempty(
                strings(
                    t.get("models")
                        .ok_or_else(|| bad(format!("{at}: `models` is missing")))?,
                    &format!("{at}.models"),
                )?,
                &format!("{at}.models"),
            )?
            .iter()
            .map(|n| {
                spec.model(n)
                    .ok_or_else(|| bad(format!("{at}.models: no model `{n}` in [models]")))
            })
            .collect::<Result<Vec<_>>>()?;
            let runs = nonempty(
                strings(
                    t.get("runs")
                        .ok_or_else(|| bad(format!("{at}: `runs` is missing")))?,
                    &format!("{at}.runs"),
                )?,
                &format!("{at}.runs"),
            )?
            .iter()
            .map(|r| spec.parse_run_ref(r, &format!("{at}.runs")))
            .collect::<Result<Vec<_>>>()?;
            if method == "slerp" && runs.len() != 2 {
                return Err(bad(format!(
                    "{at}: slerp merges exactly two runs, got {}",
                    runs.len()
                )));
            }
            let n = runs.len();
            let per_run = |k: &str| -> Result<Option<Vec<f64>>> {
                let Some(v) = t.get(k) else { return Ok(None) };
                let mut xs = floats(v, &format!("{at}.{k}"))?;
                if xs.len() == 1 {
                    xs = vec![xs[0]; n];
                }
                if xs.len() != n {
                    return Err(bad(format!(
                        "{at}.{k}: {} values for {n} runs (give one, or one per run)",
                        xs.len()
                    )));
                }
                Ok(Some(xs))
            };
            let weights = per_run("weights")?;
            let density = per_run("density")?;
            let tv = t
                .get("t")
                .map(|v| float(v, &format!("{at}.t")))
                .transpose()?;
            if method == "slerp" {
                if tv.is_none() {
                    return Err(bad(format!("{at}: slerp needs `t`")));
                }
                if weights.is_some() || density.is_some() {
                    return Err(bad(format!(
                        "{at}: slerp takes `t`, not weights or density"
                    )));
                }
            } else if tv.is_some() {
                return Err(bad(format!("{at}: `t` is for slerp only")));
            }
            if method == "linear" && density.is_some() {
                return Err(bad(format!("{at}: linear takes no density")));
            }
            let parameters = match t.get("parameters") {
                Some(v) => table(v, &format!("{at}.parameters"))?.clone(),
                None => Table::new(),
            };
            let seeds = match t.get("seeds") {
                Some(v) => nonempty(uints(v, &format!("{at}.seeds"))?, &format!("{at}.seeds"))?,
                None => spec.seeds.clone(),
            };
            spec.merges.push(MergeDef {
                label: opt_string(t, "label", &at)?.unwrap_or_else(|| name.clone()),
                name,
                method,
                models,
                runs,
                weights,
                density,
                t: tv,
                parameters,
                dtype: opt_string(t, "dtype", &at)?,
                seeds,
            });
        }

        const TASKS: [&str; 5] = [
            "mmlu",
            "bbh",
            "alpaca-eval",
            "real-toxicity",
            "dangerous-qa",
        ];
        for (name, v) in table(get("evals"), "evals")? {
            let at = format!("evals.{name}");
            check_name(name, &at)?;
            let t = table(v, &at)?;
            check_keys(t, &["task", "data", "label", "args", "on", "models"], &at)?;
            let task = opt_string(t, "task", &at)?.unwrap_or_else(|| name.clone());
            if !TASKS.contains(&task.as_str()) {
                return Err(bad(format!(
                    "{at}.task: unknown task `{task}` ({})",
                    TASKS.join(", ")
                )));
            }
            let data = resolve_path(
                &dir,
                &opt_string(t, "data", &at)?
                    .ok_or_else(|| bad(format!("{at}: `data` is missing")))?,
            );
            let args = match t.get("args") {
                Some(v) => flag_table(v, &format!("{at}.args"))?,
                None => vec![],
            };
            let on = match t.get("on") {
                None => EvalOn {
                    base: true,
                    runs: true,
                    merges: true,
                },
                Some(v) => {
                    let list = strings(v, &format!("{at}.on"))?;
                    for x in &list {
                        if !["base", "runs", "merges"].contains(&x.as_str()) {
                            return Err(bad(format!(
                                "{at}.on: unknown target `{x}` (base, runs, merges)"
                            )));
                        }
                    }
                    let has = |k: &str| list.iter().any(|x| x == k);
                    EvalOn {
                        base: has("base"),
                        runs: has("runs"),
                        merges: has("merges"),
                    }
                }
            };
            let models = t
                .get("models")
                .map(|v| {
                    strings(v, &format!("{at}.models"))?
                        .iter()
                        .map(|n| {
                            spec.model(n).ok_or_else(|| {
                                bad(format!("{at}.models: no model `{n}` in [models]"))
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .transpose()?;
            spec.evals.push(EvalDef {
                name: name.clone(),
                label: opt_string(t, "label", &at)?.unwrap_or_else(|| name.clone()),
                task,
                data,
                args,
                on,
                models,
            });
        }

        let sl = table(get("slurm"), "slurm")?;
        const KINDS: [&str; 4] = ["model", "train", "merge", "eval"];
        for (k, v) in sl {
            if KINDS.contains(&k.as_str()) {
                let s = slurm_settings(
                    table(v, &format!("slurm.{k}"))?,
                    &format!("slurm.{k}"),
                    false,
                )?;
                spec.slurm.per_kind.push((k.clone(), s));
            }
        }
        let mut top = sl.clone();
        top.retain(|k, _| !KINDS.contains(&k));
        spec.slurm.base = slurm_settings(&top, "slurm", true)?;
        Ok(spec)
    }

    /// `DATASET[.nN]/METHOD/PEFT`.
    pub fn parse_run_ref(&self, r: &str, at: &str) -> Result<RunRef> {
        let parts: Vec<&str> = r.split('/').collect();
        let [ds, method, peft] = parts.as_slice() else {
            return Err(bad(format!(
                "{at}: `{r}`: write a run as DATASET/METHOD/PEFT (e.g. bt-harmless/sft/qlora)"
            )));
        };
        let (ds_name, num_samples) = match self.dataset(ds) {
            Some(_) => (*ds, None),
            None => match ds.rsplit_once(".n") {
                Some((d, n)) if n.parse::<usize>().is_ok() => (d, n.parse::<usize>().ok()),
                _ => (*ds, None),
            },
        };
        let dataset = self
            .dataset(ds_name)
            .ok_or_else(|| bad(format!("{at}: `{r}`: no dataset `{ds_name}` in [datasets]")))?;
        Ok(RunRef {
            dataset,
            num_samples,
            method: Method::parse(method, &format!("{at}: `{r}`"))?,
            peft: Peft::parse(peft, &format!("{at}: `{r}`"))?,
        })
    }
}

fn slurm_settings(t: &Table, at: &str, top: bool) -> Result<SlurmSettings> {
    let mut keys = vec![
        "partition",
        "account",
        "qos",
        "gres",
        "time",
        "cpus_per_task",
        "mem",
        "max_parallel",
        "extra",
        "setup",
        "dependency",
    ];
    if top {
        keys.extend(["palign", "array_limit"]);
    }
    check_keys(t, &keys, at)?;
    let s = |k: &str| opt_string(t, k, at);
    let list = |k: &str| -> Result<Vec<String>> {
        t.get(k)
            .map(|v| strings(v, &format!("{at}.{k}")))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let dependency = s("dependency")?;
    if let Some(d) = &dependency {
        if d != "afterok" && d != "afterany" {
            return Err(bad(format!("{at}.dependency: `{d}` (afterok or afterany)")));
        }
    }
    Ok(SlurmSettings {
        partition: s("partition")?,
        account: s("account")?,
        qos: s("qos")?,
        gres: s("gres")?,
        time: s("time")?,
        cpus_per_task: t
            .get("cpus_per_task")
            .map(|v| uint(v, &format!("{at}.cpus_per_task")))
            .transpose()?,
        mem: s("mem")?,
        max_parallel: t
            .get("max_parallel")
            .map(|v| uint(v, &format!("{at}.max_parallel")))
            .transpose()?,
        extra: list("extra")?,
        setup: list("setup")?,
        dependency,
        array_limit: match t.get("array_limit") {
            Some(v) => match uint(v, &format!("{at}.array_limit"))? {
                0 => return Err(bad(format!("{at}.array_limit: must be at least 1"))),
                n => Some(n),
            },
            None => None,
        },
        palign: s("palign")?,
    })
}
