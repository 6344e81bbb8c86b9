//! Crash-safe output: every file is written under a temporary name in the same folder
//! and renamed into place, so a failed or killed run never leaves a half-written file.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary sibling a file is written to before the rename.
fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `path` atomically with whatever `fill` writes into a buffered writer.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::BadInput(format!(
                "cannot write {}: folder {} does not exist",
                path.display(),
                parent.display()
            )));
        }
    }
    let tmp = temp_name(path);
    let result = (|| {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(f);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::write(path, e));
    }
    Ok(())
}

/// Write a whole byte buffer atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// An output folder built under a temporary name and renamed into place by `commit`;
/// dropped without `commit`, it is removed, so a failed command leaves nothing behind.
pub struct StagedDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Refuses a destination that exists and is not an empty folder.
    pub fn new(dest: &Path) -> Result<Self> {
        if dest.exists() {
            let empty = dest.is_dir()
                && std::fs::read_dir(dest)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !empty {
                return Err(Error::BadInput(format!(
                    "output {} already exists; choose another --out or remove it",
                    dest.display()
                )));
            }
        }
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(Error::BadInput(format!(
                "cannot create {}: folder {} does not exist",
                dest.display(),
                parent.display()
            )));
        }
        let tmp = temp_name(dest);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| Error::write(dest, e))?;
        Ok(StagedDir {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write the folder's files until `commit`.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn commit(mut self) -> Result<()> {
        if self.dest.is_dir() {
            // An empty destination folder (checked in `new`) is replaced.
            std::fs::remove_dir(&self.dest).map_err(|e| Error::write(&self.dest, e))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::write(&self.dest, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.txt");
        write_bytes_atomic(&p, b"first").unwrap();
        let r = write_atomic(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("boom"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "temp file left behind"
        );
    }

    #[test]
    fn staged_dir_appears_only_on_commit() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("run");
        {
            let s = StagedDir::new(&dest).unwrap();
            std::fs::write(s.path().join("a"), b"x").unwrap();
        }
        assert!(!dest.exists());
        let s = StagedDir::new(&dest).unwrap();
        std::fs::write(s.path().join("a"), b"x").unwrap();
        s.commit().unwrap();
        assert!(dest.join("a").exists());
        assert!(
            StagedDir::new(&dest).is_err(),
            "a finished output must not be overwritten"
        );
    }
}
