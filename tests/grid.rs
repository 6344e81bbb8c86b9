//! `palign grid`: spec expansion, run/status/report on small grids, retries, failures,
//! kill -9 of the whole grid (on examples/tiny-grid.toml) and Slurm scripts.

mod common;

use common::{fx, s};
use palign::grid::cells::{self, Kind};
use palign::grid::spec::Spec;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn palign(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> Output {
    let o = palign(args);
    assert!(
        o.status.success(),
        "palign {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// A small grid over the repository's fixtures, written into `dir` (paths relative to it).
fn small_spec(dir: &Path, steps: u32) -> PathBuf {
    let f = fx();
    let text = format!(
        r#"
[grid]
seeds = [1, 2]

[models.tiny]
path = "init-tiny:llama"
template = "vicuna"
label = "Tiny"

[datasets.harmless]
data = "pku-saferlhf:{pku}:harmless"
source = "BT"
preference = "Harmless"

[datasets.helpful]
data = "pku-saferlhf:{pku}:helpful"
source = "BT"
preference = "Helpful"

[methods.sft]
steps = {steps}
batch_size = 2
max_length = 96
max_prompt_length = 48

[methods.dpo]
steps = {steps}
batch_size = 2
max_length = 96
max_prompt_length = 48

[[train]]
models = ["tiny"]
datasets = ["harmless", "helpful"]
methods = ["sft", "dpo"]

[[merge]]
name = "lin"
method = "linear"
models = ["tiny"]
runs = ["harmless/sft/qlora", "helpful/sft/qlora"]

[evals.mmlu]
label = "MMLU"
data = "{mmlu}"
args = {{ shots = 0, limit = 2 }}
"#,
        pku = s(&f.join("datasets/pku-saferlhf/train.jsonl.xz")),
        mmlu = s(&f.join("eval/mmlu")),
    );
    let p = dir.join("grid.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn tiny_grid() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-grid.toml")
}

#[test]
fn expansion_ids_dependencies_and_commands() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("evaldata")).unwrap();
    let text = r#"
[grid]
seeds = [3, 4]
save_every = 7

[models.m]
path = "init-tiny:mistral:5"
template = "mistral"

[models.big]
path = "weights/big"

[datasets.a]
data = ["jsonl:data/a.jsonl", "pku-saferlhf:data/pku:helpful"]
num_samples = 9

[methods.sft]
steps = 2
targets = ["q_proj", "v_proj"]
no_shuffle = true

[methods.dpo]
beta = 0.2

[methods.sft-dpo]
lr = 1e-5

[[train]]
models = ["m"]
datasets = ["a"]
methods = ["sft-dpo", "dpo"]

[[train]]
models = ["m"]
datasets = ["a"]
methods = ["sft"]
num_samples = [4]
seeds = [3]

[[merge]]
name = "s"
method = "slerp"
t = 0.3
models = ["m"]
runs = ["a/sft/qlora", "a/dpo/qlora"]

[evals.e]
task = "bbh"
data = "evaldata"
args = { max_new_tokens = 5, no_cot = true }
on = ["runs", "merges"]
"#;
    let p = d.path().join("g.toml");
    std::fs::write(&p, text).unwrap();
    let spec = Spec::load(&p).unwrap();
    let cells = cells::expand(&spec).unwrap();
    let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
    let pos = |id: &str| {
        ids.iter()
            .position(|x| *x == id)
            .unwrap_or_else(|| panic!("{id} not in {ids:?}"))
    };
    // The chain brings its SFT cell even though no block lists sft for `a` without samples.
    let sft = pos("train/m/a/sft/qlora/seed3");
    let chain = pos("train/m/a/sft-dpo/qlora/seed3");
    let dpo = pos("train/m/a/dpo/qlora/seed4");
    let nsft = pos("train/m/a.n4/sft/qlora/seed3");
    let model = pos("model/m");
    let merge = pos("merge/m/s/seed4");
    let ev = pos("eval/e/train/m/a/sft-dpo/qlora/seed4");
    pos("eval/e/merge/m/s/seed3");
    assert!(
        !ids.iter().any(|i| i.starts_with("eval/e/base/")),
        "on = runs, merges"
    );
    assert!(
        !ids.iter().any(|i| i.contains("/big")),
        "an unused model gets no cells"
    );
    // 2 seeds × (sft, sft-dpo, dpo) + 1 sample variant; 2 merges; evals of all of them.
    assert_eq!(cells.iter().filter(|c| c.kind == Kind::Train).count(), 7);
    assert_eq!(cells.iter().filter(|c| c.kind == Kind::Merge).count(), 2);
    assert_eq!(cells.iter().filter(|c| c.kind == Kind::Eval).count(), 9);
    for (i, c) in cells.iter().enumerate() {
        assert!(
            c.deps.iter().all(|&d| d < i),
            "{} depends on a later cell",
            c.id
        );
    }
    assert!(cells[chain].deps.contains(&sft) && cells[chain].deps.contains(&model));
    assert!(cells[merge]
        .deps
        .contains(&pos("train/m/a/sft/qlora/seed4")));
    assert!(cells[merge].deps.contains(&dpo));
    assert!(cells[ev]
        .deps
        .contains(&pos("train/m/a/sft-dpo/qlora/seed4")));

    let args = |i: usize| cells[i].args.join(" ");
    assert_eq!(
        cells[model].args,
        [
            "init-tiny",
            "--arch",
            "mistral",
            "--out",
            "model/m/out",
            "--seed",
            "5"
        ]
    );
    let a = args(chain);
    let dir = std::fs::canonicalize(d.path()).unwrap();
    let data_a = format!("--data jsonl:{}/data/a.jsonl", dir.display());
    let data_b = format!("--data pku-saferlhf:{}/data/pku:helpful", dir.display());
    for want in [
        "dpo --model model/m/out ",
        data_a.as_str(),
        data_b.as_str(),
        "--out train/m/a/sft-dpo/qlora/seed3/out",
        "--peft qlora --template mistral --seed 3 --data-seed 3",
        "--num-samples 9",
        "--save-every 7",
        "--beta 0.2",
        "--lr 0.00001",
        "--init-adapter train/m/a/sft/qlora/seed3/out --resume",
    ] {
        assert!(a.contains(want), "`{want}` not in `{a}`");
    }
    assert!(
        !args(dpo).contains("--lr"),
        "sft-dpo flags stay on the chain"
    );
    let a = args(nsft);
    assert!(
        a.contains("--num-samples 4") && !a.contains("--num-samples 9"),
        "{a}"
    );
    assert!(
        a.contains("--targets q_proj,v_proj") && a.contains("--no-shuffle"),
        "{a}"
    );
    let a = args(ev);
    assert!(
        a.starts_with(
            "eval bbh --model model/m/out --adapter train/m/a/sft-dpo/qlora/seed4/out --quant nf4"
        ),
        "{a}"
    );
    assert!(
        a.contains(&format!("--data {}/evaldata", dir.display())),
        "{a}"
    );
    assert!(a.contains("--max-new-tokens 5 --no-cot"), "{a}");
    let (name, yaml) = &cells[merge].files[0];
    assert_eq!(name, "merge.yaml");
    assert_eq!(
        yaml,
        "merge_method: slerp\n\
         base_model: \"model/m/out+train/m/a/sft/qlora/seed4/out\"\n\
         models:\n  - model: \"model/m/out+train/m/a/sft/qlora/seed4/out\"\n  \
         - model: \"model/m/out+train/m/a/dpo/qlora/seed4/out\"\n\
         parameters: {t: 0.3}\n"
    );
    // The whole study expands (placeholder paths are not opened).
    let paper = Spec::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/paper-grid.toml"))
        .unwrap();
    let pc = cells::expand(&paper).unwrap();
    let count = |k: Kind| pc.iter().filter(|c| c.kind == k).count();
    // Table 4: 4 models × 4 datasets × 2 methods; Table 5: 4 × 2 × 2 (LoRA); Table 2: 2 × 1 × 2;
    // Figure 3: 2 × 2 × 2 × 5 sample counts; SFT→DPO: 2 × 2; all × 5 seeds.
    assert_eq!(count(Kind::Train), (32 + 16 + 4 + 40 + 4) * 5);
    assert_eq!(count(Kind::Merge), 5 * 2 * 5);
    assert_eq!(
        count(Kind::Eval),
        5 * (count(Kind::Train) + count(Kind::Merge) + 4)
    );
}

#[test]
fn spec_errors_name_the_field() {
    let d = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(small_spec(d.path(), 2)).unwrap();
    let cases: [(&str, &str, &str); 9] = [
        (
            "[models.tiny]",
            "[models.tiny]\npth = \"x\"",
            "models.tiny: unknown key `pth`",
        ),
        (
            "models = [\"tiny\"]\ndatasets",
            "models = [\"nope\"]\ndatasets",
            "no model `nope`",
        ),
        (
            "batch_size = 2\nmax_length = 96\nmax_prompt_length = 48\n\n[methods.dpo]",
            "model = \"x\"\n[methods.dpo]",
            "methods.sft.model: the grid sets --model itself",
        ),
        (
            "batch_size = 2\nmax_length = 96\nmax_prompt_length = 48\n\n[methods.dpo]",
            "lr_x = 1\n[methods.dpo]",
            "methods.sft.lr_x: `palign sft` has no flag --lr-x",
        ),
        (
            "batch_size = 2\nmax_length = 96\nmax_prompt_length = 48\n\n[methods.dpo]",
            "batch_size = \"many\"\n[methods.dpo]",
            "invalid value 'many'",
        ),
        (
            "runs = [\"harmless/sft/qlora\", \"helpful/sft/qlora\"]",
            "runs = [\"harmless/sft/lora\"]",
            "run train/tiny/harmless/sft/lora/seed1 is not in any [[train]] block",
        ),
        (
            "method = \"linear\"",
            "method = \"slerp\"\nt = 0.5\nweights = 1",
            "slerp takes `t`",
        ),
        (
            "[evals.mmlu]",
            "[evals.mmlu]\ntask = \"gsm8k\"",
            "unknown task `gsm8k`",
        ),
        (
            "seeds = [1, 2]",
            "seeds = []",
            "grid.seeds: the list is empty",
        ),
    ];
    for (from, to, want) in cases {
        assert!(base.contains(from), "{from}");
        let p = d.path().join("bad.toml");
        std::fs::write(&p, base.replacen(from, to, 1)).unwrap();
        let o = palign(&["grid", "status", s(&p), "--out", s(&d.path().join("o"))]);
        assert_eq!(o.status.code(), Some(2), "{to}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(want), "{to}: `{e}` lacks `{want}`");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    }
    let p = d.path().join("bad.toml");
    std::fs::write(&p, "[models\n").unwrap();
    let o = palign(&["grid", "run", s(&p), "--out", s(&d.path().join("o"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not valid TOML"), "{}", stderr(&o));
}

/// Every file under `dir` with its size and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(p);
            } else {
                m.insert(p, (md.len(), md.modified().unwrap()));
            }
        }
    }
    m
}

fn status_rows(spec: &Path, out: &Path) -> Vec<Value> {
    let o = ok(&["grid", "status", s(spec), "--out", s(out), "--json"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn small_grid_runs_reports_and_skips_what_is_done() {
    let d = tempfile::tempdir().unwrap();
    let spec = small_spec(d.path(), 3);
    let out = d.path().join("out");
    let o = ok(&["grid", "run", s(&spec), "--out", s(&out), "--jobs", "2"]);
    assert!(stderr(&o).contains("0 failed, 0 skipped"), "{}", stderr(&o));
    let rows = status_rows(&spec, &out);
    // model, 2 datasets × 2 methods × 2 seeds, 2 merges, mmlu on base + 8 runs + 2 merges.
    assert_eq!(rows.len(), 1 + 8 + 2 + 11);
    assert!(rows.iter().all(|r| r["state"] == "done"), "{rows:?}");
    let mmlu_run = rows
        .iter()
        .find(|r| r["id"] == "eval/mmlu/train/tiny/harmless/dpo/qlora/seed1")
        .unwrap();
    assert!(mmlu_run["metric"]
        .as_str()
        .unwrap()
        .starts_with("accuracy "));
    let train = rows
        .iter()
        .find(|r| r["id"] == "train/tiny/helpful/dpo/qlora/seed2")
        .unwrap();
    assert!(
        train["metric"].as_str().unwrap().contains(" acc "),
        "{train}"
    );

    // The cell record: the command, its dependencies, done.
    let rec = read_json(&out.join("train/tiny/helpful/dpo/qlora/seed2/run.json"));
    assert_eq!(rec["state"], "done");
    assert_eq!(rec["deps"], serde_json::json!(["model/tiny"]));
    assert_eq!(rec["args"][0], "dpo");

    // results.csv: mean and sample std over the two seeds, from the cells' results.json.
    let val = |seed: u32| {
        read_json(&out.join(format!(
            "eval/mmlu/train/tiny/harmless/sft/qlora/seed{seed}/out/results.json"
        )))["value"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (val(1), val(2));
    let mean = (a + b) / 2.0;
    let std = ((a - mean).powi(2) + (b - mean).powi(2)).sqrt(); // n - 1 = 1
    let csv = std::fs::read_to_string(out.join("report/results.csv")).unwrap();
    let line = csv
        .lines()
        .find(|l| l.starts_with("train/tiny/harmless/sft/qlora,run,") && l.contains(",mmlu,"))
        .unwrap_or_else(|| panic!("no row in {csv}"));
    let f: Vec<&str> = line.split(',').collect();
    assert!((f[11].parse::<f64>().unwrap() - mean).abs() < 1e-6);
    assert!((f[12].parse::<f64>().unwrap() - std).abs() < 1e-6);
    assert_eq!(f[13], "2");
    let md = std::fs::read_to_string(out.join("report/by-benchmark-qlora.md")).unwrap();
    assert!(md.contains("| BT | Tiny-Harmless |"), "{md}");
    assert!(md.contains("MMLU SFT | MMLU DPO"), "{md}");
    let merges = std::fs::read_to_string(out.join("report/merges.md")).unwrap();
    assert!(
        merges.contains("| lin |") && merges.contains("| Harmless-SFT |"),
        "{merges}"
    );
    for fig in ["fig-methods-qlora.png", "fig-merges.png"] {
        let bytes = std::fs::read(out.join("report").join(fig)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{fig}");
    }

    // A rerun runs nothing and touches no finished output.
    let before = snapshot(&out.join("train"));
    let o = ok(&["grid", "run", s(&spec), "--out", s(&out), "--no-report"]);
    assert!(
        stderr(&o).contains("22 already done, 0 ran"),
        "{}",
        stderr(&o)
    );
    assert_eq!(before, snapshot(&out.join("train")));

    // A changed spec is refused for finished cells rather than mixing settings.
    let changed = small_spec(d.path(), 4);
    let o = palign(&["grid", "run", s(&changed), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("train/tiny/harmless/sft/qlora/seed1 (command was `… --steps 3 …`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn failed_cell_is_retried_reported_and_blocks_its_dependents() {
    let d = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[models.tiny]
path = "init-tiny:llama"

[datasets.gone]
data = "jsonl:missing.jsonl"

[datasets.ok]
data = "jsonl:{pref}"

[methods.sft]
steps = 2
batch_size = 2

[[train]]
models = ["tiny"]
datasets = ["gone", "ok"]
methods = ["sft"]

[evals.mmlu]
data = "{mmlu}"
args = {{ shots = 0, limit = 1 }}
on = ["runs"]
"#,
        pref = s(&fx().join("datasets/jsonl/pref_text.jsonl")),
        mmlu = s(&fx().join("eval/mmlu")),
    );
    let spec = d.path().join("g.toml");
    std::fs::write(&spec, text).unwrap();
    let out = d.path().join("out");
    // A missing file fails the whole run when the spec loads (`run_checks_inputs_before_any_cell`);
    // one that exists but is not JSONL fails its cell only.
    std::fs::write(d.path().join("missing.jsonl"), "{oops\n").unwrap();
    let o = palign(&["grid", "run", s(&spec), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("1 failed, 1 skipped"), "{e}");
    assert!(
        e.contains("skipped eval/mmlu/train/tiny/gone/sft/qlora/seed0: dependency train/tiny/gone/sft/qlora/seed0 failed"),
        "{e}"
    );
    let cell = out.join("train/tiny/gone/sft/qlora/seed0");
    let log = std::fs::read_to_string(cell.join("log.txt")).unwrap();
    assert!(
        log.contains("== attempt 1") && log.contains("== attempt 2"),
        "{log}"
    );
    let rec = read_json(&cell.join("run.json"));
    assert_eq!(rec["state"], "failed");
    assert_eq!(rec["attempt"], 2);
    assert!(
        rec["error"].as_str().unwrap().contains("missing.jsonl"),
        "{rec}"
    );
    let rows = status_rows(&spec, &out);
    let state = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap()["state"].clone();
    assert_eq!(state("train/tiny/gone/sft/qlora/seed0"), "failed");
    assert_eq!(
        state("eval/mmlu/train/tiny/gone/sft/qlora/seed0"),
        "blocked"
    );
    assert_eq!(state("eval/mmlu/train/tiny/ok/sft/qlora/seed0"), "done");

    // Fix the data: the rerun runs exactly the failed cell and its dependent.
    std::fs::copy(
        fx().join("datasets/jsonl/pref_text.jsonl"),
        d.path().join("missing.jsonl"),
    )
    .unwrap();
    let o = ok(&["grid", "run", s(&spec), "--out", s(&out)]);
    assert!(
        stderr(&o).contains("3 already done, 2 ran"),
        "{}",
        stderr(&o)
    );
}

/// Waits until `f` holds, panicking after `secs`.
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn killed_command_is_retried_and_resumes_to_the_same_adapter() {
    let d = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[grid]
save_every = 4

[models.tiny]
path = "init-tiny:llama"

[datasets.bt]
data = "pku-saferlhf:{pku}:helpful"

[methods.dpo]
steps = 120
batch_size = 2

[[train]]
models = ["tiny"]
datasets = ["bt"]
methods = ["dpo"]
"#,
        pku = s(&fx().join("datasets/pku-saferlhf/train.jsonl.xz")),
    );
    let spec = d.path().join("g.toml");
    std::fs::write(&spec, text).unwrap();
    let out = d.path().join("out");
    let grid = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(["grid", "run", s(&spec), "--out", s(&out), "--threads", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cell = out.join("train/tiny/bt/dpo/qlora/seed0");
    // Kill the training process itself once it has checkpointed and moved on.
    wait_for(120, "10 training steps", || {
        std::fs::read_to_string(cell.join("out/metrics.jsonl"))
            .map(|t| t.lines().count() >= 10)
            .unwrap_or(false)
    });
    let rows = status_rows(&spec, &out);
    let train = rows.iter().find(|r| r["kind"] == "train").unwrap();
    assert_eq!(train["state"], "running", "{train}");
    assert!(
        train["metric"].as_str().unwrap().contains(" step "),
        "{train}"
    );
    let lock: Value =
        serde_json::from_str(&std::fs::read_to_string(cell.join(".lock")).unwrap()).unwrap();
    let child = lock["child"]
        .as_u64()
        .expect("the lock names the running command");
    let k = Command::new("kill")
        .args(["-9", &child.to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let o = grid.wait_with_output().unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("failed (killed by signal 9); retrying"), "{e}");
    assert!(e.contains("done in") && e.contains("after a retry"), "{e}");
    let rec = read_json(&cell.join("run.json"));
    assert_eq!(
        (rec["state"].as_str(), rec["attempt"].as_u64()),
        (Some("done"), Some(2))
    );
    let steps: Vec<u64> = std::fs::read_to_string(cell.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=120).collect::<Vec<_>>(),
        "resumed rows replace the lost ones"
    );

    // The same command run straight through gives the same adapter.
    let args: Vec<String> = rec["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap()
                .replace("train/tiny/bt/dpo/qlora/seed0/out", "straight")
        })
        .collect();
    let st = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(&args)
        .args(["--threads", "1", "--quiet"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", stderr(&st));
    assert_eq!(
        std::fs::read(out.join("straight/adapter_model.safetensors")).unwrap(),
        std::fs::read(cell.join("out/adapter_model.safetensors")).unwrap()
    );
}

/// Every result of a grid folder: eval values, adapter and merged-weight hashes.
fn results(out: &Path) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut m = BTreeMap::new();
    for (p, _) in snapshot(out) {
        let rel = p.strip_prefix(out).unwrap().display().to_string();
        if rel.contains("/checkpoint/") || !rel.contains("/out/") {
            continue;
        }
        if rel.ends_with("results.json") {
            let v = read_json(&p);
            m.insert(rel, format!("{} {}", v["value"], v["n"]));
        } else if rel.ends_with(".safetensors") {
            let h = sha2::Sha256::digest(std::fs::read(&p).unwrap());
            m.insert(rel, format!("{h:x}"));
        }
    }
    m
}

/// The number of cells whose command finished, by their markers.
fn done_count(spec: &Path, out: &Path) -> usize {
    let (_, cells) = palign::grid::load(spec).unwrap();
    cells
        .iter()
        .filter(|c| palign::grid::state::marker_done(out, c))
        .count()
}

#[test]
fn tiny_grid_killed_twice_then_rerun_equals_an_uninterrupted_run() {
    let spec = tiny_grid();
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let t0 = Instant::now();
    let o = ok(&[
        "grid",
        "run",
        s(&spec),
        "--out",
        s(&a),
        "--jobs",
        "2",
        "--threads",
        "1",
    ]);
    let uninterrupted = t0.elapsed();
    eprintln!(
        "tiny grid, uninterrupted: {:.1}s",
        uninterrupted.as_secs_f64()
    );
    assert!(stderr(&o).contains("0 failed, 0 skipped"), "{}", stderr(&o));
    let total = palign::grid::load(&spec).unwrap().1.len();
    assert_eq!(done_count(&spec, &a), total);

    // kill -9 once while training runs (few cells done), once among the evaluations,
    // restarting the grid in between; then let it finish.
    let (_, cells) = palign::grid::load(&spec).unwrap();
    let mut kept = BTreeMap::new();
    for at in [20, total * 2 / 3] {
        let mut grid = Command::new(env!("CARGO_BIN_EXE_palign"))
            .env("PALIGN_DEVICE", "cpu")
            .args([
                "grid",
                "run",
                s(&spec),
                "--out",
                s(&b),
                "--jobs",
                "2",
                "--threads",
                "1",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(600, "cells to finish", || done_count(&spec, &b) >= at);
        grid.kill().unwrap();
        grid.wait().unwrap();
        // The commands that were running, from their cells' locks, die with the grid and
        // leave no cell locked.
        let children: Vec<u32> = cells
            .iter()
            .filter_map(|c| std::fs::read_to_string(b.join(&c.id).join(".lock")).ok())
            .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
            .filter_map(|v| v["child"].as_u64())
            .map(|p| p as u32)
            .collect();
        wait_for(10, "the commands to die", || {
            children.iter().all(|&p| !palign::grid::state::alive(p))
        });
        let rows = status_rows(&spec, &b);
        assert!(
            rows.iter().all(|r| r["state"] != "running"),
            "a cell still looks running"
        );
        let done = done_count(&spec, &b);
        assert!(done >= at && done < total, "{done} of {total} done");
        // What is finished now must come out of the reruns untouched.
        for c in &cells {
            if palign::grid::state::marker_done(&b, c) {
                kept.extend(snapshot(&b.join(c.out())));
            }
        }
    }
    let done_before = done_count(&spec, &b);
    let o = ok(&[
        "grid",
        "run",
        s(&spec),
        "--out",
        s(&b),
        "--jobs",
        "2",
        "--threads",
        "1",
    ]);
    assert!(
        stderr(&o).contains(&format!("grid: {total} cells, {done_before} done")),
        "{}",
        stderr(&o)
    );
    let now = snapshot(&b);
    for (p, meta) in &kept {
        assert_eq!(now.get(p), Some(meta), "{} was rewritten", p.display());
    }
    assert_eq!(done_count(&spec, &b), total);
    let (ra, rb) = (results(&a), results(&b));
    assert!(ra.len() > 300, "{} results", ra.len());
    assert_eq!(ra, rb);
    assert_eq!(
        std::fs::read_to_string(a.join("report/results.csv")).unwrap(),
        std::fs::read_to_string(b.join("report/results.csv")).unwrap()
    );
}

#[test]
fn slurm_scripts_chain_stages_and_submit_through_sbatch() {
    let d = tempfile::tempdir().unwrap();
    let spec = small_spec(d.path(), 2);
    let mut text = std::fs::read_to_string(&spec).unwrap();
    text += "\n[slurm]\npartition = \"gpu\"\ntime = \"01:00:00\"\nsetup = [\"module load cuda\"]\n\n[slurm.eval]\ntime = \"00:20:00\"\n";
    std::fs::write(&spec, text).unwrap();
    let out = d.path().join("out");
    let o = ok(&[
        "grid",
        "slurm",
        s(&spec),
        "--out",
        s(&out),
        "--dry-run",
        "--gres",
        "gpu:1",
        "--partition",
        "big",
        "--max-parallel",
        "4",
    ]);
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(
        so.contains(
            "00-model (1), 01-train (8), 02-eval (1), 03-merge (2), 04-eval (8), 05-eval (2)"
        ),
        "{so}"
    );
    let dir = out.join("slurm");
    let read =
        |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
    assert_eq!(read("01-train.cells").lines().count(), 8);
    assert_eq!(read("00-model.cells"), "model/tiny\n");
    let train = read("01-train.sbatch");
    for want in [
        "#SBATCH --job-name=palign-01-train\n",
        "#SBATCH --array=0-7%4\n",
        "#SBATCH --partition=big\n",
        "#SBATCH --gres=gpu:1\n",
        "#SBATCH --time=01:00:00\n",
        "module load cuda\n",
        "grid run",
        "--cell \"$CELL\"",
    ] {
        assert!(train.contains(want), "`{want}` not in\n{train}");
    }
    assert!(read("04-eval.sbatch").contains("#SBATCH --time=00:20:00\n"));

    // A stand-in sbatch records its arguments and answers job ids 101, 102, ...
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let calls = d.path().join("calls.txt");
    let fake = format!(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo slurm-fake; exit 0; fi\n\
         echo \"$@\" >> {calls}\nn=$(wc -l < {calls})\necho \"$((100 + n));cluster\"\n",
        calls = common::s(&calls)
    );
    std::fs::write(bin.join("sbatch"), fake).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("sbatch"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let o = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(["grid", "slurm", s(&spec), "--out", s(&out)])
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let calls = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(
        lines,
        [
            "--parsable 00-model.sbatch",
            "--parsable --dependency=afterok:101 01-train.sbatch",
            "--parsable --dependency=afterok:101 02-eval.sbatch",
            "--parsable --dependency=afterok:102 03-merge.sbatch",
            "--parsable --dependency=afterok:102 04-eval.sbatch",
            "--parsable --dependency=afterok:104 05-eval.sbatch",
        ]
    );
    assert!(read("jobs.txt").contains("05-eval 106"));

    // Big stages are split into several arrays; finished cells are left out.
    let o = ok(&[
        "grid",
        "slurm",
        s(&spec),
        "--out",
        s(&out),
        "--dry-run",
        "--array-limit",
        "3",
    ]);
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(
        so.contains("01-train-1 (3), 01-train-2 (3), 01-train-3 (2)"),
        "{so}"
    );
    assert!(read("submit.sh")
        .contains("--dependency=afterok:$J01_train_1:$J01_train_2:$J01_train_3 03-merge.sbatch"));
    std::fs::create_dir_all(out.join("model/tiny")).unwrap();
    ok(&["init-tiny", "--out", s(&out.join("model/tiny/out"))]);
    let o = ok(&["grid", "slurm", s(&spec), "--out", s(&out), "--dry-run"]);
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(
        so.starts_with(
            "5 stages, 21 cells to run: 00-train (8), 01-eval (1), 02-merge (2), 03-eval (8), 04-eval (2)"
        ),
        "{so}"
    );
    assert!(
        !dir.join("00-model.sbatch").exists(),
        "a finished stage's script is removed"
    );
    assert!(!read("submit.sh").contains("model"));
}

#[test]
fn stat_is_mean_and_sample_std() {
    let st = palign::grid::report::stat(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(st.mean, 2.5);
    assert!((st.std.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    let one = palign::grid::report::stat(&[7.0]).unwrap();
    assert_eq!((one.mean, one.std, one.n), (7.0, None, 1));
    assert!(palign::grid::report::stat(&[]).is_none());
}

/// A DPO cell finished before `--keep-dropout` existed trained with its dropout; DPO now
/// trains without (as TRL). A spec that does not ask for `keep_dropout` is refused for
/// that cell, one that does accepts it as done.
#[test]
fn dpo_cells_from_before_keep_dropout_need_it_in_the_spec() {
    let d = tempfile::tempdir().unwrap();
    let spec = |keep: bool| {
        let text = format!(
            r#"
[models.tiny]
path = "init-tiny:llama"

[datasets.helpful]
data = "pku-saferlhf:{pku}:helpful"

[methods.dpo]
steps = 1
batch_size = 2
max_length = 64
max_prompt_length = 32
{keep}
[[train]]
models = ["tiny"]
datasets = ["helpful"]
methods = ["dpo"]
"#,
            pku = s(&fx().join("datasets/pku-saferlhf/train.jsonl.xz")),
            keep = if keep { "keep_dropout = true\n" } else { "" },
        );
        let p = d.path().join(format!("grid-{keep}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let out = d.path().join("out");
    ok(&[
        "grid",
        "run",
        s(&spec(false)),
        "--out",
        s(&out),
        "--no-report",
    ]);
    // Make the finished cell look like one from before the flag.
    let runs: Vec<PathBuf> = glob_run_json(&out.join("train"));
    assert_eq!(runs.len(), 1, "{runs:?}");
    let mut v = read_json(&runs[0]);
    assert_eq!(v["settings"]["keep_dropout"], serde_json::json!(false));
    v["settings"]
        .as_object_mut()
        .unwrap()
        .remove("keep_dropout");
    std::fs::write(&runs[0], v.to_string()).unwrap();

    let o = palign(&[
        "grid",
        "run",
        s(&spec(false)),
        "--out",
        s(&out),
        "--no-report",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("set keep_dropout = true"),
        "{}",
        stderr(&o)
    );
    let o = ok(&[
        "grid",
        "run",
        s(&spec(true)),
        "--out",
        s(&out),
        "--no-report",
    ]);
    assert!(stderr(&o).contains("0 ran"), "{}", stderr(&o));
}

/// Every training run.json (`train/**/out/run.json`) under `dir`.
fn glob_run_json(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.ends_with("out/run.json") {
                found.push(path);
            }
        }
    }
    found
}

/// `grid run` checks the inputs of the cells it would run when it loads the spec: a missing
/// data file or model folder, a bad per-method flag value or a bad eval flag is exit 2
/// with one line naming the spec key, before any cell runs or --out is made.
#[test]
fn run_checks_inputs_before_any_cell() {
    let d = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(small_spec(d.path(), 2)).unwrap();
    let pku = s(&fx().join("datasets/pku-saferlhf/train.jsonl.xz")).to_string();
    let mmlu = s(&fx().join("eval/mmlu")).to_string();
    let cases: Vec<(String, String, &str)> = vec![
        (
            "steps = 2\nbatch_size".into(),
            "steps = 0\nbatch_size".into(),
            "methods.sft.steps: --steps must be at least 1",
        ),
        (
            "batch_size = 2\nmax_length = 96\nmax_prompt_length = 48\n\n[methods.dpo]".into(),
            "batch_size = 2\nlr = -1.0\nmax_length = 96\n[methods.dpo]".into(),
            "methods.sft.lr: --lr must be",
        ),
        (
            "[methods.dpo]\nsteps = 2".into(),
            "[methods.dpo]\nsteps = 2\nbeta = 0".into(),
            "methods.dpo.beta: --beta must be a positive number",
        ),
        (
            format!("data = \"pku-saferlhf:{pku}:harmless\""),
            "data = \"jsonl:../nonexist.jsonl\"".into(),
            "datasets.harmless.data: ",
        ),
        (
            "path = \"init-tiny:llama\"".into(),
            "path = \"no-such-model\"".into(),
            "models.tiny.path: ",
        ),
        (
            format!("data = \"{mmlu}\""),
            "data = \"no-such-mmlu\"".into(),
            "evals.mmlu.data: ",
        ),
        (
            "args = { shots = 0, limit = 2 }".into(),
            "args = { shots = 0, limit = 2, max_length = 0 }".into(),
            "evals.mmlu: --max-length must be at least 1",
        ),
        (
            "[methods.sft]\n".into(),
            "[methods.sft]\neval_data = \"jsonl:nope.jsonl\"\neval_every = 1\n".into(),
            "methods.sft.eval_data: ",
        ),
    ];
    for (from, to, want) in &cases {
        assert!(base.contains(from.as_str()), "{from}");
        let p = d.path().join("bad.toml");
        std::fs::write(&p, base.replacen(from.as_str(), to, 1)).unwrap();
        let out = d.path().join("o");
        let o = palign(&["grid", "run", s(&p), "--out", s(&out)]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{to}: {e}");
        assert!(e.contains(want), "{to}: `{e}` lacks `{want}`");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
        assert!(!out.exists(), "{to}: no cell ran, --out was not made");
    }
    // Only the cells to run are looked at: the model cell runs with the data missing.
    let p = d.path().join("bad.toml");
    let text = base.replacen(
        &format!("data = \"pku-saferlhf:{pku}:harmless\""),
        "data = \"jsonl:nonexist.jsonl\"",
        1,
    );
    std::fs::write(&p, text).unwrap();
    let out = d.path().join("o");
    ok(&[
        "grid",
        "run",
        s(&p),
        "--out",
        s(&out),
        "--cell",
        "model/tiny",
    ]);
    assert!(out.join("model/tiny/out/config.json").is_file());
}

/// Every grid subcommand checks --device and PALIGN_DEVICE before doing anything.
#[test]
fn grid_checks_the_device() {
    let d = tempfile::tempdir().unwrap();
    let spec = small_spec(d.path(), 2);
    let out = d.path().join("o");
    for sub in [
        &["run"][..],
        &["status"],
        &["report"],
        &["slurm", "--dry-run"],
    ] {
        let mut args = vec!["grid", sub[0], s(&spec), "--out", s(&out)];
        args.extend(&sub[1..]);
        args.extend(["--device", "bogus"]);
        let o = palign(&args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains("--device: unknown device `bogus`"), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
        assert!(!out.exists(), "{args:?} wrote nothing");
        let o = Command::new(env!("CARGO_BIN_EXE_palign"))
            .env("PALIGN_DEVICE", "bogus")
            .args(&args[..args.len() - 2])
            .output()
            .unwrap();
        let e = stderr(&o);
        assert_eq!(
            o.status.code(),
            Some(2),
            "PALIGN_DEVICE=bogus {args:?}: {e}"
        );
        assert!(e.contains("PALIGN_DEVICE: unknown device `bogus`"), "{e}");
        assert!(!out.exists());
    }
}

/// init-tiny and merge cells run on the CPU only: a grid run with --device cuda passes
/// them no device (they would refuse it), the other cells get it.
#[test]
fn cpu_only_cells_get_no_cuda_device() {
    use palign::grid::runner::cell_runtime;
    let rt: Vec<String> = ["--device", "cuda", "--threads", "2", "--quiet"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    assert_eq!(
        cell_runtime(Kind::Model, &rt),
        vec!["--threads", "2", "--quiet"]
    );
    assert_eq!(
        cell_runtime(Kind::Merge, &rt),
        vec!["--threads", "2", "--quiet"]
    );
    assert_eq!(cell_runtime(Kind::Train, &rt), rt);
    assert_eq!(cell_runtime(Kind::Eval, &rt), rt);
    let cpu: Vec<String> = ["--device", "cpu", "--quiet"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    assert_eq!(cell_runtime(Kind::Merge, &cpu), cpu);
}
