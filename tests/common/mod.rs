//! Helpers shared by the integration tests: fixture paths, JSONL reading, running the
//! built `palign` binary. (Each test binary uses a subset, hence `dead_code`.)
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `tests/fixtures`.
pub fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs palign and asserts success, showing its stderr otherwise.
pub fn palign(args: &[&str]) -> Output {
    let o = run(args);
    assert!(
        o.status.success(),
        "palign {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs palign, whatever the outcome.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palign"))
        .args(args)
        .output()
        .unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
