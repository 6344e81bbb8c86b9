//! An evaluation's output folder: `run.json` (the settings its samples were made with),
//! append-only JSONL logs keyed by sample id (`samples.jsonl`, `judgments.jsonl`) and the
//! atomically rewritten `results.json`.
//!
//! Resuming: a log row is written and flushed as soon as its sample is done, so a killed
//! run loses at most the rows in flight; a rerun reads the log, skips the ids it holds and
//! drops a torn last line (a kill in the middle of a write).

use crate::error::{bad, Error, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub type Row = Map<String, Value>;

/// An append-only JSONL file of rows with a string `id` (the first row of an id wins).
pub struct SampleLog {
    path: PathBuf,
    file: std::fs::File,
    rows: HashMap<String, Row>,
}

impl SampleLog {
    /// Opens `path` for appending, reading the rows it already holds.
    pub fn open(path: &Path) -> Result<SampleLog> {
        let mut rows = HashMap::new();
        if path.exists() {
            let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
            // Everything after the last newline is a torn write: cut it off.
            let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if keep < bytes.len() {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::write(path, e))?;
                f.set_len(keep as u64).map_err(|e| Error::write(path, e))?;
            }
            let text = std::str::from_utf8(&bytes[..keep])
                .map_err(|_| bad(format!("{}: not valid UTF-8", path.display())))?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let at = || format!("{}:{}", path.display(), i + 1);
                let row: Row = serde_json::from_str(line)
                    .map_err(|e| bad(format!("{}: not a JSON object: {e}", at())))?;
                let id = row
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{}: row has no string `id`", at())))?
                    .to_string();
                rows.entry(id).or_insert(row);
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::write(path, e))?;
        Ok(SampleLog {
            path: path.to_path_buf(),
            file,
            rows,
        })
    }

    pub fn get(&self, id: &str) -> Option<&Row> {
        self.rows.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.rows.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Appends one row (it must have a string `id`) and flushes it to the file.
    pub fn append(&mut self, row: Row) -> Result<()> {
        let id = row
            .get("id")
            .and_then(Value::as_str)
            .expect("log rows carry an id")
            .to_string();
        let mut line = serde_json::to_string(&row).expect("a JSON map serializes");
        line.push('\n');
        // One write per row, so a kill tears at most this line.
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::write(&self.path, e))?;
        self.rows.entry(id).or_insert(row);
        Ok(())
    }

    /// Rewrites the file atomically with `rows` (e.g. samples with their judgments merged).
    pub fn rewrite(&mut self, rows: &[Row]) -> Result<()> {
        crate::fsio::write_atomic(&self.path, |w| {
            for r in rows {
                serde_json::to_writer(&mut *w, r)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        *self = SampleLog::open(&self.path.clone())?;
        Ok(())
    }
}

/// An evaluation output folder.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    /// Creates `dir` if needed and pins `fixed` (the settings that decide what a sample
    /// holds) in `run.json`: a rerun with other fixed settings is refused, so one folder
    /// never mixes samples of two models or prompts.
    pub fn open(dir: &Path, task: &str, fixed: &Value) -> Result<RunDir> {
        if dir.exists() && !dir.is_dir() {
            return Err(bad(format!("--out {}: not a folder", dir.display())));
        }
        let run_path = dir.join("run.json");
        // Without run.json nothing says what the folder's files are: resuming from them
        // could mix samples of another model or task in, and writing there could spoil
        // someone's model or results. Only an empty (or new) folder starts an evaluation.
        if dir.is_dir() && !run_path.exists() {
            if let Some(name) = first_entry(dir)? {
                return Err(bad(format!(
                    "--out {}: the folder is not empty ({name}) and has no run.json, so it is \
                     not an evaluation's folder; choose a new or empty --out",
                    dir.display()
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
        let want = serde_json::json!({"task": task, "settings": fixed});
        if run_path.exists() {
            let text = std::fs::read_to_string(&run_path).map_err(|e| Error::read(&run_path, e))?;
            let have: Value = serde_json::from_str(&text)
                .map_err(|e| bad(format!("{}: not valid JSON: {e}", run_path.display())))?;
            if have.get("task") != want.get("task") {
                return Err(bad(format!(
                    "--out {} holds a `{}` evaluation, not `{task}`; choose another --out",
                    dir.display(),
                    have.get("task").and_then(Value::as_str).unwrap_or("?")
                )));
            }
            let (old, new) = (&have["settings"], &want["settings"]);
            if old != new {
                let key = first_difference(old, new);
                return Err(bad(format!(
                    "--out {} holds samples made with other settings ({key}: {} before, {} now); \
                     choose another --out to evaluate with new settings",
                    dir.display(),
                    old.get(&key).unwrap_or(&Value::Null),
                    new.get(&key).unwrap_or(&Value::Null)
                )));
            }
        } else {
            let mut text = serde_json::to_string_pretty(&want).expect("JSON");
            text.push('\n');
            crate::fsio::write_bytes_atomic(&run_path, text.as_bytes())?;
        }
        Ok(RunDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn samples(&self) -> Result<SampleLog> {
        SampleLog::open(&self.dir.join("samples.jsonl"))
    }

    pub fn judgments(&self) -> Result<SampleLog> {
        SampleLog::open(&self.dir.join("judgments.jsonl"))
    }

    pub fn write_json(&self, name: &str, v: &Value) -> Result<()> {
        let mut text = serde_json::to_string_pretty(v).expect("JSON");
        text.push('\n');
        crate::fsio::write_bytes_atomic(&self.dir.join(name), text.as_bytes())
    }
}

/// A file or folder in `dir`, leaving out what a killed write of run.json left behind.
fn first_entry(dir: &Path) -> Result<Option<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::read(dir, e))?;
    for e in rd {
        let e = e.map_err(|e| Error::read(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(".run.json.tmp-") {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// The first key whose values differ between two settings objects.
fn first_difference(a: &Value, b: &Value) -> String {
    let mut keys: Vec<&String> = a
        .as_object()
        .into_iter()
        .chain(b.as_object())
        .flat_map(|m| m.keys())
        .collect();
    keys.sort();
    keys.into_iter()
        .find(|k| a.get(k.as_str()) != b.get(k.as_str()))
        .cloned()
        .unwrap_or_else(|| "settings".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Row {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn log_resumes_and_drops_a_torn_last_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.jsonl");
        let mut log = SampleLog::open(&p).unwrap();
        log.append(row(json!({"id": "a", "x": 1}))).unwrap();
        log.append(row(json!({"id": "b", "x": 2}))).unwrap();
        drop(log);
        // A kill in the middle of the third write.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"id\": \"c\", \"x\"").unwrap();
        drop(f);
        let mut log = SampleLog::open(&p).unwrap();
        assert_eq!(log.len(), 2);
        assert!(log.contains("a") && log.contains("b") && !log.contains("c"));
        log.append(row(json!({"id": "c", "x": 3}))).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(SampleLog::open(&p).unwrap().get("c").unwrap()["x"], 3);
    }

    #[test]
    fn bad_log_lines_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.jsonl");
        std::fs::write(&p, "{\"id\":\"a\"}\n{\"x\":1}\n").unwrap();
        let e = SampleLog::open(&p).err().unwrap();
        assert!(
            e.is_bad_input() && e.to_string().contains("s.jsonl:2"),
            "{e}"
        );
    }

    #[test]
    fn run_dir_refuses_a_non_empty_folder_without_run_json() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("run");
        std::fs::create_dir_all(&out).unwrap();
        // Left by a run killed while writing run.json: still an empty folder.
        std::fs::write(out.join(".run.json.tmp-123"), "{").unwrap();
        RunDir::open(&out, "mmlu", &json!({"model": "m"})).unwrap();
        std::fs::write(out.join("samples.jsonl"), "").unwrap();
        RunDir::open(&out, "mmlu", &json!({"model": "m"})).unwrap();
        std::fs::remove_file(out.join("run.json")).unwrap();
        let e = RunDir::open(&out, "mmlu", &json!({"model": "m"}))
            .err()
            .unwrap();
        assert!(
            e.is_bad_input() && e.to_string().contains("no run.json"),
            "{e}"
        );
        assert!(!out.join("run.json").exists());
    }

    #[test]
    fn run_dir_refuses_other_settings() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("run");
        RunDir::open(&out, "mmlu", &json!({"model": "m", "shots": 5})).unwrap();
        RunDir::open(&out, "mmlu", &json!({"model": "m", "shots": 5})).unwrap();
        let e = RunDir::open(&out, "mmlu", &json!({"model": "m", "shots": 0}))
            .err()
            .unwrap();
        assert!(e.is_bad_input() && e.to_string().contains("shots"), "{e}");
        let e = RunDir::open(&out, "bbh", &json!({"model": "m", "shots": 5}))
            .err()
            .unwrap();
        assert!(e.to_string().contains("mmlu"), "{e}");
    }
}
