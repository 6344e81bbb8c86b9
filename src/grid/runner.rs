//! `grid run`: cells in dependency order, each as a subprocess of this binary with the grid
//! folder as working directory, its output appended to `CELL/log.txt`. Finished cells are
//! skipped; a failed one is retried (training resumes from its checkpoint, an evaluation
//! from its samples); cells whose dependency failed are skipped. Children die with the grid
//! (PDEATHSIG on Linux), so after a kill -9 a rerun picks up exactly the unfinished cells.

use super::cells::{Cell, Kind};
use super::spec::Spec;
use super::state::{self, cell_dir, Lock};
use crate::error::{bad, Error, Result};
use serde_json::{json, Value as Json};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub struct RunOpts {
    /// Cells run at once.
    pub jobs: usize,
    /// One GPU per parallel slot (`CUDA_VISIBLE_DEVICES`); empty: none set.
    pub gpus: Vec<String>,
    /// Only these cells (their dependencies must be done); empty: the whole grid.
    pub only: Vec<String>,
    /// Extra attempts after a failure.
    pub retries: usize,
    /// Flags appended to every command (device, threads, quiet); not part of a cell's identity.
    pub runtime: Vec<String>,
    pub quiet: bool,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub already_done: usize,
    /// (id, seconds, attempts)
    pub ran: Vec<(String, f64, usize)>,
    /// (id, error)
    pub failed: Vec<(String, String)>,
    /// (id, why)
    pub skipped: Vec<(String, String)>,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.skipped.is_empty()
    }
}

enum Outcome {
    Done { secs: f64, attempts: usize },
    Failed { error: String },
    Busy(String),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_record(dir: &Path, base: &Json, extra: Json) -> Result<()> {
    let mut v = base.clone();
    if let (Some(m), Json::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    crate::fsio::write_bytes_atomic(
        &dir.join("run.json"),
        &serde_json::to_vec_pretty(&v).expect("json"),
    )
}

/// The error a failed attempt printed: its last `error:` line, else its last line.
fn failure_text(log: &Path, from: u64, status: &str) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.take(1 << 20).read_to_string(&mut s);
    }
    // Skip the grid's own `== ...` lines: only the command's output says why it failed.
    let lines: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("== "))
        .collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("error:"))
        .or(lines.last())
        .copied()
        .unwrap_or("");
    if line.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {line}")
    }
}

/// Removes what an interrupted command left beside its output: staged folders
/// (`.out.tmp-PID`) of `init-tiny`/`merge`, which are rebuilt from scratch.
fn clean_staged(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".out.tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before prctl took effect: nobody would stop us later.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

struct Job<'a> {
    out: &'a Path,
    exe: &'a Path,
    cell: &'a Cell,
    record: Json,
    runtime: Vec<String>,
    gpu: Option<String>,
    retries: usize,
    quiet: bool,
}

fn run_cell(job: &Job) -> Result<Outcome> {
    let c = job.cell;
    let dir = cell_dir(job.out, c);
    std::fs::create_dir_all(&dir).map_err(|e| Error::write(&dir, e))?;
    // A status reader briefly holds a shared lock: retry a moment before calling it busy.
    let mut lock = None;
    for _ in 0..20 {
        lock = Lock::acquire(&dir)?;
        if lock.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let Some(mut lock) = lock else {
        return Ok(Outcome::Busy(
            Lock::holder(&dir).unwrap_or_else(|| "another process".into()),
        ));
    };
    let log = dir.join("log.txt");
    let t0 = Instant::now();
    let mut error = String::new();
    for attempt in 1..=1 + job.retries {
        if state::marker_done(job.out, c) {
            break;
        }
        for (name, text) in &c.files {
            crate::fsio::write_bytes_atomic(&dir.join(name), text.as_bytes())?;
        }
        if matches!(c.kind, Kind::Model | Kind::Merge) {
            clean_staged(&dir);
        }
        let started = now();
        write_record(
            &dir,
            &job.record,
            json!({"state": "running", "attempt": attempt, "host": state::hostname(),
                   "pid": std::process::id(), "started_unix": started}),
        )?;
        let mut lf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::write(&log, e))?;
        let from = lf.metadata().map(|m| m.len()).unwrap_or(0);
        writeln!(
            lf,
            "== attempt {attempt} at unix {started}: palign {}",
            c.args.join(" ")
        )
        .map_err(|e| Error::write(&log, e))?;
        let mut cmd = Command::new(job.exe);
        cmd.args(&c.args)
            .args(cell_runtime(c.kind, &job.runtime))
            .current_dir(job.out)
            .stdin(Stdio::null())
            .stdout(lf.try_clone().map_err(|e| Error::write(&log, e))?)
            .stderr(lf.try_clone().map_err(|e| Error::write(&log, e))?);
        if let Some(g) = &job.gpu {
            cmd.env("CUDA_VISIBLE_DEVICES", g);
        }
        die_with_parent(&mut cmd);
        let status = match cmd.spawn() {
            Ok(mut child) => {
                lock.write(Some(child.id()))?;
                child.wait().map_err(|e| Error::Io {
                    context: format!("waiting for {}", c.id),
                    source: e,
                })?
            }
            Err(e) => {
                return Err(Error::Io {
                    context: format!("cannot start {}", job.exe.display()),
                    source: e,
                })
            }
        };
        lock.write(None)?;
        if status.success() && state::marker_done(job.out, c) {
            break;
        }
        let what = if status.success() {
            "exited 0 but its output is not finished".to_string()
        } else {
            status_text(&status)
        };
        error = failure_text(&log, from, &what);
        let _ = writeln!(lf, "== grid: attempt {attempt} failed: {error}");
        if attempt <= job.retries && !job.quiet {
            eprintln!("grid: {} failed ({error}); retrying", c.id);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let rec = read_attempt(&dir);
    if state::marker_done(job.out, c) {
        write_record(
            &dir,
            &job.record,
            json!({"state": "done", "attempt": rec, "host": state::hostname(),
                   "finished_unix": now(), "seconds": secs}),
        )?;
        Ok(Outcome::Done {
            secs,
            attempts: rec as usize,
        })
    } else {
        write_record(
            &dir,
            &job.record,
            json!({"state": "failed", "attempt": rec, "host": state::hostname(),
                   "finished_unix": now(), "error": error}),
        )?;
        Ok(Outcome::Failed { error })
    }
}

fn read_attempt(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("run.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Json>(&s).ok())
        .and_then(|v| v["attempt"].as_u64())
        .unwrap_or(0)
}

fn status_text(s: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match s.code() {
        Some(c) => format!("exit code {c}"),
        None => "exited".into(),
    }
}

/// The cells and their states; fails when a finished cell's command is not the spec's any
/// more (the grid never overwrites a finished result).
pub fn check_changed(spec: &Spec, out: &Path, cells: &[Cell]) -> Result<()> {
    let mut bad_cells = vec![];
    for c in cells {
        if !state::marker_done(out, c) {
            continue;
        }
        if let Some(rec) = state::read_record(out, c) {
            if let Some(why) = state::changed_at(out, &rec, c) {
                bad_cells.push(format!("{} ({why})", c.id));
            }
        }
    }
    if bad_cells.is_empty() {
        return Ok(());
    }
    let n = bad_cells.len();
    bad_cells.truncate(3);
    Err(bad(format!(
        "{}: {n} finished cell(s) were made with other settings than the spec now gives: {}{}; \
         restore the spec, or remove those cell folders under {} to rerun them",
        spec.path.display(),
        bad_cells.join("; "),
        if n > 3 { "; …" } else { "" },
        out.display()
    )))
}

pub fn run(spec: &Spec, out: &Path, cells: &[Cell], opts: &RunOpts) -> Result<Summary> {
    std::fs::create_dir_all(out).map_err(|e| Error::write(out, e))?;
    let out = std::fs::canonicalize(out).map_err(|e| Error::write(out, e))?;
    let exe = std::env::current_exe().map_err(|e| Error::Io {
        context: "cannot find the palign binary".into(),
        source: e,
    })?;
    check_changed(spec, &out, cells)?;

    // Which cells to consider: all, or the named ones.
    let mut wanted = vec![opts.only.is_empty(); cells.len()];
    for id in &opts.only {
        let i = cells
            .iter()
            .position(|c| &c.id == id)
            .ok_or_else(|| bad(format!("--cell {id}: no such cell in the spec")))?;
        wanted[i] = true;
    }

    #[derive(Clone, PartialEq)]
    enum St {
        Done,
        Todo,
        Running,
        Failed,
        Skipped,
    }
    let mut summary = Summary::default();
    let mut st: Vec<St> = Vec::with_capacity(cells.len());
    for c in cells.iter() {
        if state::marker_done(&out, c) {
            // Killed between the command's end and the record: complete the record.
            let rec = state::read_record(&out, c);
            if rec.as_ref().is_none_or(|r| r["state"] != "done") {
                let dir = cell_dir(&out, c);
                let _ = write_record(
                    &dir,
                    &record_of(spec, cells, c),
                    json!({"state": "done", "finished_unix": now()}),
                );
            }
            st.push(St::Done);
        } else {
            st.push(St::Todo);
        }
    }
    summary.already_done = st
        .iter()
        .zip(&wanted)
        .filter(|(s, w)| **s == St::Done && **w)
        .count();
    let total = wanted.iter().filter(|w| **w).count();
    let todo = total - summary.already_done;
    if !opts.quiet {
        eprintln!(
            "grid: {total} cells, {} done, {todo} to run",
            summary.already_done
        );
    }

    let slots: Vec<Option<String>> = if opts.gpus.is_empty() {
        vec![None; opts.jobs.max(1)]
    } else {
        opts.gpus.iter().cloned().map(Some).collect()
    };
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    let (tx, rx) = mpsc::channel::<(usize, usize, Result<Outcome>)>();
    let mut running = 0usize;
    let mut finished = 0usize;
    let mut fatal: Option<Error> = None;

    std::thread::scope(|scope| {
        loop {
            // Skip cells whose dependencies failed (deps always come first).
            for i in 0..cells.len() {
                if st[i] != St::Todo || !wanted[i] {
                    continue;
                }
                if let Some(&d) = cells[i]
                    .deps
                    .iter()
                    .find(|&&d| matches!(st[d], St::Failed | St::Skipped))
                {
                    st[i] = St::Skipped;
                    summary.skipped.push((
                        cells[i].id.clone(),
                        format!("dependency {} failed", cells[d].id),
                    ));
                } else if !opts.only.is_empty() {
                    if let Some(&d) = cells[i].deps.iter().find(|&&d| st[d] != St::Done) {
                        st[i] = St::Skipped;
                        let s = state::state(&out, &cells[d]);
                        summary.skipped.push((
                            cells[i].id.clone(),
                            format!("dependency {} is not done ({})", cells[d].id, s.name()),
                        ));
                    }
                }
            }
            // Start what is ready, in order.
            if fatal.is_none() {
                for i in 0..cells.len() {
                    if free.is_empty() {
                        break;
                    }
                    if st[i] != St::Todo || !wanted[i] {
                        continue;
                    }
                    if cells[i].deps.iter().all(|&d| st[d] == St::Done) {
                        let slot = free.pop().expect("a free slot");
                        st[i] = St::Running;
                        running += 1;
                        let job = Job {
                            out: &out,
                            exe: &exe,
                            cell: &cells[i],
                            record: record_of(spec, cells, &cells[i]),
                            runtime: opts.runtime.clone(),
                            gpu: slots[slot].clone(),
                            retries: opts.retries,
                            quiet: opts.quiet,
                        };
                        let tx = tx.clone();
                        scope.spawn(move || {
                            let r = run_cell(&job);
                            let _ = tx.send((i, slot, r));
                        });
                    }
                }
            }
            if running == 0 {
                break;
            }
            let (i, slot, r) = rx.recv().expect("a worker reports");
            running -= 1;
            free.push(slot);
            finished += 1;
            let id = &cells[i].id;
            match r {
                Ok(Outcome::Done { secs, attempts }) => {
                    st[i] = St::Done;
                    if !opts.quiet {
                        let again = if attempts > 1 { ", after a retry" } else { "" };
                        eprintln!("[{finished}/{todo}] {id}: done in {secs:.1}s{again}");
                    }
                    summary.ran.push((id.clone(), secs, attempts));
                }
                Ok(Outcome::Failed { error }) => {
                    st[i] = St::Failed;
                    eprintln!("[{finished}/{todo}] {id}: FAILED: {error}");
                    summary.failed.push((id.clone(), error));
                }
                Ok(Outcome::Busy(who)) => {
                    st[i] = St::Skipped;
                    eprintln!("[{finished}/{todo}] {id}: skipped, running in {who}");
                    summary
                        .skipped
                        .push((id.clone(), format!("running in {who}")));
                }
                Err(e) => {
                    st[i] = St::Failed;
                    summary.failed.push((id.clone(), e.to_string()));
                    // The grid itself cannot write: stop starting cells.
                    fatal.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = fatal {
        return Err(e);
    }
    Ok(summary)
}

/// A cell's record: the spec's description and command, dependencies by id.
pub fn record_of(spec: &Spec, cells: &[Cell], c: &Cell) -> Json {
    json!({
        "id": c.id,
        "cell": c.describe(spec),
        "args": c.args,
        "files": c.files.iter().map(|(n, t)| json!({"name": n, "text": t})).collect::<Vec<_>>(),
        "deps": c.deps.iter().map(|&d| cells[d].id.clone()).collect::<Vec<_>>(),
        "palign_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Runtime flags for the cells' commands: the device, threads per cell, quiet.
pub fn runtime_flags(device: &str, threads: Option<usize>, parallel: usize) -> Vec<String> {
    let mut v = vec![];
    if device != "auto" {
        v.extend(["--device".to_string(), device.to_string()]);
    }
    let threads = threads.or_else(|| {
        (parallel > 1).then(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / parallel).max(1)
        })
    });
    if let Some(t) = threads {
        v.extend(["--threads".to_string(), t.to_string()]);
    }
    v.push("--quiet".into());
    v
}

/// The runtime flags of one cell: `init-tiny` and `merge` run on the CPU only and refuse
/// an explicit `--device cuda`, so a grid run with it passes them no device.
pub fn cell_runtime(kind: Kind, runtime: &[String]) -> Vec<String> {
    if !matches!(kind, Kind::Model | Kind::Merge) {
        return runtime.to_vec();
    }
    let mut out = Vec::with_capacity(runtime.len());
    let mut it = runtime.iter();
    while let Some(a) = it.next() {
        if a == "--device" {
            match it.next() {
                Some(v) if v == "cuda" => {}
                v => {
                    out.push(a.clone());
                    out.extend(v.cloned());
                }
            }
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// The absolute grid folder (created).
pub fn out_dir(out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::write(out, e))?;
    std::fs::canonicalize(out).map_err(|e| Error::write(out, e))
}
