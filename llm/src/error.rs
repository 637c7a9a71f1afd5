//! The runtime's error type.

use std::path::PathBuf;

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The GGUF file is malformed or not a model this runtime runs.
    #[error("{}: {reason}", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A hyper-parameter is missing or out of range.
    #[error("model metadata: {0}")]
    Metadata(String),
    /// The tokenizer could not be built or could not encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An argument is out of range (token id, context length, option).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A context file could not be read (truncated, corrupt, another format version: the
    /// engine's error says which section and why).
    #[error("{}: {source}", path.display())]
    ContextFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: pqcache::Error,
    },
    /// A context file that is sound but was not saved for this model and runtime (another
    /// model, another tokenizer, another shape), or whose state does not add up.
    #[error("{}: {reason}", path.display())]
    Context {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The retrieval engine refused (shapes, settings).
    #[error(transparent)]
    Retrieval(#[from] pqcache::Error),
    /// A tensor operation failed (candle).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// `Result` with [`LlmError`].
pub type Result<T> = std::result::Result<T, LlmError>;
