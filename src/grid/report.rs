//! `grid report`: every finished evaluation's value, averaged over seeds (mean ± sample
//! standard deviation), written to `OUT/report/` as
//! - `results.csv`: one row per target (base model, run, merge) and evaluation, plus each
//!   run's final training loss (and DPO reward accuracy);
//! - the paper's layouts as CSV + markdown: `by-benchmark-PEFT` (Tables 4/5: rows dataset ×
//!   model, columns benchmark × method), `by-method-PEFT` (Table 2: rows model × variant with
//!   the original model, columns method × benchmark), `merges` (Table 3), `samples-PEFT`
//!   (Figure 3's data: columns benchmark × number of samples);
//! - figures as PNG + SVG: `fig-methods-PEFT` (Figure 4), `fig-datasets-PEFT` (Figure 1),
//!   `fig-samples-PEFT` (Figure 3), `fig-peft` (Figure 6), `fig-merges`;
//! - `report.md` with all tables and figures.
//!
//! Cells without results are left out (a partial grid reports what it has; `n` says how many
//! seeds a number averages).

use super::cells::{Cell, Kind, RunKey, Target};
use super::spec::{Method, Peft, Spec};
use crate::error::{Error, Result};
use crate::plot::{self, BarPanel, BarSeries, Panel, Series, PALETTE};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Mean, sample standard deviation (n ≥ 2) and count of one result over seeds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: Option<f64>,
    pub n: usize,
}

pub fn stat(xs: &[f64]) -> Option<Stat> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let std = (n > 1)
        .then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    Some(Stat { mean, std, n })
}

/// Three decimals as the paper prints them; one for large numbers.
pub fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn fmt_stat(s: &Option<Stat>) -> String {
    match s {
        None => "–".into(),
        Some(Stat {
            mean,
            std: Some(sd),
            ..
        }) => format!("{} ± {}", fmt_num(*mean), fmt_num(*sd)),
        Some(Stat { mean, .. }) => fmt_num(*mean),
    }
}

/// Values per (target, evaluation) and per run over seeds.
#[derive(Default)]
pub struct Collected {
    pub evals: BTreeMap<(Target, usize), Vec<f64>>,
    pub train_loss: BTreeMap<RunKey, Vec<f64>>,
    pub train_acc: BTreeMap<RunKey, Vec<f64>>,
    /// The metric each evaluation reported (results.json `metric`).
    pub metric: BTreeMap<usize, String>,
    pub done: usize,
}

fn read_json(p: &Path) -> Option<Json> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Reads the finished cells' results.
pub fn collect(out: &Path, cells: &[Cell]) -> Collected {
    let mut c = Collected::default();
    for cell in cells {
        if !super::state::marker_done(out, cell) {
            continue;
        }
        c.done += 1;
        let o = out.join(cell.out());
        match (cell.kind, cell.target, cell.eval) {
            (Kind::Eval, Some(t), Some(e)) => {
                let Some(r) = read_json(&o.join("results.json")) else {
                    continue;
                };
                if let Some(v) = r["value"].as_f64() {
                    c.evals.entry((t, e)).or_default().push(v);
                }
                if let Some(m) = r["metric"].as_str() {
                    c.metric.entry(e).or_insert_with(|| m.to_string());
                }
            }
            (Kind::Train, Some(Target::Run(r)), _) => {
                let text = std::fs::read_to_string(o.join("metrics.jsonl")).unwrap_or_default();
                if let Some(row) = text
                    .lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<Json>(l).ok())
                {
                    if let Some(l) = row["loss"].as_f64() {
                        c.train_loss.entry(r).or_default().push(l);
                    }
                    if let Some(a) = row["rewards/accuracies"].as_f64() {
                        c.train_acc.entry(r).or_default().push(a);
                    }
                }
            }
            _ => {}
        }
    }
    c
}

/// A table in one of the paper's layouts.
struct Table {
    name: String,
    title: String,
    heads: Vec<String>,
    cols: Vec<String>,
    rows: Vec<(Vec<String>, Vec<Option<Stat>>)>,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_num(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.6}")).unwrap_or_default()
}

impl Table {
    fn csv(&self) -> String {
        let mut h: Vec<String> = self.heads.clone();
        for c in &self.cols {
            h.extend([format!("{c} mean"), format!("{c} std"), format!("{c} n")]);
        }
        let mut s = h.iter().map(|x| csv_field(x)).collect::<Vec<_>>().join(",") + "\n";
        for (heads, vals) in &self.rows {
            let mut f: Vec<String> = heads.iter().map(|x| csv_field(x)).collect();
            for v in vals {
                f.push(csv_num(v.map(|s| s.mean)));
                f.push(csv_num(v.and_then(|s| s.std)));
                f.push(v.map(|s| s.n.to_string()).unwrap_or_default());
            }
            s += &(f.join(",") + "\n");
        }
        s
    }

    fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.title);
        let head: Vec<&str> = self
            .heads
            .iter()
            .chain(&self.cols)
            .map(String::as_str)
            .collect();
        s += &format!("| {} |\n", head.join(" | "));
        s += &format!(
            "|{}\n",
            head.iter()
                .enumerate()
                .map(|(i, _)| if i < self.heads.len() {
                    "---|"
                } else {
                    "---:|"
                })
                .collect::<String>()
        );
        let mut last: Vec<String> = vec![];
        for (heads, vals) in &self.rows {
            // Repeated leading row labels are left blank, as in the paper's tables.
            let mut shown = vec![];
            let mut same = true;
            for (i, h) in heads.iter().enumerate() {
                same = same && last.get(i) == Some(h) && i + 1 < heads.len();
                shown.push(if same { String::new() } else { h.clone() });
            }
            last = heads.clone();
            let cells: Vec<String> = vals.iter().map(fmt_stat).collect();
            s += &format!("| {} | {} |\n", shown.join(" | "), cells.join(" | "));
        }
        s + "\n"
    }

    fn has_values(&self) -> bool {
        self.rows.iter().any(|(_, v)| v.iter().any(Option::is_some))
    }
}

struct Ctx<'a> {
    spec: &'a Spec,
    col: &'a Collected,
    /// Every run (train target) in the grid, in cell order.
    runs: Vec<RunKey>,
}

impl Ctx<'_> {
    fn get(&self, t: Target, e: usize) -> Option<Stat> {
        self.col.evals.get(&(t, e)).and_then(|v| stat(v))
    }

    fn model_label(&self, m: usize) -> &str {
        &self.spec.models[m].label
    }

    fn ds_label(&self, r: &RunKey) -> String {
        let d = &self.spec.datasets[r.dataset];
        match r.num_samples {
            Some(n) => format!("{} n={n}", d.label),
            None => d.label.clone(),
        }
    }

    /// The preference (or the dataset's label) of a run, for rows named after it.
    fn variant_label(&self, r: &RunKey) -> String {
        let d = &self.spec.datasets[r.dataset];
        let base = d.preference.clone().unwrap_or_else(|| d.label.clone());
        match r.num_samples {
            Some(n) => format!("{base} n={n}"),
            None => base,
        }
    }

    /// Row names for runs: their preference where that tells them apart, else the
    /// dataset's label.
    fn row_labels(&self, keys: &[RunKey]) -> Vec<String> {
        let short: Vec<String> = keys.iter().map(|k| self.variant_label(k)).collect();
        keys.iter()
            .zip(&short)
            .map(|(k, s)| {
                let clash = keys
                    .iter()
                    .zip(&short)
                    .any(|(k2, s2)| s2 == s && k2.dataset != k.dataset);
                if clash {
                    self.ds_label(k)
                } else {
                    s.clone()
                }
            })
            .collect()
    }

    /// A run's dataset in figure labels: the spec's short name (`.nN` for sample counts).
    fn ds_short(&self, r: &RunKey) -> String {
        super::cells::dataset_id(self.spec, r)
    }

    /// Evaluations with at least one value on targets matching `f`.
    fn evals_with(&self, f: impl Fn(&Target) -> bool) -> Vec<usize> {
        (0..self.spec.evals.len())
            .filter(|&e| self.col.evals.keys().any(|(t, ee)| *ee == e && f(t)))
            .collect()
    }

    fn pefts(&self) -> Vec<Peft> {
        let mut v: Vec<Peft> = self.runs.iter().map(|r| r.peft).collect();
        v.sort();
        v.dedup();
        // QLoRA first: the paper's main tables.
        v.reverse();
        v
    }

    fn methods_of(&self, runs: &[RunKey]) -> Vec<Method> {
        Method::ALL
            .into_iter()
            .filter(|m| runs.iter().any(|r| r.method == *m))
            .collect()
    }

    /// Distinct (dataset, num_samples) pairs of `runs`, in order.
    fn variants(runs: &[RunKey]) -> Vec<(usize, Option<usize>)> {
        let mut v: Vec<(usize, Option<usize>)> = vec![];
        for r in runs {
            if !v.contains(&(r.dataset, r.num_samples)) {
                v.push((r.dataset, r.num_samples));
            }
        }
        v
    }

    fn models_of(runs: &[RunKey]) -> Vec<usize> {
        let mut v: Vec<usize> = runs.iter().map(|r| r.model).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Tables 4/5: rows alignment dataset × model, columns benchmark × method.
fn by_benchmark(cx: &Ctx, peft: Peft, runs: &[RunKey]) -> Table {
    let evals = cx.evals_with(|t| matches!(t, Target::Run(r) if r.peft == peft));
    let methods = cx.methods_of(runs);
    let variants = Ctx::variants(runs);
    let with_source = variants.iter().all(|(d, _)| {
        let d = &cx.spec.datasets[*d];
        d.source.is_some() && d.preference.is_some()
    });
    // Paper order: by collection, then model, then preference.
    let mut keys: Vec<(usize, usize, usize)> = vec![]; // (group, model, variant)
    let mut groups: Vec<String> = vec![];
    for (vi, (d, n)) in variants.iter().enumerate() {
        let g = if with_source {
            cx.spec.datasets[*d].source.clone().expect("checked")
        } else {
            cx.ds_label(&RunKey {
                model: 0,
                dataset: *d,
                num_samples: *n,
                method: Method::Sft,
                peft,
            })
        };
        let gi = groups.iter().position(|x| *x == g).unwrap_or_else(|| {
            groups.push(g);
            groups.len() - 1
        });
        for m in Ctx::models_of(runs) {
            if runs
                .iter()
                .any(|r| r.model == m && r.dataset == *d && r.num_samples == *n)
            {
                keys.push((gi, m, vi));
            }
        }
    }
    keys.sort();
    let mut cols = vec![];
    for &e in &evals {
        for m in &methods {
            cols.push(format!("{} {}", cx.spec.evals[e].label, m.label()));
        }
    }
    let rows = keys
        .iter()
        .map(|&(gi, m, vi)| {
            let (d, n) = variants[vi];
            let model = if with_source {
                format!(
                    "{}-{}",
                    cx.model_label(m),
                    cx.variant_label(&RunKey {
                        model: m,
                        dataset: d,
                        num_samples: n,
                        method: Method::Sft,
                        peft
                    })
                )
            } else {
                cx.model_label(m).to_string()
            };
            let mut vals = vec![];
            for &e in &evals {
                for &method in &methods {
                    let r = RunKey {
                        model: m,
                        dataset: d,
                        num_samples: n,
                        method,
                        peft,
                    };
                    vals.push(cx.get(Target::Run(r), e));
                }
            }
            (vec![groups[gi].clone(), model], vals)
        })
        .collect();
    Table {
        name: format!("by-benchmark-{}", peft.name()),
        title: format!(
            "Results by benchmark and method, {} (Tables 4 and 5 layout)",
            peft.label()
        ),
        heads: vec![
            if with_source {
                "Alignment dataset"
            } else {
                "Dataset"
            }
            .into(),
            "Model".into(),
        ],
        cols,
        rows,
    }
}

/// Table 2: rows model × variant (the original model, then each dataset), columns method ×
/// benchmark.
fn by_method(cx: &Ctx, peft: Peft, runs: &[RunKey]) -> Table {
    let evals = cx.evals_with(|t| match t {
        Target::Run(r) => r.peft == peft,
        Target::Base(_) => true,
        _ => false,
    });
    let methods = cx.methods_of(runs);
    let mut cols = vec![];
    for m in &methods {
        for &e in &evals {
            cols.push(format!("{} {}", m.label(), cx.spec.evals[e].label));
        }
    }
    let mut rows = vec![];
    let variants = Ctx::variants(runs);
    let names = cx.row_labels(
        &variants
            .iter()
            .map(|&(d, n)| RunKey {
                model: 0,
                dataset: d,
                num_samples: n,
                method: Method::Sft,
                peft,
            })
            .collect::<Vec<_>>(),
    );
    for m in Ctx::models_of(runs) {
        let label = cx.model_label(m).to_string();
        let base: Vec<Option<Stat>> = methods
            .iter()
            .flat_map(|_| evals.iter().map(|&e| cx.get(Target::Base(m), e)))
            .collect();
        if base.iter().any(Option::is_some) {
            rows.push((vec![label.clone(), "Original".into()], base));
        }
        for (vi, &(d, n)) in variants.iter().enumerate() {
            let key = |method| RunKey {
                model: m,
                dataset: d,
                num_samples: n,
                method,
                peft,
            };
            if !runs.iter().any(|r| methods.iter().any(|&mm| *r == key(mm))) {
                continue;
            }
            let vals = methods
                .iter()
                .flat_map(|&mm| evals.iter().map(move |&e| (mm, e)))
                .map(|(mm, e)| cx.get(Target::Run(key(mm)), e))
                .collect();
            rows.push((vec![label.clone(), names[vi].clone()], vals));
        }
    }
    Table {
        name: format!("by-method-{}", peft.name()),
        title: format!(
            "Results by method, with the original models, {} (Table 2 layout)",
            peft.label()
        ),
        heads: vec!["Model".into(), "Variant".into()],
        cols,
        rows,
    }
}

/// The runs merges are made of, in order of first mention (model left as 0).
fn merge_inputs(spec: &Spec) -> Vec<RunKey> {
    let mut v: Vec<RunKey> = vec![];
    for md in &spec.merges {
        for r in &md.runs {
            let k = RunKey {
                model: 0,
                dataset: r.dataset,
                num_samples: r.num_samples,
                method: r.method,
                peft: r.peft,
            };
            if !v.contains(&k) {
                v.push(k);
            }
        }
    }
    v
}

/// Table 3: rows the merged runs and the merges, columns model × benchmark.
fn merges_table(cx: &Ctx) -> Table {
    let spec = cx.spec;
    let evals = cx.evals_with(|t| matches!(t, Target::Merge(..)));
    let mut models: Vec<usize> = spec.merges.iter().flat_map(|m| m.models.clone()).collect();
    models.sort();
    models.dedup();
    let inputs = merge_inputs(spec);
    let many_pefts = inputs.iter().any(|r| r.peft != inputs[0].peft);
    let mut cols = vec![];
    for &m in &models {
        for &e in &evals {
            cols.push(format!("{} {}", cx.model_label(m), spec.evals[e].label));
        }
    }
    let mut rows = vec![];
    let names = cx.row_labels(&inputs);
    for (r, name) in inputs.iter().zip(&names) {
        let mut label = format!("{name}-{}", r.method.label());
        if many_pefts {
            label += &format!(" ({})", r.peft.label());
        }
        let vals = models
            .iter()
            .flat_map(|&m| evals.iter().map(move |&e| (m, e)))
            .map(|(m, e)| cx.get(Target::Run(RunKey { model: m, ..*r }), e))
            .collect();
        rows.push((vec![label], vals));
    }
    for (k, md) in spec.merges.iter().enumerate() {
        let vals = models
            .iter()
            .flat_map(|&m| evals.iter().map(move |&e| (m, e)))
            .map(|(m, e)| cx.get(Target::Merge(m, k), e))
            .collect();
        rows.push((vec![md.label.clone()], vals));
    }
    Table {
        name: "merges".into(),
        title: "Merged models and the runs they merge (Table 3 layout)".into(),
        heads: vec!["Merge variant".into()],
        cols,
        rows,
    }
}

/// Figure 3's data: rows model × dataset × method, columns benchmark × number of samples.
fn samples_table(cx: &Ctx, peft: Peft, runs: &[RunKey]) -> (Table, Vec<usize>) {
    let evals =
        cx.evals_with(|t| matches!(t, Target::Run(r) if r.peft == peft && r.num_samples.is_some()));
    let mut ns: Vec<usize> = runs.iter().filter_map(|r| r.num_samples).collect();
    ns.sort();
    ns.dedup();
    let mut lines: Vec<(usize, usize, Method)> = runs
        .iter()
        .filter(|r| r.num_samples.is_some())
        .map(|r| (r.model, r.dataset, r.method))
        .collect();
    lines.sort();
    lines.dedup();
    let mut cols = vec![];
    for &e in &evals {
        for n in &ns {
            cols.push(format!("{} n={n}", cx.spec.evals[e].label));
        }
    }
    let rows = lines
        .iter()
        .map(|&(m, d, method)| {
            let vals = evals
                .iter()
                .flat_map(|&e| ns.iter().map(move |&n| (e, n)))
                .map(|(e, n)| {
                    cx.get(
                        Target::Run(RunKey {
                            model: m,
                            dataset: d,
                            num_samples: Some(n),
                            method,
                            peft,
                        }),
                        e,
                    )
                })
                .collect();
            (
                vec![
                    cx.model_label(m).to_string(),
                    cx.spec.datasets[d].label.clone(),
                    method.label().to_string(),
                ],
                vals,
            )
        })
        .collect();
    (
        Table {
            name: format!("samples-{}", peft.name()),
            title: format!(
                "Results by number of training samples, {} (Figure 3 data)",
                peft.label()
            ),
            heads: vec!["Model".into(), "Dataset".into(), "Method".into()],
            cols,
            rows,
        },
        ns,
    )
}

fn color(i: usize) -> [u8; 3] {
    PALETTE[i % PALETTE.len()]
}

/// Bar panels, one per evaluation: `groups` along x, one series per entry of `series`;
/// `value(group, series, eval)` gives each bar. Groups with fewer than `min_bars` bars in
/// every panel are left out (a comparison needs something to compare).
fn bar_panels(
    cx: &Ctx,
    evals: &[usize],
    groups: &[String],
    series: &[String],
    min_bars: usize,
    value: impl Fn(usize, usize, usize) -> Option<Stat>,
) -> Vec<BarPanel> {
    let keep: Vec<usize> = (0..groups.len())
        .filter(|&g| {
            evals.iter().any(|&e| {
                (0..series.len())
                    .filter(|&s| value(g, s, e).is_some())
                    .count()
                    >= min_bars.max(1)
            })
        })
        .collect();
    evals
        .iter()
        .map(|&e| BarPanel {
            title: cx.spec.evals[e].label.clone(),
            groups: keep.iter().map(|&g| groups[g].clone()).collect(),
            series: series
                .iter()
                .enumerate()
                .map(|(si, label)| BarSeries {
                    label: label.clone(),
                    color: color(si),
                    values: keep
                        .iter()
                        .map(|&gi| value(gi, si, e).map(|s| (s.mean, s.std.unwrap_or(0.0))))
                        .collect(),
                })
                .collect(),
        })
        .filter(|p| {
            p.series
                .iter()
                .any(|s| s.values.iter().any(Option::is_some))
        })
        .collect()
}

/// Writes the report folder; returns the files written.
pub fn write(spec: &Spec, out: &Path, cells: &[Cell]) -> Result<Vec<PathBuf>> {
    let dir = out.join("report");
    std::fs::create_dir_all(&dir).map_err(|e| Error::write(&dir, e))?;
    let col = collect(out, cells);
    let mut runs: Vec<RunKey> = vec![];
    for c in cells {
        if let (Kind::Train, Some(Target::Run(r))) = (c.kind, c.target) {
            if !runs.contains(&r) {
                runs.push(r);
            }
        }
    }
    let cx = Ctx {
        spec,
        col: &col,
        runs,
    };
    let mut written = vec![];
    let mut md = format!(
        "# Grid report\n\nSpec: `{}`. {} of {} cells finished. Numbers are mean ± sample \
         standard deviation over seeds (`n` in the CSV files).\n\n",
        spec.path.display(),
        col.done,
        cells.len()
    );
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        crate::fsio::write_bytes_atomic(&p, bytes)?;
        written.push(p);
        Ok(())
    };

    put("results.csv", results_csv(&cx).as_bytes())?;
    let mut tables: Vec<Table> = vec![];
    let mut figures: Vec<(String, String)> = vec![]; // (stem, caption)
    let mut bar_figs: Vec<(String, Vec<BarPanel>)> = vec![];
    let mut line_figs: Vec<(String, Vec<Panel>)> = vec![];

    for peft in cx.pefts() {
        let all: Vec<RunKey> = cx.runs.iter().copied().filter(|r| r.peft == peft).collect();
        let main: Vec<RunKey> = all
            .iter()
            .copied()
            .filter(|r| r.num_samples.is_none())
            .collect();
        if !main.is_empty() {
            tables.push(by_benchmark(&cx, peft, &main));
            tables.push(by_method(&cx, peft, &main));

            // Figure 4: methods side by side per model × dataset.
            let evals = cx.evals_with(|t| matches!(t, Target::Run(r) if r.peft == peft));
            let methods = cx.methods_of(&main);
            let mut groups = vec![];
            let mut keys = vec![];
            for m in Ctx::models_of(&main) {
                for (d, n) in Ctx::variants(&main) {
                    if main
                        .iter()
                        .any(|r| r.model == m && r.dataset == d && r.num_samples == n)
                    {
                        let r = RunKey {
                            model: m,
                            dataset: d,
                            num_samples: n,
                            method: Method::Sft,
                            peft,
                        };
                        groups.push(format!("{}\n{}", cx.model_label(m), cx.ds_short(&r)));
                        keys.push(r);
                    }
                }
            }
            let series: Vec<String> = methods.iter().map(|m| m.label().to_string()).collect();
            let panels = bar_panels(&cx, &evals, &groups, &series, 1, |g, s, e| {
                cx.get(
                    Target::Run(RunKey {
                        method: methods[s],
                        ..keys[g]
                    }),
                    e,
                )
            });
            if !panels.is_empty() {
                let stem = format!("fig-methods-{}", peft.name());
                figures.push((
                    stem.clone(),
                    format!(
                        "Methods compared per model and dataset, {} (Figure 4)",
                        peft.label()
                    ),
                ));
                bar_figs.push((stem, panels));
            }

            // Figure 1: datasets side by side per model × method (× preference).
            let variants = Ctx::variants(&main);
            if variants.len() > 1 {
                // Collections compared per preference, as in Figure 1, when there are several.
                let mut sources: Vec<&Option<String>> = variants
                    .iter()
                    .map(|(d, _)| &cx.spec.datasets[*d].source)
                    .collect();
                sources.sort();
                sources.dedup();
                let sourced = sources.len() > 1
                    && variants.iter().all(|(d, _)| {
                        let d = &cx.spec.datasets[*d];
                        d.source.is_some() && d.preference.is_some()
                    });
                let mut series: Vec<String> = vec![];
                let mut series_of = vec![];
                for &(d, n) in &variants {
                    let ds = &cx.spec.datasets[d];
                    let label = if sourced {
                        ds.source.clone().expect("checked")
                    } else {
                        cx.ds_label(&RunKey {
                            model: 0,
                            dataset: d,
                            num_samples: n,
                            method: Method::Sft,
                            peft,
                        })
                    };
                    let si = series.iter().position(|x| *x == label).unwrap_or_else(|| {
                        series.push(label);
                        series.len() - 1
                    });
                    series_of.push(si);
                }
                let prefs: Vec<Option<String>> = if sourced {
                    let mut p: Vec<Option<String>> = vec![];
                    for (d, _) in &variants {
                        let x = cx.spec.datasets[*d].preference.clone();
                        if !p.contains(&x) {
                            p.push(x);
                        }
                    }
                    p
                } else {
                    vec![None]
                };
                let mut groups = vec![];
                let mut gkeys = vec![];
                for m in Ctx::models_of(&main) {
                    for pref in &prefs {
                        for &method in &methods {
                            let line2 = match pref {
                                Some(p) => format!("{p} {}", method.label()),
                                None => method.label().to_string(),
                            };
                            groups.push(format!("{}\n{line2}", cx.model_label(m)));
                            gkeys.push((m, pref.clone(), method));
                        }
                    }
                }
                let panels = bar_panels(&cx, &evals, &groups, &series, 2, |g, s, e| {
                    let (m, pref, method) = &gkeys[g];
                    // The variant of series `s` with this group's preference.
                    variants
                        .iter()
                        .zip(&series_of)
                        .find(|((d, _), si)| {
                            **si == s
                                && (pref.is_none() || cx.spec.datasets[*d].preference == *pref)
                        })
                        .and_then(|(&(d, n), _)| {
                            cx.get(
                                Target::Run(RunKey {
                                    model: *m,
                                    dataset: d,
                                    num_samples: n,
                                    method: *method,
                                    peft,
                                }),
                                e,
                            )
                        })
                });
                if !panels.is_empty() {
                    let stem = format!("fig-datasets-{}", peft.name());
                    figures.push((
                        stem.clone(),
                        format!("Alignment datasets compared, {} (Figure 1)", peft.label()),
                    ));
                    bar_figs.push((stem, panels));
                }
            }
        }

        // Figure 3: results against the number of training samples.
        if all.iter().any(|r| r.num_samples.is_some()) {
            let (t, ns) = samples_table(&cx, peft, &all);
            let evals = cx.evals_with(
                |t| matches!(t, Target::Run(r) if r.peft == peft && r.num_samples.is_some()),
            );
            let panels: Vec<Panel> = evals
                .iter()
                .map(|&e| {
                    let ei = evals.iter().position(|x| *x == e).expect("listed");
                    Panel {
                        title: cx.spec.evals[e].label.clone(),
                        x_label: "samples".into(),
                        series: t
                            .rows
                            .iter()
                            .enumerate()
                            .map(|(k, (heads, vals))| Series {
                                label: heads.join(" "),
                                color: color(k),
                                points: ns
                                    .iter()
                                    .enumerate()
                                    .filter_map(|(j, &n)| {
                                        vals[ei * ns.len() + j].map(|s| (n as f64, s.mean))
                                    })
                                    .collect(),
                            })
                            .filter(|s| !s.points.is_empty())
                            .collect(),
                    }
                })
                .filter(|p| !p.series.is_empty())
                .collect();
            tables.push(t);
            if !panels.is_empty() {
                let stem = format!("fig-samples-{}", peft.name());
                figures.push((
                    stem.clone(),
                    format!("Results by number of samples, {} (Figure 3)", peft.label()),
                ));
                line_figs.push((stem, panels));
            }
        }
    }

    // Figure 6: LoRA against QLoRA for the same model, dataset and method.
    let pefts = cx.pefts();
    if pefts.len() > 1 {
        let evals = cx.evals_with(|t| matches!(t, Target::Run(_)));
        let mut keys: Vec<RunKey> = vec![];
        for r in &cx.runs {
            let k = RunKey {
                peft: Peft::Qlora,
                ..*r
            };
            if r.num_samples.is_none()
                && !keys.contains(&k)
                && pefts
                    .iter()
                    .filter(|p| cx.runs.contains(&RunKey { peft: **p, ..k }))
                    .count()
                    > 1
            {
                keys.push(k);
            }
        }
        keys.sort();
        let groups: Vec<String> = keys
            .iter()
            .map(|k| {
                format!(
                    "{}\n{} {}",
                    cx.model_label(k.model),
                    cx.ds_short(k),
                    k.method.label()
                )
            })
            .collect();
        let series: Vec<String> = pefts.iter().map(|p| p.label().to_string()).collect();
        let panels = bar_panels(&cx, &evals, &groups, &series, 2, |g, s, e| {
            cx.get(
                Target::Run(RunKey {
                    peft: pefts[s],
                    ..keys[g]
                }),
                e,
            )
        });
        if !panels.is_empty() {
            figures.push((
                "fig-peft".into(),
                "QLoRA and LoRA compared (Figure 6)".into(),
            ));
            bar_figs.push(("fig-peft".into(), panels));
        }
    }

    if !spec.merges.is_empty() {
        let t = merges_table(&cx);
        let evals = cx.evals_with(|t| matches!(t, Target::Merge(..)));
        let mut models: Vec<usize> = spec.merges.iter().flat_map(|m| m.models.clone()).collect();
        models.sort();
        models.dedup();
        let groups: Vec<String> = models
            .iter()
            .map(|&m| cx.model_label(m).to_string())
            .collect();
        let series: Vec<String> = t.rows.iter().map(|(h, _)| h.join(" ")).collect();
        let inputs = merge_inputs(spec);
        let panels = bar_panels(&cx, &evals, &groups, &series, 1, |g, s, e| {
            let m = models[g];
            if s < inputs.len() {
                cx.get(
                    Target::Run(RunKey {
                        model: m,
                        ..inputs[s]
                    }),
                    e,
                )
            } else {
                cx.get(Target::Merge(m, s - inputs.len()), e)
            }
        });
        tables.push(t);
        if !panels.is_empty() {
            figures.push(("fig-merges".into(), "Merged models (Table 3)".into()));
            bar_figs.push(("fig-merges".into(), panels));
        }
    }

    for t in &tables {
        if !t.has_values() {
            continue;
        }
        put(&format!("{}.csv", t.name), t.csv().as_bytes())?;
        let m = t.markdown();
        put(&format!("{}.md", t.name), m.as_bytes())?;
        md += &m;
    }
    for (stem, panels) in &bar_figs {
        plot::write_bars(&dir.join(stem), panels)?;
        written.push(dir.join(format!("{stem}.png")));
        written.push(dir.join(format!("{stem}.svg")));
    }
    for (stem, panels) in &line_figs {
        plot::write(&dir.join(stem), panels)?;
        written.push(dir.join(format!("{stem}.png")));
        written.push(dir.join(format!("{stem}.svg")));
    }
    for (stem, caption) in &figures {
        md += &format!("### {caption}\n\n![{caption}]({stem}.png)\n\n");
    }
    let p = dir.join("report.md");
    crate::fsio::write_bytes_atomic(&p, md.as_bytes())?;
    written.push(p);
    Ok(written)
}

/// One row per target and evaluation (and training metric), seeds aggregated.
fn results_csv(cx: &Ctx) -> String {
    let spec = cx.spec;
    let mut s = String::from(
        "target,kind,model,dataset,num_samples,method,peft,merge,eval,task,metric,mean,std,n\n",
    );
    let row = |t: &Target, eval: &str, task: &str, metric: &str, st: Stat| -> String {
        let (kind, model, ds, ns, method, peft, merge) = match *t {
            Target::Base(m) => ("base", m, "", None, "", "", ""),
            Target::Run(r) => (
                "run",
                r.model,
                spec.datasets[r.dataset].name.as_str(),
                r.num_samples,
                r.method.name(),
                r.peft.name(),
                "",
            ),
            Target::Merge(m, k) => ("merge", m, "", None, "", "", spec.merges[k].name.as_str()),
        };
        let id = super::cells::target_id(spec, t, None);
        // The target without its seed: drop the trailing `/seed0` of target_id.
        let id = id.strip_suffix("/seed0").unwrap_or(&id);
        [
            csv_field(id),
            kind.into(),
            csv_field(&spec.models[model].name),
            csv_field(ds),
            ns.map(|n| n.to_string()).unwrap_or_default(),
            method.into(),
            peft.into(),
            csv_field(merge),
            csv_field(eval),
            csv_field(task),
            csv_field(metric),
            csv_num(Some(st.mean)),
            csv_num(st.std),
            st.n.to_string(),
        ]
        .join(",")
            + "\n"
    };
    for ((t, e), vals) in &cx.col.evals {
        if let Some(st) = stat(vals) {
            let ed = &spec.evals[*e];
            let metric = cx.col.metric.get(e).map_or("value", String::as_str);
            s += &row(t, &ed.name, &ed.task, metric, st);
        }
    }
    for (r, vals) in &cx.col.train_loss {
        if let Some(st) = stat(vals) {
            s += &row(&Target::Run(*r), "train_loss", "train", "loss", st);
        }
    }
    for (r, vals) in &cx.col.train_acc {
        if let Some(st) = stat(vals) {
            s += &row(
                &Target::Run(*r),
                "train_reward_acc",
                "train",
                "rewards/accuracies",
                st,
            );
        }
    }
    s
}
