//! Kernel choices measured once per GPU and kept on disk: the NF4 dispatcher's path per
//! product shape (`nf4-dispatch-<gpu>.json`), its GEMV variant per decode shape
//! (`nf4-gemv-<gpu>.json`) and the attention tiles per shape
//! (`attn-tune-<gpu>.json`). A file is JSON naming its format, version and GPU; one for
//! another GPU, an older version or a damaged file is an empty cache (it is only a cache:
//! the next measurement replaces it).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a cache file holds a choice of, and where the file lives.
pub trait Choice: Clone + Debug + PartialEq + Serialize + DeserializeOwned {
    /// The file's `format` field.
    const FORMAT: &'static str;
    /// The file name is `<PREFIX>-<gpu>.json`.
    const PREFIX: &'static str;
    /// The environment variable that names the file instead ("off" disables the file).
    const ENV: &'static str;
}

/// A measured choice: the winner, each timed candidate's milliseconds per call, and the
/// candidates left out because their results disagreed with the reference kernel's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "C: Choice")]
pub struct TuneEntry<C> {
    pub choice: C,
    pub ms: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<String>,
}

impl<C: Choice> TuneEntry<C> {
    pub fn new(choice: C, ms: BTreeMap<String, f64>) -> Self {
        TuneEntry {
            choice,
            ms,
            rejected: Vec::new(),
        }
    }

    /// Whether this entry chose one of `names` and measured (or rejected) every one of
    /// them, i.e. answers for today's candidate set; otherwise it is measured again.
    pub fn covers(&self, chosen: &str, names: &[&str]) -> bool {
        names.contains(&chosen)
            && names
                .iter()
                .all(|n| self.ms.contains_key(*n) || self.rejected.iter().any(|r| r == n))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "C: Choice")]
struct CacheFile<C> {
    format: String,
    version: u32,
    gpu: String,
    /// The kernels the entries were measured with ([`build_id`]); files written before
    /// it existed have none and are taken as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    build: Option<String>,
    entries: BTreeMap<String, TuneEntry<C>>,
}

/// The identity of the embedded kernels: a hash of the fatbin (made by build.rs). A
/// kernel changed under the same name invalidates what was measured with the old one
/// (its parity included).
pub fn build_id() -> &'static str {
    super::FATBIN_HASH
}

const CACHE_VERSION: u32 = 1;

/// Measured choices for one GPU, optionally backed by a JSON file.
#[derive(Debug)]
pub struct TuneCache<C> {
    path: Option<PathBuf>,
    gpu: String,
    entries: BTreeMap<String, TuneEntry<C>>,
}

impl<C: Choice> TuneCache<C> {
    /// A cache that never touches the disk.
    pub fn in_memory(gpu: &str) -> Self {
        TuneCache {
            path: None,
            gpu: gpu.to_string(),
            entries: BTreeMap::new(),
        }
    }

    /// The entries of `path` when it is a cache file of this kind for `gpu`; a missing,
    /// unreadable, foreign or older file gives an empty cache, which
    /// [`save`](Self::save) later replaces.
    pub fn load(path: &Path, gpu: &str) -> Self {
        let entries = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<CacheFile<C>>(&bytes).ok())
            .filter(|f| f.format == C::FORMAT && f.version == CACHE_VERSION && f.gpu == gpu)
            .filter(|f| f.build.as_deref().is_none_or(|b| b == build_id()))
            .map(|f| f.entries)
            .unwrap_or_default();
        TuneCache {
            path: Some(path.to_path_buf()),
            gpu: gpu.to_string(),
            entries,
        }
    }

    /// The file at [`default_path`](Self::default_path), or memory only without one.
    pub fn for_gpu(gpu: &str) -> Self {
        match Self::default_path(gpu) {
            Some(p) => Self::load(&p, gpu),
            None => Self::in_memory(gpu),
        }
    }

    /// `$<ENV>` (a file; "off" disables), else
    /// `$XDG_CACHE_HOME/palign/<PREFIX>-<gpu>.json` or `~/.cache/palign/...`.
    pub fn default_path(gpu: &str) -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(C::ENV) {
            return (p != "off" && !p.is_empty()).then(|| PathBuf::from(p));
        }
        let base = match std::env::var_os("XDG_CACHE_HOME") {
            Some(x) if !x.is_empty() => PathBuf::from(x),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
        };
        Some(
            base.join("palign")
                .join(format!("{}-{}.json", C::PREFIX, file_stem(gpu))),
        )
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    pub fn gpu(&self) -> &str {
        &self.gpu
    }
    pub fn get(&self, key: &str) -> Option<&TuneEntry<C>> {
        self.entries.get(key)
    }
    pub fn insert(&mut self, key: String, entry: TuneEntry<C>) {
        self.entries.insert(key, entry);
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// The entries, by key.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &TuneEntry<C>)> {
        self.entries.iter()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the file atomically (a temporary beside it, then rename), so a reader never
    /// sees half a file; concurrent writers each leave a whole one. No-op without a path.
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let io = |what: &str, e: std::io::Error| Error::Io {
            context: format!("{what} {}", path.display()),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the folder of", e))?;
        }
        let file = CacheFile {
            format: C::FORMAT.into(),
            version: CACHE_VERSION,
            gpu: self.gpu.clone(),
            build: Some(build_id().to_string()),
            entries: self.entries.clone(),
        };
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| Error::Cuda(format!("encoding {}: {e}", path.display())))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, text + "\n").map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("replacing", e)
        })
    }
}

/// A GPU name as a file-name part: lowercase ASCII letters and digits, '-' between.
pub fn file_stem(gpu: &str) -> String {
    let mut s = String::new();
    for c in gpu.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    let s = s.trim_matches('-');
    if s.is_empty() {
        "unknown".into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Pick(String);
    impl Choice for Pick {
        const FORMAT: &'static str = "palign-test-tune";
        const PREFIX: &'static str = "test-tune";
        const ENV: &'static str = "PALIGN_TEST_TUNE_CACHE";
    }

    /// Entries measured with other kernels are dropped; a file without a build (written
    /// before builds were recorded) is kept.
    #[test]
    fn entries_of_another_kernel_build_are_measured_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let mut c: TuneCache<Pick> = TuneCache::load(&path, "G");
        c.insert(
            "k".into(),
            TuneEntry::new(Pick("a".into()), BTreeMap::new()),
        );
        c.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["build"], build_id());
        assert_eq!(TuneCache::<Pick>::load(&path, "G").len(), 1);
        let other = text.replace(build_id(), "0000000000000000");
        assert_ne!(other, text);
        std::fs::write(&path, other).unwrap();
        assert!(TuneCache::<Pick>::load(&path, "G").is_empty());
        let mut legacy = v.clone();
        legacy.as_object_mut().unwrap().remove("build");
        std::fs::write(&path, legacy.to_string()).unwrap();
        assert_eq!(TuneCache::<Pick>::load(&path, "G").len(), 1);
    }

    #[test]
    fn file_stems_are_plain() {
        assert_eq!(file_stem("NVIDIA H100 80GB HBM3"), "nvidia-h100-80gb-hbm3");
        assert_eq!(file_stem("  A100-SXM4-40GB  "), "a100-sxm4-40gb");
        assert_eq!(file_stem("../../etc"), "etc");
        assert_eq!(file_stem("///"), "unknown");
    }
}
