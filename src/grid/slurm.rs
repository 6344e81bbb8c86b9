//! `grid slurm`: the grid's unfinished cells as Slurm array jobs, one per stage (cells of
//! one kind at one dependency depth), one array task per cell running `palign grid run SPEC
//! --out DIR --cell ID`. `submit.sh` submits the stages in order with `sbatch --parsable`,
//! passing each the job ids of the stages its cells depend on (`--dependency=afterok:…`).
//! Progress shows with `grid status` on the shared output folder.

use super::cells::{Cell, Kind};
use super::spec::{SlurmSettings, Spec};
use super::state;
use crate::error::{bad, Error, Result};
use std::path::{Path, PathBuf};

/// A shell word in single quotes.
pub fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// One array job.
pub struct Stage {
    /// `NN-KIND`, also the file stem.
    pub name: String,
    pub kind: Kind,
    pub cells: Vec<usize>,
    /// Indices of the stages this one waits for.
    pub after: Vec<usize>,
}

/// The unfinished cells grouped into stages: a cell's depth is one more than its deepest
/// unfinished dependency, and a stage is the cells of one kind at one depth, split into
/// parts of at most `limit` cells (one array job each).
pub fn stages(out: &Path, cells: &[Cell], limit: usize) -> Vec<Stage> {
    let done: Vec<bool> = cells.iter().map(|c| state::marker_done(out, c)).collect();
    let mut depth = vec![0usize; cells.len()];
    for (i, c) in cells.iter().enumerate() {
        depth[i] = c
            .deps
            .iter()
            .filter(|&&d| !done[d])
            .map(|&d| depth[d] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut keys: Vec<(usize, Kind)> = (0..cells.len())
        .filter(|&i| !done[i])
        .map(|i| (depth[i], cells[i].kind))
        .collect();
    keys.sort();
    keys.dedup();
    let mut out_stages: Vec<Stage> = keys
        .iter()
        .enumerate()
        .map(|(k, &(_, kind))| Stage {
            name: format!("{k:02}-{}", kind.name()),
            kind,
            cells: vec![],
            after: vec![],
        })
        .collect();
    let mut stage_of = vec![usize::MAX; cells.len()];
    for i in 0..cells.len() {
        if done[i] {
            continue;
        }
        let s = keys
            .iter()
            .position(|&k| k == (depth[i], cells[i].kind))
            .expect("listed");
        stage_of[i] = s;
        out_stages[s].cells.push(i);
        for &d in &cells[i].deps {
            if !done[d] && !out_stages[s].after.contains(&stage_of[d]) {
                out_stages[s].after.push(stage_of[d]);
            }
        }
    }
    // Split stages bigger than an array job may be.
    let limit = limit.max(1);
    let mut parts_of: Vec<Vec<usize>> = vec![];
    let mut split: Vec<Stage> = vec![];
    for s in &out_stages {
        let chunks: Vec<&[usize]> = s.cells.chunks(limit).collect();
        let mut ids = vec![];
        for (p, ch) in chunks.iter().enumerate() {
            ids.push(split.len());
            split.push(Stage {
                name: if chunks.len() == 1 {
                    s.name.clone()
                } else {
                    format!("{}-{}", s.name, p + 1)
                },
                kind: s.kind,
                cells: ch.to_vec(),
                after: vec![],
            });
        }
        parts_of.push(ids);
    }
    // Wait only for stages not already waited for through another (a merge needs the model
    // stage, but its train stage waits for that already).
    let n = out_stages.len();
    let mut reach = vec![vec![false; n]; n]; // reach[a][b]: a waits for b, maybe indirectly
    for a in 0..n {
        // `after` only names earlier stages, so theirs are complete here.
        for &b in &out_stages[a].after.clone() {
            reach[a][b] = true;
            let via = reach[b].clone();
            for (c, r) in via.into_iter().enumerate() {
                reach[a][c] |= r;
            }
        }
    }
    for s in out_stages.iter_mut() {
        let direct = s.after.clone();
        s.after
            .retain(|&b| !direct.iter().any(|&o| o != b && reach[o][b]));
    }
    for (k, s) in out_stages.iter().enumerate() {
        let after: Vec<usize> = s.after.iter().flat_map(|&a| parts_of[a].clone()).collect();
        for &p in &parts_of[k] {
            split[p].after = after.clone();
            split[p].after.sort();
        }
    }
    split
}

/// Slurm's default MaxArraySize is 1001 (task ids 0..=1000).
pub const DEFAULT_ARRAY_LIMIT: u64 = 1000;

/// Settings for one stage: the spec's `[slurm]`, its `[slurm.KIND]`, then the command line.
pub fn settings_for(spec: &Spec, kind: Kind, cli: &SlurmSettings) -> SlurmSettings {
    let mut s = spec.slurm.base.clone();
    if let Some((_, k)) = spec.slurm.per_kind.iter().find(|(k, _)| k == kind.name()) {
        s = s.overlay(k);
    }
    s.overlay(cli)
}

/// The sbatch script of one stage.
pub fn script(
    stage: &Stage,
    s: &SlurmSettings,
    dir: &Path,
    spec_path: &Path,
    out: &Path,
    palign: &str,
    runtime: &[String],
) -> String {
    let n = stage.cells.len();
    let mut t = String::from("#!/bin/bash\n");
    t += &format!("#SBATCH --job-name=palign-{}\n", stage.name);
    t += &format!(
        "#SBATCH --array=0-{}{}\n",
        n - 1,
        s.max_parallel.map(|m| format!("%{m}")).unwrap_or_default()
    );
    t += &format!(
        "#SBATCH --output={}/logs/{}_%A_%a.out\n",
        dir.display(),
        stage.name
    );
    let opt = |t: &mut String, flag: &str, v: &Option<String>| {
        if let Some(v) = v {
            *t += &format!("#SBATCH --{flag}={v}\n");
        }
    };
    opt(&mut t, "partition", &s.partition);
    opt(&mut t, "account", &s.account);
    opt(&mut t, "qos", &s.qos);
    opt(&mut t, "gres", &s.gres);
    opt(&mut t, "time", &s.time);
    opt(
        &mut t,
        "cpus-per-task",
        &s.cpus_per_task.map(|c| c.to_string()),
    );
    opt(&mut t, "mem", &s.mem);
    for e in &s.extra {
        t += &format!("#SBATCH {e}\n");
    }
    t += &format!(
        "# palign grid stage {} ({} cells of kind {}); the cell of array task i is line i+1 of {}.cells\n",
        stage.name,
        n,
        stage.kind.name(),
        stage.name
    );
    t += "set -euo pipefail\n";
    for line in &s.setup {
        t += line;
        t += "\n";
    }
    t += &format!(
        "CELL=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {})\n",
        sh(&dir
            .join(format!("{}.cells", stage.name))
            .display()
            .to_string())
    );
    let mut cmd = format!(
        "exec {} grid run {} --out {} --cell \"$CELL\"",
        sh(palign),
        sh(&spec_path.display().to_string()),
        sh(&out.display().to_string())
    );
    for r in runtime {
        cmd += &format!(" {}", sh(r));
    }
    if s.cpus_per_task.is_some() && !runtime.iter().any(|r| r == "--threads") {
        cmd += " --threads \"$SLURM_CPUS_PER_TASK\"";
    }
    t + &cmd + "\n"
}

/// `submit.sh`: sbatch each stage in order, waiting on the job ids of the stages it needs.
pub fn submit_script(stages: &[Stage], deps: &[String]) -> String {
    let mut t = String::from(
        "#!/bin/bash\n# Submits the grid's stages in order; each waits for the stages its cells depend on.\n\
         set -euo pipefail\ncd \"$(dirname \"$0\")\"\n\
         jid() { local out; out=$(sbatch --parsable \"$@\"); echo \"${out%%;*}\"; }\n",
    );
    let var = |s: &Stage| format!("J{}", s.name.replace('-', "_"));
    for (k, s) in stages.iter().enumerate() {
        let dep = if s.after.is_empty() {
            String::new()
        } else {
            format!(
                "--dependency={}:{} ",
                deps[k],
                s.after
                    .iter()
                    .map(|&a| format!("${}", var(&stages[a])))
                    .collect::<Vec<_>>()
                    .join(":")
            )
        };
        t += &format!("{}=$(jid {dep}{}.sbatch)\n", var(s), s.name);
        t += &format!("echo \"{} ${}\" >> jobs.txt\n", s.name, var(s));
    }
    t += &format!(
        "echo \"submitted {} stages: {}\"\n",
        stages.len(),
        stages
            .iter()
            .map(|s| format!("{}=${}", s.name, var(s)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    t
}

/// Writes `OUT/slurm/`: per stage `NN-KIND.cells` and `NN-KIND.sbatch`, and `submit.sh`.
/// Returns the folder and the stages.
pub fn write(
    spec: &Spec,
    out: &Path,
    cells: &[Cell],
    cli: &SlurmSettings,
    runtime: &[String],
) -> Result<(PathBuf, Vec<Stage>)> {
    let dir = out.join("slurm");
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| Error::write(&dir, e))?;
    let limit = spec
        .slurm
        .base
        .overlay(cli)
        .array_limit
        .unwrap_or(DEFAULT_ARRAY_LIMIT);
    let st = stages(out, cells, limit as usize);
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "palign".into());
    let mut deps = vec![];
    for s in &st {
        let set = settings_for(spec, s.kind, cli);
        let palign = set.palign.clone().unwrap_or_else(|| exe.clone());
        let ids: String = s
            .cells
            .iter()
            .map(|&i| format!("{}\n", cells[i].id))
            .collect();
        crate::fsio::write_bytes_atomic(&dir.join(format!("{}.cells", s.name)), ids.as_bytes())?;
        let text = script(s, &set, &dir, &spec.path, out, &palign, runtime);
        crate::fsio::write_bytes_atomic(&dir.join(format!("{}.sbatch", s.name)), text.as_bytes())?;
        deps.push(set.dependency.clone().unwrap_or_else(|| "afterok".into()));
    }
    // Stale scripts of stages that are finished now would be submitted by nobody; remove
    // them so the folder matches submit.sh.
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.rsplit_once('.').map(|(s, _)| s.to_string());
            let ours = name.ends_with(".sbatch") || name.ends_with(".cells");
            if ours && !st.iter().any(|s| Some(&s.name) == stem.as_ref()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let sub = dir.join("submit.sh");
    crate::fsio::write_bytes_atomic(&sub, submit_script(&st, &deps).as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755));
    }
    Ok((dir, st))
}

/// Runs `submit.sh` (needs `sbatch` on PATH).
pub fn submit(dir: &Path) -> Result<String> {
    let found = std::process::Command::new("sbatch")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        return Err(bad(format!(
            "sbatch not found: the scripts are in {}; run {}/submit.sh on the cluster, or pass --dry-run",
            dir.display(),
            dir.display()
        )));
    }
    let o = std::process::Command::new("bash")
        .arg(dir.join("submit.sh"))
        .output()
        .map_err(|e| Error::Io {
            context: "running submit.sh".into(),
            source: e,
        })?;
    if !o.status.success() {
        return Err(Error::Io {
            context: format!("{}/submit.sh", dir.display()),
            source: std::io::Error::other(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        });
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}
