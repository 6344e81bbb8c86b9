//! The library's error type. `BadInput` is anything the user can fix (a file, a
//! field, a flag); the CLI turns it into exit code 2 with a one-line message.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with user input: a file, a field or a flag. Exit code 2.
    #[error("{0}")]
    BadInput(String),
    /// Training diverged (a NaN/Inf loss or gradient); exit code 1.
    #[error("{0}")]
    Diverged(String),
    /// The CUDA backend is unavailable or failed.
    #[error("cuda: {0}")]
    Cuda(String),
    /// An I/O failure that is not the user's input (e.g. a full disk).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a `BadInput` error.
pub fn bad(msg: impl Into<String>) -> Error {
    Error::BadInput(msg.into())
}

impl Error {
    /// Reading a user-named path failed: that is bad input (missing file, no permission).
    pub fn read(path: &Path, e: std::io::Error) -> Error {
        Error::BadInput(format!("{}: {}", path.display(), e))
    }
    /// Writing an output failed; the user named the place, so it is bad input too.
    pub fn write(path: &Path, e: std::io::Error) -> Error {
        Error::BadInput(format!("cannot write {}: {}", path.display(), e))
    }
    /// True when the CLI should exit with code 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::BadInput(_))
    }
}
