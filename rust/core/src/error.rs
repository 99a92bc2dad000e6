//! The single error type of the core. The Python binding maps each variant to
//! one exception class in `engramdb.errors` (see `rust/py/src/error.rs`).

use std::path::PathBuf;

/// Every fallible operation in the core returns this.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vector's length differs from the store's dimension.
    #[error("dimension mismatch: expected {expected}, got {got}")]
    DimensionMismatch { expected: usize, got: usize },
    /// NaN or infinite values in input vectors.
    #[error("invalid vector values: {0}")]
    InvalidValue(String),
    /// An empty batch, an empty id list, or other unusable input.
    #[error("empty input: {0}")]
    EmptyInput(String),
    /// Any other argument problem (bad metric name, k = 0, malformed filter...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An id that is not in the store.
    #[error("unknown id {0}")]
    NotFound(u64),
    /// An `add` with an id that already exists (or appears twice in the batch).
    #[error("duplicate id {0}: use upsert to replace an existing record")]
    DuplicateId(u64),
    /// Another process (or another handle in this one) holds the writer lock.
    #[error("store {0} is locked by another writer")]
    Locked(PathBuf),
    /// Writes attempted through a read-only handle.
    #[error("store is open read-only")]
    ReadOnly,
    /// The handle has been closed.
    #[error("store is closed")]
    Closed,
    /// A file failed its checksum or structural checks.
    #[error("corrupted file {file}: {detail}")]
    Corruption { file: PathBuf, detail: String },
    /// A file written by a newer, incompatible format version.
    #[error("file {file} has format version {found_major}.{found_minor}; this build reads up to {supported_major}.x")]
    FormatVersion {
        file: PathBuf,
        found_major: u16,
        found_minor: u16,
        supported_major: u16,
    },
    /// An operating-system I/O failure (disk full, permissions...).
    #[error("I/O error on {file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn corruption(file: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Corruption {
            file: file.into(),
            detail: detail.into(),
        }
    }
}

/// Attach a path to an `io::Error`.
pub trait IoContext<T> {
    fn at(self, file: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, file: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            file: file.into(),
            source,
        })
    }
}
