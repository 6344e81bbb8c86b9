//! JSONL reading with file:line in every error. `.gz` and `.xz` are decompressed on the fly.

use crate::error::{bad, Error, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Opens a possibly compressed text file.
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
    let name = path.to_string_lossy();
    let r: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else if name.ends_with(".xz") {
        Box::new(xz2::read::XzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::new(r)))
}

/// Every non-blank line of a JSONL file as a JSON object, with its 1-based line number.
pub fn read_objects(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let mut out = Vec::new();
    for (i, line) in open_text(path)?.lines().enumerate() {
        let line =
            line.map_err(|e| bad(format!("{}:{}: cannot read: {e}", path.display(), i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| bad(format!("{}:{}: not valid JSON: {e}", path.display(), i + 1)))?;
        match v {
            Value::Object(o) => out.push((i + 1, o)),
            _ => {
                return Err(bad(format!(
                    "{}:{}: expected a JSON object",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(bad(format!("{}: no rows", path.display())));
    }
    Ok(out)
}

/// A string field of a row, or a clear error naming file, line and field.
pub fn str_field<'a>(
    row: &'a serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<&'a str> {
    match row.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bad(format!(
            "{}:{line}: field `{key}` must be a string",
            path.display()
        ))),
        None => Err(bad(format!(
            "{}:{line}: field `{key}` is missing",
            path.display()
        ))),
    }
}

/// A token-id list field.
pub fn ids_field(
    row: &serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<Vec<u32>> {
    let arr = match row.get(key) {
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(bad(format!(
                "{}:{line}: field `{key}` must be a list of token ids",
                path.display()
            )))
        }
        None => {
            return Err(bad(format!(
                "{}:{line}: field `{key}` is missing",
                path.display()
            )))
        }
    };
    arr.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&n| n <= u32::MAX as u64)
                .map(|n| n as u32)
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            bad(format!(
                "{}:{line}: field `{key}` must hold non-negative integers",
                path.display()
            ))
        })
}
