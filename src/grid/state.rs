//! A cell's state, read from its folder: the command's own "finished" marker (never the
//! folder's mere existence), the grid's `run.json` record, and a lock file held (flock)
//! while a grid process works on the cell — the kernel drops it when that process dies, so
//! a kill -9 never leaves a cell looking busy.

use super::cells::{Cell, Kind};
use crate::error::{Error, Result};
use serde_json::Value as Json;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Done,
    /// Another process holds the cell's lock (its description).
    Running(String),
    /// Started before and not finished (killed, or interrupted).
    Partial,
    /// Failed on its last run (the error).
    Failed(String),
    Pending,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Done => "done",
            State::Running(_) => "running",
            State::Partial => "partial",
            State::Failed(_) => "failed",
            State::Pending => "pending",
        }
    }
}

pub fn cell_dir(out: &Path, c: &Cell) -> PathBuf {
    out.join(&c.id)
}

fn read_json(p: &Path) -> Option<Json> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Whether the cell's command finished, by its own output: a training run's run.json says
/// `"finished": true` and the adapter is there; a model or merge folder is renamed into place
/// only when complete (config.json); an evaluation writes results.json last.
pub fn marker_done(out: &Path, c: &Cell) -> bool {
    let o = out.join(c.out());
    match c.kind {
        Kind::Train => {
            read_json(&o.join("run.json")).is_some_and(|v| v["finished"].as_bool() == Some(true))
                && o.join("adapter_model.safetensors").is_file()
        }
        Kind::Model | Kind::Merge => o.join("config.json").is_file(),
        Kind::Eval => read_json(&o.join("results.json")).is_some_and(|v| v.get("value").is_some()),
    }
}

/// The grid's record of the cell (`CELL/run.json`).
pub fn read_record(out: &Path, c: &Cell) -> Option<Json> {
    read_json(&cell_dir(out, c).join("run.json"))
}

/// Whether a finished training cell is a DPO run from before `--keep-dropout`, which
/// applied its dropout in training (DPO now trains without unless that flag is given).
pub fn dpo_dropout_applied_before_the_flag(out: &Path, c: &Cell) -> bool {
    if c.kind != Kind::Train {
        return false;
    }
    read_json(&out.join(c.out()).join("run.json")).is_some_and(|v| {
        let s = &v["settings"];
        s["method"] == "dpo"
            && s.get("keep_dropout").is_none()
            && s["dropout"].as_f64().is_some_and(|p| p > 0.0)
    })
}

/// Where a finished cell's recorded command differs from the spec's, a short description.
/// A DPO cell trained with dropout before `--keep-dropout` existed matches a spec that
/// now asks for `--keep-dropout` (the same training), and no spec without it.
pub fn changed_at(out: &Path, rec: &Json, c: &Cell) -> Option<String> {
    if !dpo_dropout_applied_before_the_flag(out, c) {
        return changed(rec, c);
    }
    if !c.args.iter().any(|a| a == "--keep-dropout") {
        return Some(
            "it trained DPO with its dropout, as palign did before --keep-dropout; DPO now \
             trains without (as TRL): set keep_dropout = true for it"
                .into(),
        );
    }
    let mut same = c.clone();
    same.args.retain(|a| a != "--keep-dropout");
    changed(rec, &same)
}

/// Where a finished cell's recorded command differs from the spec's, a short description.
pub fn changed(rec: &Json, c: &Cell) -> Option<String> {
    let args: Vec<String> = rec["args"]
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    if args != c.args {
        let i = args
            .iter()
            .zip(&c.args)
            .position(|(a, b)| a != b)
            .unwrap_or(args.len().min(c.args.len()));
        let show = |v: &[String]| {
            v.get(i.saturating_sub(1)..(i + 1).min(v.len()))
                .map(|s| s.join(" "))
                .unwrap_or_default()
        };
        return Some(format!(
            "command was `… {} …`, the spec now gives `… {} …`",
            show(&args),
            show(&c.args)
        ));
    }
    for (name, text) in &c.files {
        let old = rec["files"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["name"] == name.as_str()))
            .and_then(|f| f["text"].as_str());
        if old != Some(text.as_str()) {
            return Some(format!("{name} differs from the spec's"));
        }
    }
    None
}

/// The state of one cell as seen from its folder.
pub fn state(out: &Path, c: &Cell) -> State {
    if marker_done(out, c) {
        return State::Done;
    }
    let dir = cell_dir(out, c);
    if let Some(h) = Lock::holder(&dir) {
        return State::Running(h);
    }
    let rec = read_record(out, c);
    if let Some(r) = &rec {
        if r["state"] == "failed" {
            return State::Failed(r["error"].as_str().unwrap_or("").to_string());
        }
    }
    if rec.is_some() || out.join(c.out()).exists() {
        State::Partial
    } else {
        State::Pending
    }
}

/// This machine's name, to tell whose lock a cell holds on a shared file system.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// `CELL/.lock`, exclusively flock'ed by the process running the cell.
pub struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    const NAME: &'static str = ".lock";

    /// Takes the cell's lock; `None` when another live process holds it.
    pub fn acquire(dir: &Path) -> Result<Option<Lock>> {
        let path = dir.join(Self::NAME);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::write(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::write(&path, e)),
        }
        let mut lock = Lock { file, path };
        // A child of a killed holder dies with it (PDEATHSIG); wait until it is gone so
        // two commands never write one folder.
        let prev = lock.content();
        if let Some(pid) = prev["child"].as_u64() {
            if prev["host"] == hostname().as_str() {
                wait_gone(pid as u32);
            }
        }
        lock.write(None)?;
        Ok(Some(lock))
    }

    fn content(&mut self) -> Json {
        let mut s = String::new();
        let _ = self.file.rewind();
        let _ = self.file.read_to_string(&mut s);
        serde_json::from_str(&s).unwrap_or(Json::Null)
    }

    /// Records who holds the lock, and the child process running the cell's command.
    pub fn write(&mut self, child: Option<u32>) -> Result<()> {
        let v = serde_json::json!({
            "host": hostname(),
            "pid": std::process::id(),
            "child": child,
        });
        let r = (|| {
            self.file.set_len(0)?;
            self.file.rewind()?;
            self.file.write_all(v.to_string().as_bytes())?;
            self.file.flush()
        })();
        r.map_err(|e| Error::write(&self.path, e))
    }

    /// Who holds the cell's lock (`host pid N`), if anyone.
    pub fn holder(dir: &Path) -> Option<String> {
        let path = dir.join(Self::NAME);
        let file = File::open(&path).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None,
            Err(std::fs::TryLockError::WouldBlock) => {
                let v = read_json(&path).unwrap_or(Json::Null);
                Some(format!(
                    "{} pid {}",
                    v["host"].as_str().unwrap_or("?"),
                    v["pid"].as_u64().map_or("?".into(), |p| p.to_string())
                ))
            }
            Err(_) => None,
        }
    }
}

/// Whether a process exists (and is not a zombie) on this machine.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name's closing parenthesis.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

fn wait_gone(pid: u32) {
    for _ in 0..100 {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
