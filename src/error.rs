//! Typed errors. Every failure on user input (shapes, values, files) is one of these: the
//! library never panics on what a caller passes in.

use std::path::PathBuf;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// A data file (`.npy`, `.fvecs`, `.ivecs`, `meta.json`) is malformed or of an unsupported kind.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An index file failed validation.
    #[error("corrupt index file (section {section}): {reason}")]
    Corrupt {
        /// The section that failed (e.g. `header`, `codes`).
        section: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An index file of a format version this build cannot read.
    #[error("index format version {found} is not supported (this build reads {supported})")]
    Incompatible {
        /// Version found in the file.
        found: u32,
        /// Versions this build reads, e.g. `1..=1`.
        supported: String,
    },
    /// No usable GPU: the CUDA driver or NVRTC library is missing, or there is no device.
    #[error("no GPU available: {0}")]
    NoDevice(String),
    /// A CUDA call failed.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// A parameter is out of its valid range or parameters contradict each other.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The index must be trained before this operation.
    #[error("the index is not trained: call train() first")]
    NotTrained,
    /// A vector or buffer has the wrong dimension or length (both are lengths; a buffer of
    /// many rows whose length is no multiple of a row is an [`Error::PartialRow`]).
    #[error("dimension mismatch: expected {expected}, got {got}")]
    DimensionMismatch {
        /// The expected dimension (or length).
        expected: usize,
        /// The dimension (or length) received.
        got: usize,
    },
    /// A flat buffer of rows whose length is not a whole number of rows.
    #[error("{what}: {len} values are not a whole number of rows of {row_len}")]
    PartialRow {
        /// Which input (`vectors`, `keys`, `codes`).
        what: &'static str,
        /// The length of the row (a dimension, or heads x dimension).
        row_len: usize,
        /// The length received.
        len: usize,
    },
    /// An input holds NaN or infinity.
    #[error(
        "non-finite value (NaN or infinity) in {what}{} at row {row}, column {col}",
        head.map(|h| format!(" of head {h}")).unwrap_or_default()
    )]
    NonFinite {
        /// Which input (`vectors`, `queries`, `training set`, `keys`).
        what: &'static str,
        /// For per-head inputs (`[head, token, dim]`), the head holding the bad value; `row`
        /// is then the token within that head.
        head: Option<usize>,
        /// Row of the first bad value.
        row: usize,
        /// Column of the first bad value.
        col: usize,
    },
    /// The index holds no vectors.
    #[error("the index is empty: add vectors before searching")]
    EmptyIndex,
    /// `k` is zero or larger than the number of vectors that can be returned.
    #[error("k = {k} is out of range: it must be in 1..={ntotal}")]
    InvalidK {
        /// The `k` asked for.
        k: usize,
        /// The number of vectors in the index.
        ntotal: usize,
    },
    /// Too few training points for the number of centroids.
    #[error("too few training points: {got} for {need} centroids (need at least {need})")]
    TooFewTrainingPoints {
        /// Points given.
        got: usize,
        /// Points needed.
        need: usize,
    },
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The error for a buffer of `len` values that is no whole number of rows of `row_len`:
    /// shorter than one row, it is one vector of the wrong length
    /// ([`Error::DimensionMismatch`]); longer, a [`Error::PartialRow`].
    pub fn rows(what: &'static str, len: usize, row_len: usize) -> Error {
        if len < row_len {
            Error::DimensionMismatch {
                expected: row_len,
                got: len,
            }
        } else {
            Error::PartialRow { what, row_len, len }
        }
    }

    /// An [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
